"""Measurements: MFU arithmetic and metric files for local and remote workdirs."""

from unittest import mock

from hdit_jax.training import metrics


def test_peak_flops_and_train_flops():
  device = mock.Mock(device_kind="NVIDIA H100 80GB HBM3")
  assert metrics.peak_flops(device) == 989e12
  assert metrics.peak_flops(mock.Mock(device_kind="TPU v5 lite")) == 197e12
  assert metrics.peak_flops(mock.Mock(device_kind="cpu")) is None
  assert metrics.peak_flops(device, override_tflops=100) == 100e12
  assert metrics.train_flops_per_image(197.6) == 6 * 197.6e9
