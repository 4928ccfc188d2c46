"""Measurements: TensorBoard events, a JSONL log and the console, from host 0; MFU."""

import json
import os
import tempfile
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging
from etils import epath

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


class MetricWriter:
  """Scalars and images to TensorBoard (tensorboardX) and scalars to `metrics.jsonl`.

  For a remote workdir (gs://) the files are written locally and copied up at every flush.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._remote = workdir if "://" in workdir else None
    self._local = tempfile.mkdtemp(prefix="hdit-metrics-") if self._remote else workdir
    self._tb = None
    self._jsonl = None
    self._eval_jsonl = None   # opened by the first evaluation
    if enabled:
      os.makedirs(self._local, exist_ok=True)
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
        self._tb = SummaryWriter(os.path.join(self._local, "tensorboard"))
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("TensorBoard events disabled: %s", e)
      self._jsonl = open(os.path.join(self._local, "metrics.jsonl"), "a", encoding="utf-8")

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
      self._eval_jsonl = open(os.path.join(self._local, "eval.jsonl"), "a", encoding="utf-8")
    self._eval_jsonl.write(json.dumps({"step": step, **values}) + "\n")
    logging.info("evaluation at step %d: %s", step, values)
    self.flush()

  def image(self, step: int, name: str, image: np.ndarray) -> None:
    """image: uint8 [H, W, C]."""
    if self.enabled and self._tb is not None:
      self._tb.add_image(name, image, step, dataformats="HWC")

  def flush(self) -> None:
    if not self.enabled:
      return
    if self._tb is not None:
      self._tb.flush()
    self._jsonl.flush()
    if self._eval_jsonl is not None:
      self._eval_jsonl.flush()
    self._upload()

  def _upload(self) -> None:
    if self._remote:
      for root, _, files in os.walk(self._local):
        for name in files:
          local = os.path.join(root, name)
          target = epath.Path(self._remote) / os.path.relpath(local, self._local)
          target.parent.mkdir(parents=True, exist_ok=True)
          target.write_bytes(epath.Path(local).read_bytes())

  def close(self) -> None:
    if not self.enabled:
      return
    if self._tb is not None:
      self._tb.close()
    self._jsonl.close()
    if self._eval_jsonl is not None:
      self._eval_jsonl.close()
    self._upload()
