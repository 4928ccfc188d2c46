"""A damaged newest checkpoint: named in the log, set aside (never deleted), and training goes
on from the newest good one; a checkpoint of another model is refused in one line."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from hdit_jax.training import checkpoint as ckpt_lib
from hdit_jax.training import checkpoint_integrity as integrity
from hdit_jax.training import mesh as mesh_lib
from hdit_jax.training import state as state_lib
from hdit_jax.training import trainer
from hdit_jax.training.validate import ConfigError

ROOT = pathlib.Path(__file__).parent.parent.parent
sys.path.insert(0, str(ROOT / "tests" / "training"))
from test_training import tiny_config  # pylint: disable=wrong-import-position
from tiny_config import cli_xla_flags  # pylint: disable=wrong-import-position

pytestmark = pytest.mark.fault


def _config(steps):
  config = tiny_config(data=1)
  config.training.update(num_steps=steps, checkpoint_every=2, keep_checkpoints=2)
  return config


def _truncate_largest_array_file(step_dir: pathlib.Path) -> None:
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "ocdbt" in str(p)]
  largest = max(files, key=lambda p: p.stat().st_size)
  with open(largest, "r+b") as f:
    f.truncate(largest.stat().st_size // 3)


def _drop_metadata(step_dir: pathlib.Path) -> None:
  (step_dir / "state" / "_METADATA").unlink()


def _flip_bytes(step_dir: pathlib.Path) -> None:
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
  largest = max(files, key=lambda p: p.stat().st_size)
  data = bytearray(largest.read_bytes())
  data[len(data) // 2:len(data) // 2 + 64] = bytes(64)   # zeroed, same length
  largest.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate_largest_array_file, _drop_metadata, _flip_bytes])
def test_restore_falls_back_past_a_damaged_step(tmp_path, damage, caplog):
  config = _config(2)
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
  _, abstract, _, _, init = state_lib.setup(config, mesh, dict(config.sharding_rules))
  state = init()
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), keep=3, asynchronous=False)
  for step in (1, 2):
    state = state.replace(step=state.step + 1,
                          params=jax.tree.map(lambda p: p + 1.0, state.params))
    checkpointer.save(step, state, None)
    if step == 1:
      expected = jax.device_get(state.params)
  damage(tmp_path / "2")
  restored, step = checkpointer.restore_latest_good(abstract, None)
  assert step == 1 and int(restored.step) == 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params), expected)
  assert "checkpoint step 2 in" in caplog.text and "cannot be restored" in caplog.text
  assert (tmp_path / "2.damaged").is_dir() and checkpointer.manager.all_steps() == [1]
  checkpointer.close()


def test_training_goes_on_from_the_newest_good_checkpoint(tmp_path, caplog):
  checkpoints = tmp_path / "checkpoints"
  trainer.train(_config(4), str(tmp_path), jax.devices()[:1])   # checkpoints at steps 2 and 4
  _truncate_largest_array_file(checkpoints / "4")
  state = trainer.train(_config(6), str(tmp_path), jax.devices()[:1])
  assert "checkpoint step 4 in" in caplog.text and "cannot be restored" in caplog.text
  assert "resuming from step 2" in caplog.text
  assert (checkpoints / "4.damaged").is_dir()   # kept for a look, out of the way
  assert int(state.step) == 6
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
  saved = ckpt_lib.Checkpointer(str(checkpoints), keep=2)
  assert saved.manager.all_steps() == [4, 6]   # step 4 trained again, then kept with 6
  saved.close()
  losses = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
  assert losses == [1, 2, 3, 4, 5, 6]   # one line a step, as the run went on
  abandoned = [json.loads(line)["step"] for line in open(tmp_path / "metrics.abandoned.jsonl")]
  assert abandoned == [3, 4]   # the steps of the damaged checkpoint, trained again


def _two_checkpoints(tmp_path, config):
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
  _, abstract, _, _, init = state_lib.setup(config, mesh, dict(config.sharding_rules))
  state = init()
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), keep=3, asynchronous=False)
  for step in (1, 2):
    state = state.replace(step=state.step + 1)
    checkpointer.save(step, state, None)
  return checkpointer, abstract


def test_no_good_checkpoint_is_an_error_naming_every_step(tmp_path):
  checkpointer, abstract = _two_checkpoints(tmp_path, _config(2))
  for step in ("1", "2"):
    _drop_metadata(tmp_path / step)
  with pytest.raises(ckpt_lib.CheckpointError, match=r"can be restored: step 2: .*; step 1: "):
    checkpointer.restore_latest_good(abstract, None)
  assert (tmp_path / "2").is_dir() and (tmp_path / "1").is_dir()   # nothing moved or deleted
  checkpointer.close()


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
  checkpointer, _ = _two_checkpoints(tmp_path, _config(2))
  other = _config(2)
  other.model.widths = (16, 48)
  mesh = mesh_lib.make_mesh(other.mesh, jax.devices()[:1])
  _, abstract, _, _, _ = state_lib.setup(other, mesh, dict(other.sharding_rules))
  with pytest.raises(ConfigError, match=r"another model than this config builds: .*\(.*48\)"):
    checkpointer.restore_latest_good(abstract, None)
  assert checkpointer.manager.all_steps() == [1, 2]   # not set aside: it is not damaged
  checkpointer.close()


@pytest.mark.bad_input
def test_resuming_with_a_changed_width_is_one_line(tmp_path):
  env = dict(os.environ, XLA_FLAGS=cli_xla_flags(),
             JAX_PLATFORMS="cpu")
  base = [sys.executable, "-m", "hdit_jax.main",
          f"--config={ROOT / 'tests' / 'training' / 'tiny_config.py'}", f"--workdir={tmp_path}",
          "--config.training.num_steps=2", "--config.training.sample_every=0"]
  subprocess.run(base, env=env, check=True, capture_output=True, cwd=ROOT, timeout=600)
  result = subprocess.run(base[:-2] + ["--config.training.num_steps=4",
                                       "--config.model.widths=(16,48)"],
                          env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "another model" in errors[0], result.stderr[-2000:]


def test_fingerprints_see_every_element_and_not_the_sharding():
  rng = np.random.default_rng(0)
  tree = {"w": rng.normal(size=(16, 6)).astype(np.float32),
          "h": rng.normal(size=(8,)).astype(jax.numpy.bfloat16),
          "n": np.int32(7), "ok": np.bool_(True)}
  base = integrity.fingerprint(tree)
  assert set(base) == {"w", "h", "n", "ok"}
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(8), ("data",))
  sharded = dict(tree, w=jax.device_put(tree["w"], jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("data"))))
  assert integrity.fingerprint(sharded) == base
  swapped = dict(tree, w=tree["w"][[1, 0, *range(2, 16)]])       # two rows swapped
  zeroed = dict(tree, w=tree["w"].copy())
  zeroed["w"][5, 2] = 0.0
  for changed in (swapped, zeroed, dict(tree, ok=np.bool_(False))):
    differ = {k for k in base if integrity.fingerprint(changed)[k] != base[k]}
    assert len(differ) == 1, differ


def test_a_checkpoint_of_another_optimizer_layout_is_refused(tmp_path):
  checkpointer, _ = _two_checkpoints(tmp_path, _config(2))
  other = _config(2)
  other.optimizer.grad_clip = 0.0   # no clipping: another optimizer state
  mesh = mesh_lib.make_mesh(other.mesh, jax.devices()[:1])
  _, abstract, _, _, _ = state_lib.setup(other, mesh, dict(other.sharding_rules))
  with pytest.raises(ConfigError, match="laid out otherwise than this version"):
    checkpointer.restore_latest_good(abstract, None)
  checkpointer.close()


_KILLED_MID_SAVE = '''
import os, signal, sys
sys.path.insert(0, {training!r})
import jax
from hdit_jax.training import checkpoint as ckpt_lib, trainer
from test_training import tiny_config

real_save = ckpt_lib.Checkpointer.save

def save_then_die(self, step, state, data_iterator):
  started = real_save(self, step, state, data_iterator)
  if step == 4:   # the asynchronous save of step 4 has begun, not finished: die now
    os.kill(os.getpid(), signal.SIGKILL)
  return started

ckpt_lib.Checkpointer.save = save_then_die
config = tiny_config(data=1)
config.training.update(num_steps=6, checkpoint_every=2, keep_checkpoints=3)
trainer.train(config, {workdir!r}, jax.devices()[:1])
'''


def test_sigkill_during_an_async_save_resumes_from_the_previous_checkpoint(tmp_path):
  workdir = tmp_path / "run"
  env = dict(os.environ, XLA_FLAGS=cli_xla_flags())
  script = _KILLED_MID_SAVE.format(training=str(ROOT / "tests" / "training"),
                                   workdir=str(workdir))
  killed = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
  assert killed.returncode == -9, killed.stderr[-3000:]
  entries = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  # Step 4 was being written: what there is of it is not a complete checkpoint.
  assert "2" in entries and "4" not in entries, entries
  assert any(name.startswith("4") for name in entries), entries   # its half-written folder
  reopened = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), keep=3)
  assert reopened.latest_step() == 2
  reopened.close()

  resumed = subprocess.run(
      [sys.executable, "-m", "hdit_jax.main", f"--config={ROOT / 'tests/training/tiny_config.py'}",
       f"--workdir={workdir}", "--config.training.num_steps=6",
       "--config.training.checkpoint_every=2", "--config.training.keep_checkpoints=3"],
      env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  logged = [json.loads(l)["step"] for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert logged == [1, 2, 3, 4, 5, 6]   # steps 3 and 4 trained again after step 2 ...
  abandoned = (workdir / "metrics.abandoned.jsonl").read_text().splitlines()
  assert [json.loads(l)["step"] for l in abandoned] == [3, 4]   # ... their first lines kept
  final = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), keep=3)
  assert final.manager.all_steps() == [2, 4, 6]
  final.close()


def test_resuming_with_another_input_pipeline_is_named_not_taken_for_damage(tmp_path):
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.FLAGS.mark_as_parsed()   # grain's workers read absl flags
  config = _config(2)
  trainer.train(config, str(tmp_path), jax.devices()[:1])
  config.training.num_steps = 4
  config.data.num_workers = 1
  with pytest.raises(ConfigError,
                     match=r"step 2 .* another input pipeline \(Worker count .*data.num_workers"):
    trainer.train(config, str(tmp_path), jax.devices()[:1])
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]   # not set aside


def test_a_checkpoint_with_flat_fused_projections_is_named_as_an_earlier_version():
  from hdit_jax.training.validate import ConfigError  # pylint: disable=import-outside-toplevel
  built = {"params": {"qkv_proj": {"kernel": jax.ShapeDtypeStruct((16, 3, 2, 8), "float32")},
                      "norm": {"scale": jax.ShapeDtypeStruct((16,), "float32")}}}
  flat = {"params.qkv_proj.kernel": (16, 48), "params.norm.scale": (16,)}
  with pytest.raises(ConfigError, match="earlier hdit-jax, whose fused projections were flat"):
    integrity.check_same_model(flat, built, 4, "/ckpt")
  other = {"params.qkv_proj.kernel": (16, 40), "params.norm.scale": (16,)}
  with pytest.raises(ConfigError, match="of another model than this config builds"):
    integrity.check_same_model(other, built, 4, "/ckpt")



def test_a_save_whose_start_fails_is_an_outcome_and_the_next_one_saves(tmp_path, monkeypatch):
  """orbax refuses to begin a save (its directory cannot be made, storage unreachable): the
  save is reported failed with the reason, "latest" stays the last complete step, and the next
  save is complete."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  state = {"w": jnp.arange(6.0), "b": jnp.ones((2, 3))}
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), keep=3)
  assert checkpointer.save(1, state, None)
  assert checkpointer.finished(block=True) == [ckpt_lib.SaveOutcome(1, None)]
  save = checkpointer.manager.save

  def refusing(*args, **kwargs):
    monkeypatch.setattr(checkpointer.manager, "save", save)
    raise PermissionError("[Errno 13] Permission denied: 'checkpoints/2'")
  monkeypatch.setattr(checkpointer.manager, "save", refusing)
  assert not checkpointer.save(2, jax.tree.map(lambda x: x + 1, state), None)
  assert checkpointer.finished(block=True) == [ckpt_lib.SaveOutcome(
      2, "PermissionError: [Errno 13] Permission denied: 'checkpoints/2'")]
  assert checkpointer.latest_step() == 1
  assert checkpointer.save(3, jax.tree.map(lambda x: x + 3, state), None)
  assert checkpointer.finished(block=True) == [ckpt_lib.SaveOutcome(3, None)]
  assert checkpointer.manager.all_steps() == [1, 3]
  checkpointer.close()


