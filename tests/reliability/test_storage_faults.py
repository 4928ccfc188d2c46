"""Storage faults on gs://, through the local GCS emulator behind a fault-injecting proxy
(tests/gcs_faults.py): a short outage is retried; a save whose writes keep failing fails alone,
named in the log, while training goes on and saves next time, or stops with the reason, as
configured; "latest" is never an incomplete step; the metrics never stop a run; an unreachable
bucket fails within a bounded time."""

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest
from etils import epath

from hdit_jax.training import checkpoint as ckpt_lib
from hdit_jax.training import mesh as mesh_lib
from hdit_jax.training import metrics
from hdit_jax.training import state as state_lib

TRAINING = pathlib.Path(__file__).parent.parent / "training"
sys.path.insert(0, str(TRAINING))
from tiny_config import cli_xla_flags, get_config  # pylint: disable=wrong-import-position

pytestmark = [pytest.mark.gcs, pytest.mark.fault]


def _main(workdir: str, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
  command = [sys.executable, "-m", "hdit_jax.main", f"--config={TRAINING / 'tiny_config.py'}",
             f"--workdir={workdir}", "--config.training.checkpoint_ocdbt=False", *overrides]
  # The proxy's address reaches the run through the GCS variables the fixture set.
  env = dict(os.environ, XLA_FLAGS=cli_xla_flags(), PYTHONUNBUFFERED="1")
  return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def _array_writes(step: int):
  """tensorstore's uploads of a checkpoint step's arrays (gcsfs's metadata writes pass: they
  take about 30 s of gcsfs's own retries to fail)."""
  return lambda r: (f"checkpoints/{step}/state/" in r.url and r.method in ("POST", "PUT")
                    and r.user_agent.startswith("tensorstore"))


def _objects(prefix: str) -> list[str]:
  import gcsfs  # pylint: disable=import-outside-toplevel
  storage = gcsfs.GCSFileSystem()
  storage.invalidate_cache()
  return sorted(storage.find(prefix))


def _restore_latest_good(directory: str):
  config = get_config()
  config.mesh.update(data=1)
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
  _, abstract, _, _, _ = state_lib.setup(config, mesh, dict(config.sharding_rules))
  checkpointer = ckpt_lib.Checkpointer(directory, keep=10, use_ocdbt=False, create=False)
  try:
    return checkpointer.manager.all_steps(), checkpointer.restore_latest_good(abstract, None)
  finally:
    checkpointer.close()


def _the_error_line(run: subprocess.CompletedProcess) -> str:
  """The one `error:` line of a run that stopped (exit 1) without a traceback."""
  assert run.returncode == 1, run.stderr[-3000:]
  assert "Traceback" not in run.stderr
  (line,) = [line for line in run.stderr.splitlines() if line.startswith("error:")]
  return line


def test_an_outage_is_retried_and_a_failing_save_fails_alone(faulty_gcs):
  bucket, proxy = faulty_gcs
  workdir = f"{bucket}/run"
  # Step 2: the storage goes away for 0.3 s at its first array write (tensorstore's retry, a
  # second later, finds it back: the save completes).
  proxy.fail(_array_writes(2), how="outage", seconds=0.3, times=1)
  # Step 4: every array write is refused (503) for good: the save fails after its retries.
  proxy.fail(_array_writes(4), status=503)
  # Saves at steps 2, 4, 6 and the last, 7 (each a few hundred requests to the emulator).
  run = _main(workdir, "--config.training.num_steps=7", "--config.training.checkpoint_every=2",
              "--config.training.keep_checkpoints=3", "--config.training.checkpoint_retries=1",
              "--config.training.max_consecutive_checkpoint_failures=1")
  assert run.returncode == 0, run.stderr[-3000:]
  assert "Traceback" not in run.stderr

  # The outage was retried: a write of step 2 was cut off, and every object was written after.
  outcomes = proxy.outcomes(_array_writes(2))
  assert "outage" in outcomes and outcomes[-1] == "passed", outcomes
  # Step 4's writes were refused (a try and a retry each), and the run said so and went on.
  assert proxy.outcomes(_array_writes(4)).count("error 503") >= 2
  warnings = [line for line in run.stderr.splitlines()
              if "checkpoint step 4 could not be saved" in line]
  assert len(warnings) == 1 and "503" in warnings[0] and "training goes on" in warnings[0]
  assert "newest complete checkpoint, step 2, is intact" in warnings[0]
  assert not any("could not be saved" in line for line in run.stderr.splitlines()
                 if "step 4" not in line)

  # The failure is counted in the metrics from the log step after it was seen (at step 6's save).
  lines = [json.loads(x) for x in
           (epath.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  assert [x["step"] for x in lines] == list(range(1, 8))
  assert lines[0]["checkpoint_failures_total"] == 0
  assert lines[-1]["checkpoint_failures_total"] == 1

  # Keep-last-3 counts complete steps only: step 4 never took step 2's place; the newest
  # restores with its fingerprint verified.
  steps, (state, step) = _restore_latest_good(f"{workdir}/checkpoints")
  assert steps == [2, 6, 7] and step == 7 and int(state.step) == 7
  # The EMA weights of the last step were exported.
  assert (epath.Path(workdir) / "ema_00000007.safetensors").exists()

  # The next start removes the remains of the failed save (a step directory without its commit
  # marker) and, with saves failing again and no failure allowed, stops with the reason.
  assert _objects(f"{workdir}/checkpoints/4")
  proxy.clear()
  proxy.fail(_array_writes(8), status=503)
  halted = _main(workdir, "--config.training.num_steps=12",
                 "--config.training.checkpoint_every=2", "--config.training.keep_checkpoints=3",
                 "--config.training.checkpoint_retries=1",
                 "--config.training.max_consecutive_checkpoint_failures=0")
  line = _the_error_line(halted)
  assert "checkpoint step 8 could not be saved" in line and "503" in line
  assert "max_consecutive_checkpoint_failures = 0" in line
  assert "newest complete checkpoint, step 7, is intact" in line
  assert not _objects(f"{workdir}/checkpoints/4")
  steps, (_, step) = _restore_latest_good(f"{workdir}/checkpoints")
  assert steps == [2, 6, 7] and step == 7   # it stopped before saving anything else


def test_the_last_save_failing_stops_the_run_with_the_reason(faulty_gcs):
  bucket, proxy = faulty_gcs
  workdir = f"{bucket}/last"
  proxy.fail(_array_writes(4), status=503)
  run = _main(workdir, "--config.training.num_steps=4", "--config.training.checkpoint_every=2",
              "--config.training.checkpoint_retries=1",
              "--config.training.max_consecutive_checkpoint_failures=5")
  line = _the_error_line(run)
  assert "checkpoint step 4 could not be saved" in line and "it was the run's last" in line
  assert "newest complete checkpoint, step 2, is intact" in line
  steps, (_, step) = _restore_latest_good(f"{workdir}/checkpoints")
  assert steps == [2] and step == 2


def test_metric_uploads_survive_storage_errors(faulty_gcs, caplog, tmp_path, monkeypatch):
  bucket, proxy = faulty_gcs
  workdir = f"{bucket}/logs"
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))   # where the local copies go
  writer = metrics.MetricWriter(workdir, upload_every=0)
  # 403 is not retried by gcsfs: each upload of the log fails at once, twice.
  refused = proxy.fail(lambda r: "logs/metrics.jsonl" in r.url and r.method == "POST",
                       status=403, times=2)
  with caplog.at_level("WARNING"):
    writer.scalars(1, {"loss": np.float32(1.0)})
    writer.scalars(2, {"loss": np.float32(0.5)})
  assert refused.hits == 2
  assert sum("could not copy" in r.getMessage() for r in caplog.records) == 2
  assert not (epath.Path(workdir) / "metrics.jsonl").exists()
  writer.scalars(3, {"loss": np.float32(0.25)})   # the storage answers again: all lines arrive
  writer.close()
  lines = [json.loads(x) for x in (epath.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  assert [(x["step"], x["loss"]) for x in lines] == [(1, 1.0), (2, 0.5), (3, 0.25)]
  assert not list(tmp_path.glob("hdit-metrics-*"))   # all up: the local copies are gone


def test_metrics_that_could_not_be_copied_are_kept_locally(faulty_gcs, caplog, tmp_path,
                                                          monkeypatch):
  bucket, proxy = faulty_gcs
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  writer = metrics.MetricWriter(f"{bucket}/kept", upload_every=3600)
  writer.scalars(1, {"loss": np.float32(1.0)})
  refused = proxy.fail(lambda r: "kept/metrics.jsonl" in r.url and r.method == "POST",
                       status=403, times=1)
  with caplog.at_level("WARNING"):
    writer.close()   # its one upload fails
  assert refused.hits == 1
  (local,) = tmp_path.glob("hdit-metrics-*")
  assert (local / "metrics.jsonl").read_text().startswith('{"step": 1')
  assert any("are kept in" in r.getMessage() and str(local) in r.getMessage()
             for r in caplog.records)


@pytest.mark.bad_input
def test_an_unreachable_bucket_fails_within_a_bounded_time(tmp_path, monkeypatch):
  # Nothing listens on the emulator's address: every request is refused, and gcsfs retries.
  import socket  # pylint: disable=import-outside-toplevel
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  for name in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL",
               "CLOUD_STORAGE_EMULATOR_ENDPOINT"):
    monkeypatch.setenv(name, f"http://127.0.0.1:{port}")
  monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
  monkeypatch.chdir(tmp_path)
  start = time.monotonic()
  run = _main("gs://hdit-test/run", "--storage_timeout=5", timeout=120)
  elapsed = time.monotonic() - start
  line = _the_error_line(run)
  assert "gs://hdit-test/run did not answer within 5 s" in line
  assert f"127.0.0.1:{port}" in line   # the last error names what could not be reached
  assert elapsed < 45, elapsed        # JAX's start-up, then 5 s (gcsfs alone: about a minute)
  assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("orbax_raises", [True, False])
def test_one_refused_array_fails_that_save_alone(faulty_gcs, monkeypatch, orbax_raises):
  """One array's writes refused, the others written: the save fails, named, and the next one
  is complete. Without `orbax_raises`, orbax's wait swallows the error (as its background
  finalisation does with some failures, leaving the step uncommitted): the Checkpointer reads
  storage, not orbax's word, and names the error orbax logged."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  bucket, proxy = faulty_gcs
  directory = f"{bucket}/quiet/checkpoints"
  state = {f"w{i}": jnp.arange(8.0) + i for i in range(6)}
  checkpointer = ckpt_lib.Checkpointer(directory, keep=3, use_ocdbt=False, retries=0)
  if not orbax_raises:
    wait = checkpointer.manager.wait_until_finished

    def swallowing_wait():
      try:
        wait()
      except Exception:  # pylint: disable=broad-except
        pass
    monkeypatch.setattr(checkpointer.manager, "wait_until_finished", swallowing_wait)
  assert checkpointer.save(1, state, None)
  assert checkpointer.finished(block=True) == [ckpt_lib.SaveOutcome(1, None)]
  proxy.fail(lambda r: "checkpoints/2/state/w3/" in r.url and r.method in ("POST", "PUT")
             and r.user_agent.startswith("tensorstore"), status=503)
  assert checkpointer.save(2, state, None)
  (outcome,) = checkpointer.finished(block=True)
  assert outcome.step == 2 and outcome.error is not None, outcome
  assert "w3/.zarray" in outcome.error and "injected fault" in outcome.error, outcome
  assert ("not committed" in outcome.error) == (not orbax_raises), outcome
  assert checkpointer.manager.all_steps() == [1]
  proxy.clear()
  assert checkpointer.save(3, state, None)
  assert checkpointer.finished(block=True) == [ckpt_lib.SaveOutcome(3, None)]
  checkpointer.close()
