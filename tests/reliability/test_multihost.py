"""Two JAX processes on localhost (4 CPU devices each, gloo collectives) behave as one host with
8 devices: training with per-host data, checkpoint save and restore (resume), sampling and
export through `python -m hdit_jax.main`, against the same run in this 8-device process."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors import numpy as st_numpy

from hdit_jax import main as main_lib
from hdit_jax.sampling import batches
from hdit_jax.training import mesh as mesh_lib
from hdit_jax.training import trainer
from hdit_jax.training import workdir as workdir_lib
from hdit_jax.training.export import ema_path, export_ema

ROOT = pathlib.Path(__file__).parent.parent.parent
TINY = ROOT / "tests" / "training" / "tiny_config.py"
sys.path.insert(0, str(ROOT / "tests" / "training"))
from test_training import tiny_config  # pylint: disable=wrong-import-position
from tiny_config import cli_xla_flags  # pylint: disable=wrong-import-position

pytestmark = pytest.mark.multihost

NUM_IMAGES = 6   # not a multiple of the 8 batch shards: the last batch is padded on both hosts
OVERRIDES = dict(log_every=1, checkpoint_every=2, keep_checkpoints=3)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def on_two_hosts(workdir: pathlib.Path, *args: str) -> list[str]:
  """Runs main on 2 processes of 4 devices each; returns their stdouts."""
  port = free_port()
  flags = cli_xla_flags(devices=4)
  procs = []
  for rank in range(2):
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(rank))
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "hdit_jax.main", f"--config={TINY}", f"--workdir={workdir}",
         *[f"--config.training.{k}={v}" for k, v in OVERRIDES.items()], *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outputs = []
  for rank, proc in enumerate(procs):
    try:
      out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      pytest.fail(f"process {rank} of `main {' '.join(args)}` hung")
    assert proc.returncode == 0, f"process {rank}: {err[-3000:]}"
    outputs.append(out)
  return outputs


def test_two_processes_train_resume_sample_and_export_as_one(tmp_path):
  assert jax.device_count() == 8
  multi = tmp_path / "two_hosts"
  # Two steps, then a second start that restores the step-2 checkpoint (and the data
  # iterators' states) and trains to step 4.
  on_two_hosts(multi, "--config.training.num_steps=2")
  on_two_hosts(multi, "--config.training.num_steps=4")
  on_two_hosts(multi, "--mode=sample", f"--num_images={NUM_IMAGES}")
  outputs = on_two_hosts(multi, "--mode=export")
  said = [[line for line in out.splitlines() if not line.startswith("[Gloo]")] for out in outputs]
  assert said == [[f"wrote {ema_path(str(multi), 4)}"], []]   # host 0 writes, and says so

  # The same run in one process over 8 devices, straight to step 4.
  single = tmp_path / "one_host"
  config = tiny_config()
  config.training.update(num_steps=4, **OVERRIDES)
  trainer.train(config, str(single))
  restored = workdir_lib.restore_ema(config, str(single))
  images, labels = batches.sample_images(restored.model, config, NUM_IMAGES, 0,
                                         mesh=restored.mesh, batch_axes=mesh_lib.BATCH_AXES,
                                         progress=False)
  export_ema(config, restored.model_def, restored.state, ema_path(str(single), 4))

  def losses(workdir):
    return [(r["step"], r["loss"], r["grad_norm"])
            for r in map(json.loads, open(workdir / "metrics.jsonl"))]

  got, want = losses(multi), losses(single)
  assert [r[0] for r in got] == [1, 2, 3, 4] == [r[0] for r in want]
  np.testing.assert_allclose(np.array(got)[:, 1:], np.array(want)[:, 1:], rtol=1e-5)
  assert sorted(p.name for p in (multi / "checkpoints").iterdir()
                if p.name.isdigit()) == ["2", "4"]
  exported = st_numpy.load_file(ema_path(str(multi), 4))
  reference = st_numpy.load_file(ema_path(str(single), 4))
  assert exported.keys() == reference.keys()
  for key in reference:
    np.testing.assert_allclose(exported[key], reference[key], rtol=1e-5, atol=1e-6,
                               err_msg=key)
  drawn = np.load(multi / "samples" / "samples_00000004.npz")
  assert drawn["arr_0"].shape == images.shape
  np.testing.assert_array_equal(drawn["arr_1"], labels)
  assert np.abs(drawn["arr_0"].astype(int) - images.astype(int)).max() <= 1
  assert len(np.unique(drawn["arr_0"].reshape(NUM_IMAGES, -1), axis=0)) == NUM_IMAGES


@pytest.mark.parametrize("env, joins", [
    ({}, False),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, True),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1"}, True),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, False),
])
def test_initialize_distributed_never_falls_back_to_independent_runs(monkeypatch, env, joins):
  """A failure to join is an error wherever the environment announces several processes."""
  for name in ("SLURM_JOB_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
               "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES"):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)

  def cannot_join(**kwargs):
    raise RuntimeError("no coordinator answered")

  monkeypatch.setattr(jax.distributed, "initialize", cannot_join)
  if joins:
    with pytest.raises(RuntimeError, match="no coordinator"):
      main_lib.initialize_distributed()
  else:
    main_lib.initialize_distributed()   # one host: logged, not an error
