"""Two JAX processes on localhost (4 CPU devices each, gloo collectives) behave as one host with
8 devices: training with per-host data, checkpoint save and restore (resume), sampling and
export through `python -m hdit_jax.main`, against the same run in this 8-device process."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile

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
  ran = _run_two_processes(
      lambda rank: [sys.executable, "-m", "hdit_jax.main", f"--config={TINY}",
                    f"--workdir={workdir}",
                    *[f"--config.training.{k}={v}" for k, v in OVERRIDES.items()], *args],
      dict(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2"),
      f"`main {' '.join(args)}`", timeout=600)
  for rank, (status, _, err) in enumerate(ran):
    assert status == 0, f"process {rank}: {err[-3000:]}"
  return [out for _, out, _ in ran]


def _run_two_processes(command, env: dict[str, str], what: str,
                       timeout: int) -> list[tuple[int, str, str]]:
  """(exit status, stdout, stderr) of `command(rank)` run as JAX processes 0 and 1 at once, 4
  CPU devices each; a process that outlives `timeout` fails the test."""
  # Output to files, not pipes: while the test waits on one process, the other's full pipe
  # would block it, and with it the first in their next collective.
  outputs = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in range(2)]
  procs = [subprocess.Popen(
      command(rank), cwd=ROOT, stdout=outputs[rank][0], stderr=outputs[rank][1], text=True,
      env=dict(os.environ, XLA_FLAGS=cli_xla_flags(devices=4), JAX_PLATFORMS="cpu",
               JAX_PROCESS_ID=str(rank), **env))
           for rank in range(2)]
  ran = []
  for rank, proc in enumerate(procs):
    try:
      proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      pytest.fail(f"process {rank} of {what} hung")
    texts = []
    for f in outputs[rank]:
      f.seek(0)
      texts.append(f.read())
      f.close()
    ran.append((proc.returncode, *texts))
  return ran


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
  drawn = np.load(multi / "samples" / "samples_00000004_seed0.npz")
  assert drawn["arr_0"].shape == images.shape
  np.testing.assert_array_equal(drawn["arr_1"], labels)
  assert np.abs(drawn["arr_0"].astype(int) - images.astype(int)).max() <= 1
  assert len(np.unique(drawn["arr_0"].reshape(NUM_IMAGES, -1), axis=0)) == NUM_IMAGES


def _checkpoints_on_two_hosts(directory: pathlib.Path, scenario: str,
                              failing: int = 1) -> list[dict]:
  """Runs two_host_checkpoints.py on 2 processes; per host: its exit status, the stages it
  reported and its `error:` lines."""
  port = free_port()
  script = pathlib.Path(__file__).parent / "two_host_checkpoints.py"
  ran = _run_two_processes(
      lambda rank: [sys.executable, str(script), str(directory), str(port), str(rank), scenario,
                    str(failing)], {}, f"scenario {scenario}", timeout=120)
  hosts = []
  for status, out, err in ran:
    assert "Traceback" not in err, err[-3000:]
    hosts.append(dict(status=status,
                      stages=[json.loads(line) for line in out.splitlines()
                              if line.startswith("{")],
                      errors=[line for line in err.splitlines() if line.startswith("error:")]))
  return hosts


def _restored(hosts: list[dict]) -> list[tuple[int, float]]:
  assert [h["status"] for h in hosts] == [0, 0], hosts
  return [(h["stages"][-1]["step"], h["stages"][-1]["w0"]) for h in hosts]


def test_checkpoint_failures_on_one_host_never_split_or_hang_the_hosts(tmp_path):
  """Saves and restores that fail inside orbax on both hosts or on one: the hosts agree on each
  outcome through the coordination service, never through a collective that could pair with
  one of orbax's barriers (gloo aborts the job on such a mismatch; an accelerator would hang).
  A host whose failure leaves the other waiting inside orbax stops the job with the reason
  within its timeout (10 s here), and the next start resumes from the newest good checkpoint."""
  first = tmp_path / "a"
  hosts = _checkpoints_on_two_hosts(first, "agree")
  assert [h["status"] for h in hosts] == [0, 0], hosts
  for host in hosts:
    stages = {stage["stage"]: stage for stage in host["stages"]}
    # Storage refuses step 2 on both hosts: a failed save, named, and the next one is complete.
    assert stages["start failed"]["started"] is False and stages["start failed"]["latest"] == 1
    (step, error), = stages["start failed"]["outcomes"]
    assert step == 2 and "storage refused the step" in error
    assert stages["saved"]["outcomes"] == [[3, None]]
    # Host 1's stale listing lacks step 4: both restore step 3, the newest both list; step 4
    # is set aside (kept) and saved again on both.
    assert (stages["restored"]["step"], stages["restored"]["w0"]) == (3, 3.0)
    assert stages["saved again"] == dict(stage="saved again", outcomes=[[4, None]],
                                         steps=[1, 3, 4])
  # Host 1 cannot list the directory after step 4: the save counts as failed on both hosts.
  seen = [h["stages"][3]["outcomes"] for h in hosts]
  assert seen[0] == [[4, "it was not committed on another host"]], seen
  assert seen[1][0][0] == 4 and "listing refused" in seen[1][0][1], seen
  assert sorted(p.name for p in first.iterdir()) == ["1", "3", "4", "4.unlisted"]

  # Step 2's save fails inside orbax on one host, while the other waits in orbax's next
  # barrier for it: the failing host stops the job, and the other stops with its reason.
  # Where that is host 0, which runs the coordination service, the other ends with JAX's own
  # error (its coordination service is gone).
  for failing in (1, 0):
    directory = tmp_path / f"fails_on_{failing}"
    hosts = _checkpoints_on_two_hosts(directory, "strand_save", failing)
    assert hosts[failing]["status"] == 1 and hosts[1 - failing]["status"] != 0, hosts
    (line,) = hosts[failing]["errors"]
    assert (f"checkpoint step 2 could not be started on host {failing} (OSError: injected: the "
            "step's directory cannot be made)") in line
    assert "newest complete checkpoint, step 1, is intact" in line
    if failing == 1:
      assert hosts[0]["errors"] == [line.replace("error: ", "error: the job was stopped by "
                                                 "host 1: ")], hosts
    assert _restored(_checkpoints_on_two_hosts(directory, "resume")) == [(1, 0.0), (1, 0.0)]

  # Step 4 reads on host 0 but not on host 1: host 1 moves it aside and stops the job; the
  # next start restores step 3 on both.
  hosts = _checkpoints_on_two_hosts(first, "strand_restore")
  assert [h["status"] for h in hosts] == [1, 1], hosts
  (line,) = hosts[1]["errors"]
  assert "step 4" in line and "cannot be restored on host 1" in line and "shard" in line
  assert f"moved to {first / '4.damaged'}" in line
  assert hosts[0]["errors"] == [line.replace("error: ", "error: the job was stopped by host 1: ")]
  assert sorted(p.name for p in first.iterdir()) == ["1", "3", "4.damaged", "4.unlisted"]
  assert _restored(_checkpoints_on_two_hosts(first, "resume")) == [(3, 3.0), (3, 3.0)]


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
