"""Measurements: TensorBoard events, a JSONL log and the console, from host 0; MFU."""

import json
import os
import shutil
import tempfile
import time
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging
from etils import epath

from hdit_jax.training.checkpoint import error_line

# Dense bf16 peak FLOP/s per device, by `device_kind` prefix.
PEAK_FLOPS = (
    ("NVIDIA H100", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA GH200", 989e12),
    ("NVIDIA B200", 2250e12), ("NVIDIA A100", 312e12),
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v5", 459e12), ("TPU v4", 275e12), ("TPU v3", 123e12),
)


def peak_flops(device: jax.Device, override_tflops: float = 0.0) -> float | None:
  if override_tflops:
    return override_tflops * 1e12
  for prefix, flops in PEAK_FLOPS:
    if device.device_kind.startswith(prefix):
      return flops
  return None


def train_flops_per_image(forward_gmacs: float) -> float:
  """Forward + backward FLOPs per image: 3 forward passes of 2 FLOPs per multiply-accumulate."""
  return 3 * 2 * forward_gmacs * 1e9


def host_measurements() -> dict[str, float]:
  """This process's resident memory (MiB, where /proc tells it) and its number of live JAX
  arrays: both flat over a healthy run, so a leak shows in the metrics."""
  out = {"live_arrays": float(len(jax.live_arrays()))}
  try:
    with open("/proc/self/statm") as f:
      out["host_memory_mib"] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
  except (OSError, ValueError):
    pass
  return out


def _open_log(path: str):
  """A JSONL log to append to; a last line cut short (a crash mid-write) is ended first, so
  that the next line does not run into it."""
  torn = False
  if os.path.exists(path) and os.path.getsize(path):
    with open(path, "rb") as f:
      f.seek(-1, os.SEEK_END)
      torn = f.read(1) != b"\n"
  log = open(path, "a", encoding="utf-8")  # pylint: disable=consider-using-with
  if torn:
    log.write("\n")
  return log


def _drop_lines_after(path: str, step: int) -> None:
  """Moves the lines of steps after `step` out of a JSONL log (a run that went back to an
  earlier checkpoint logs them again) to `<name>.abandoned.jsonl` beside it, so that the log
  holds one line per step of the run as it went on and nothing is lost; lines that do not
  parse stay."""
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    lines = f.readlines()

  def later(line: str) -> bool:
    try:
      return int(json.loads(line)["step"]) > step
    except (ValueError, KeyError, TypeError):
      return False

  kept = [line for line in lines if not later(line)]
  if len(kept) < len(lines):
    abandoned = path[:-len(".jsonl")] + ".abandoned.jsonl"
    logging.info("%s: the lines of the %d steps after step %d, which run again, moved to %s",
                 path, len(lines) - len(kept), step, abandoned)
    with open(abandoned, "a", encoding="utf-8") as f:
      f.writelines(line if line.endswith("\n") else line + "\n" for line in lines
                   if later(line))
    with open(path, "w", encoding="utf-8") as f:
      f.writelines(kept)


class MetricWriter:
  """Scalars and images to TensorBoard (tensorboardX) and scalars to `metrics.jsonl`.

  For a remote workdir (gs://) the files are written locally and copied up, at most every
  `upload_every` seconds and at evaluations and the end; only files that changed since their
  last upload are copied, and a copy that fails is logged and made again at the next upload.
  A TensorBoard event file is closed and a new one begun once it holds `rotate_bytes`, so a
  long run's events (sample grids included) are copied up about once, not at every flush. An existing `metrics.jsonl` and `eval.jsonl` in the workdir are continued,
  on gs:// as locally; with `resume_step` (the step a run restarts from) their lines of later
  steps are dropped, as those steps are logged again. `close` removes the local copies once
  everything is up (a file that could not be copied keeps them, and the log says where).
  """

  def __init__(self, workdir: str, enabled: bool = True, *, upload_every: float = 30.0,
               rotate_bytes: int = 4 << 20, resume_step: int | None = None):
    self.enabled = enabled
    self._remote = workdir if "://" in workdir else None
    self._local = workdir
    if self._remote and enabled:
      self._local = tempfile.mkdtemp(prefix="hdit-metrics-")
    self._upload_every, self._rotate_bytes = upload_every, rotate_bytes
    self._uploaded: dict[str, tuple[int, int]] = {}   # local path -> (size, mtime_ns) sent
    self._last_upload = time.monotonic()
    self._tb, self._event_file = None, None
    self._jsonl = None
    self._eval_jsonl = None   # opened by the first evaluation
    if enabled:
      os.makedirs(self._local, exist_ok=True)
      if self._remote:
        self._download(("metrics.jsonl", "eval.jsonl"))
      if resume_step is not None:
        for name in ("metrics.jsonl", "eval.jsonl"):
          _drop_lines_after(os.path.join(self._local, name), resume_step)
      self._tb = self._event_writer()
      self._jsonl = _open_log(os.path.join(self._local, "metrics.jsonl"))

  def _download(self, names) -> None:
    """The remote logs to continue (their earlier lines would otherwise be overwritten)."""
    for name in names:
      remote = epath.Path(self._remote) / name
      if remote.exists():
        local = os.path.join(self._local, name)
        with open(local, "wb") as f:
          f.write(remote.read_bytes())
        stat = os.stat(local)
        self._uploaded[local] = (stat.st_size, stat.st_mtime_ns)

  def _event_writer(self):
    """A new tensorboardX writer; `self._event_file` is the file it writes."""
    directory = os.path.join(self._local, "tensorboard")
    before = set(os.listdir(directory)) if os.path.isdir(directory) else set()
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      # A distinct suffix per file: rotations within one second must not share a name.
      writer = SummaryWriter(directory, filename_suffix=f".{time.time_ns()}")
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("TensorBoard events disabled: %s", e)
      return None
    (name,) = set(os.listdir(directory)) - before
    self._event_file = os.path.join(directory, name)
    return writer

  def scalars(self, step: int, values: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    values = {k: float(np.asarray(v)) for k, v in values.items()}
    if self._tb is not None:
      for key, value in values.items():
        self._tb.add_scalar(key, value, step)
    self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
    self.flush()

  def evaluation(self, step: int, values: Mapping[str, Any]) -> None:
    """Sample-quality metrics: one JSON object per evaluation in `eval.jsonl`, and
    TensorBoard scalars `eval/<name>`."""
    if not self.enabled:
      return
    values = {k: float(np.asarray(v)) for k, v in values.items()}
    if self._tb is not None:
      for key, value in values.items():
        self._tb.add_scalar(f"eval/{key}", value, step)
    if self._eval_jsonl is None:
      self._eval_jsonl = _open_log(os.path.join(self._local, "eval.jsonl"))
    self._eval_jsonl.write(json.dumps({"step": step, **values}) + "\n")
    logging.info("evaluation at step %d: %s", step, values)
    self.flush(upload=True)

  def image(self, step: int, name: str, image: np.ndarray) -> None:
    """image: uint8 [H, W, C]."""
    if self.enabled and self._tb is not None:
      self._tb.add_image(name, image, step, dataformats="HWC")

  def flush(self, upload: bool = False) -> None:
    """Write out; copy to a remote workdir if `upload` or `upload_every` seconds have passed."""
    if not self.enabled:
      return
    if self._tb is not None:
      self._tb.flush()
      if self._remote and os.path.getsize(self._event_file) >= self._rotate_bytes:
        self._tb.close()   # complete: uploaded once below, never again
        self._tb = self._event_writer()
        upload = True
    self._jsonl.flush()
    if self._eval_jsonl is not None:
      self._eval_jsonl.flush()
    if upload or time.monotonic() - self._last_upload >= self._upload_every:
      self._upload()

  def _upload(self) -> bool:
    """Copies what changed up; whether every file is up."""
    if not self._remote:
      return True
    self._last_upload = time.monotonic()
    complete = True
    for root, _, files in os.walk(self._local):
      for name in files:
        local = os.path.join(root, name)
        stat = os.stat(local)
        if not stat.st_size or self._uploaded.get(local) == (stat.st_size, stat.st_mtime_ns):
          continue   # empty (an event file just begun) or sent as it is
        target = epath.Path(self._remote) / os.path.relpath(local, self._local)
        try:
          target.parent.mkdir(parents=True, exist_ok=True)
          with open(local, "rb") as f:
            target.write_bytes(f.read())
        except Exception as e:  # pylint: disable=broad-except
          # Storage trouble never stops training: the file is kept locally and sent next time.
          logging.warning("could not copy %s to %s (%s); it is tried again at the next "
                          "upload", local, target, error_line(e))
          complete = False
          continue
        self._uploaded[local] = (stat.st_size, stat.st_mtime_ns)
    return complete

  def close(self) -> None:
    if not self.enabled:
      return
    if self._tb is not None:
      self._tb.close()
    self._jsonl.close()
    if self._eval_jsonl is not None:
      self._eval_jsonl.close()
    if not self._upload():
      logging.warning("logs that could not be copied to %s are kept in %s", self._remote,
                      self._local)
    elif self._remote:
      shutil.rmtree(self._local, ignore_errors=True)
