"""Measurements: TensorBoard events, a JSONL log and the console, from host 0; MFU."""

import json
import os
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging

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
  """Scalars and images to TensorBoard (tensorboardX) and scalars to `metrics.jsonl`."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    if enabled:
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("TensorBoard events disabled: %s", e)
      if "://" not in workdir:
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")

  def scalars(self, step: int, values: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    values = {k: float(np.asarray(v)) for k, v in values.items()}
    if self._tb is not None:
      for key, value in values.items():
        self._tb.add_scalar(key, value, step)
    if self._jsonl is not None:
      self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
      self._jsonl.flush()

  def image(self, step: int, name: str, image: np.ndarray) -> None:
    """image: uint8 [H, W, C]."""
    if self.enabled and self._tb is not None:
      self._tb.add_image(name, image, step, dataformats="HWC")

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
    if self._jsonl is not None:
      self._jsonl.close()