def test_every_checkpoint_damaged_is_a_short_report(tmp_path):
  """The loop's one line, not orbax's reads of the damaged arrays (a 34,000-line log of
  unraisable coroutines, asyncio's "never retrieved" and tensorstore's spec dumps)."""
  workdir = tmp_path / "run"
  env = dict(os.environ, XLA_FLAGS=cli_xla_flags())
  command = [sys.executable, "-m", "hdit_jax.main",
             f"--config={ROOT / 'tests/training/tiny_config.py'}", f"--workdir={workdir}",
             "--config.training.checkpoint_every=2", "--config.training.sample_every=0",
             "--config.evaluation.metric="]
  first = subprocess.run(command + ["--config.training.num_steps=4"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  for step in ("2", "4"):
    files = sorted((p for p in (workdir / "checkpoints" / step / "state").rglob("*")
                    if p.is_file() and "/d/" in str(p)), key=lambda p: p.stat().st_size)
    for path in files[len(files) // 2:]:   # the larger half (the arrays' data) cut short; the
      with open(path, "r+b") as f:         # metadata stays readable, so the reads fail
        f.truncate(path.stat().st_size // 3)
  again = subprocess.run(command + ["--config.training.num_steps=6"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
  assert again.returncode == 1
  said = [l for l in again.stderr.splitlines() if l.strip() and not l.startswith("I")]
  assert said[-1].startswith("error: no checkpoint in") and "step 4: " in said[-1], said[-1]
  assert "See full TensorStore details" not in again.stderr
  assert "Traceback" not in again.stderr and "Exception ignored" not in again.stderr
  assert len(said) <= 4, "\n".join(said[:20])   # a warning per step, then the error
