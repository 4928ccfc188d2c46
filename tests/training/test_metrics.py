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


def test_a_resumed_log_drops_the_steps_that_run_again(tmp_path):
  import json  # pylint: disable=import-outside-toplevel
  from hdit_jax.training import metrics  # pylint: disable=import-outside-toplevel
  log = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)]
  (tmp_path / "metrics.jsonl").write_text("\n".join(log) + '\n{"step": 6, "lo')   # torn
  (tmp_path / "eval.jsonl").write_text('{"step": 2, "fid": 9.0}\n{"step": 4, "fid": 7.0}\n')
  writer = metrics.MetricWriter(str(tmp_path), resume_step=3)
  writer.scalars(4, {"loss": 0.5})
  writer.close()
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert lines[:3] == log[:3] and lines[3] == '{"step": 6, "lo'   # a torn line is kept
  assert json.loads(lines[4]) == {"step": 4, "loss": 0.5} and len(lines) == 5
  assert (tmp_path / "metrics.abandoned.jsonl").read_text().splitlines() == log[3:]
  assert (tmp_path / "eval.jsonl").read_text() == '{"step": 2, "fid": 9.0}\n'
  assert json.loads((tmp_path / "eval.abandoned.jsonl").read_text()) == {"step": 4, "fid": 7.0}
  again = metrics.MetricWriter(str(tmp_path), resume_step=4)   # nothing later: untouched
  again.close()
  assert (tmp_path / "metrics.jsonl").read_text().splitlines() == lines
