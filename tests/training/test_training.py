"""Training: sharded steps, checkpoints, resume after preemption, loss, invalid configs."""

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from hdit_jax.evaluation import digits
from hdit_jax.training import checkpoint as ckpt_lib
from hdit_jax.training import mesh as mesh_lib
from hdit_jax.training import state as state_lib
from hdit_jax.training.step import make_train_step

HERE = pathlib.Path(__file__).parent
ROOT = HERE.parent.parent


def load_config(path: pathlib.Path, arg=None):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def tiny_config(**mesh):
  config = load_config(HERE / "tiny_config.py")
  config.mesh.update(**mesh)
  return config


def random_batch(config, n, seed=0):
  rng = np.random.default_rng(seed)
  h, w = config.model.input_size
  return dict(image=rng.uniform(-1, 1, (n, h, w, config.model.input_channels)).astype(np.float32),
              label=rng.integers(0, 10, n).astype(np.int32),
              aug_cond=rng.normal(size=(n, 9)).astype(np.float32))


def run_steps(config, devices, steps=3):
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  model_def, _, shardings, tx, init = state_lib.setup(config, mesh, dict(config.sharding_rules))
  state = init()
  step = jax.jit(make_train_step(config, model_def, tx, 1),
                 in_shardings=(shardings, mesh_lib.batch_sharding(mesh),
                               mesh_lib.replicated(mesh)),
                 out_shardings=(shardings, None), donate_argnums=0)
  batch = jax.device_put(random_batch(config, 16), mesh_lib.batch_sharding(mesh))
  measured = []
  for _ in range(steps):
    state, metrics = step(state, batch, jax.random.key(3))
    # Block every step (2-core deadlock trap).
    measured.append((float(metrics["loss"]), float(metrics["grad_norm"])))
  return state, np.array(measured)


def test_sharded_step_equals_single_device():
  assert jax.device_count() == 8
  config = tiny_config(data=1, fsdp=1, tensor=1)
  config.training.grad_accum_steps = 2
  single, single_measured = run_steps(config, jax.devices()[:1])
  config.mesh.update(data=2, fsdp=2, tensor=2)
  sharded, sharded_measured = run_steps(config, jax.devices())
  # Losses and gradient norms: Adam's update is invariant to the gradient's scale, the norm is
  # not (a missing or doubled cross-device mean shows here).
  np.testing.assert_allclose(sharded_measured, single_measured, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  # Parameters and their Adam moments carry the intended shardings.
  kernel = sharded.params["down_levels"][0][0]["ff"]["up_proj"]["kernel"][...]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", None, "tensor")
  ema = sharded.ema["down_levels"][0][0]["ff"]["up_proj"]["kernel"][...]
  assert ema.sharding.spec == kernel.sharding.spec
  moments = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(sharded.opt_state)[0]
             if "up_proj" in jax.tree_util.keystr(path) and "down_levels" in
             jax.tree_util.keystr(path) and leaf.ndim == 3]
  assert moments and all(m.sharding.spec == kernel.sharding.spec for m in moments)


def test_a_tensor_split_keeps_heads_and_geglu_pairs_whole():
  """With mesh.tensor = 2 a device holds the q, k and v of its heads (the official weight's
  rows h*d_head.. in each third) and the value and gate of its hidden units, in every level."""
  from hdit_jax import convert  # pylint: disable=import-outside-toplevel
  config = tiny_config(data=2, fsdp=2, tensor=2)
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices())
  model_def, _, _, _, init = state_lib.setup(config, mesh, dict(config.sharding_rules))
  state = init()
  torch = convert.model_to_state_dict(model_def.merge(state.params, state.buffers))
  checked = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]:
    name = ".".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path)
    name = name.removesuffix(".value")
    if not name.endswith(("qkv_proj.kernel", "up_proj.kernel")) or "mapping" in name:
      continue
    weight = torch[name.replace(".kernel", ".weight")]   # [out, in]
    d_in = leaf.shape[0]
    whole = weight.T.reshape((d_in,) + leaf.shape[1:])   # [in, 3|2, (heads, d_head)|d_ff]
    assert leaf.sharding.spec[1] is None, name   # q|k|v or value|gate never split
    for shard in leaf.addressable_shards:
      split = shard.index[2]
      width = leaf.shape[2] // 2
      assert split.stop - split.start == width, (name, shard.index)   # half the heads / units
      np.testing.assert_array_equal(np.asarray(shard.data), whole[shard.index[0], :, split])
    checked += 1
  assert checked == 2 * 3   # qkv and GEGLU in the down, middle and up levels


def test_gradient_accumulation_equals_large_batch():
  config = tiny_config(data=1, fsdp=1, tensor=1)
  config.model.dropout_rate = (0.0, 0.0)
  one, one_measured = run_steps(config, jax.devices()[:1], steps=2)
  config.training.grad_accum_steps = 4
  four, four_measured = run_steps(config, jax.devices()[:1], steps=2)
  # The mean over microbatches, not their sum: the gradient norm tells (Adam would not).
  np.testing.assert_allclose(four_measured, one_measured, rtol=1e-5)
  assert one_measured[0, 1] > 0
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(four.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_save_restore_identical_and_onto_another_mesh(tmp_path):
  config = tiny_config(data=8, fsdp=1, tensor=1)
  state, _ = run_steps(config, jax.devices(), steps=2)
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), keep=2)
  checkpointer.save(2, state, None)
  checkpointer.wait()
  for mesh_axes in (dict(data=8, fsdp=1, tensor=1), dict(data=2, fsdp=2, tensor=2),
                    dict(data=1, fsdp=1, tensor=1)):
    config.mesh.update(**mesh_axes)
    devices = jax.devices()[:1] if mesh_axes["data"] == 1 and mesh_axes["fsdp"] == 1 and \
        mesh_axes["tensor"] == 1 else jax.devices()
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    _, abstract, shardings, _, _ = state_lib.setup(config, mesh, dict(config.sharding_rules))
    restored = checkpointer.restore(abstract, None)
    for a, b, s in zip(jax.tree.leaves(state), jax.tree.leaves(restored),
                       jax.tree.leaves(shardings)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
      assert b.sharding.is_equivalent_to(s, b.ndim)
  checkpointer.close()


def test_quickstart_learns_digits(tmp_path, digit_classifier_dir):
  """The README's first command with the quickstart's own recipe, shortened: its loss falls and
  its class-conditional samples become the digits asked for (chance is 0.1), with every
  artefact of a run written and a closing line that says where."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  shutil.copy(digit_classifier_dir / digits.FILENAME, workdir / digits.FILENAME)
  overrides = dict(training=dict(num_steps=500, log_every=50, checkpoint_every=1000,
                                 sample_every=500, num_sample_images=20, profile_steps="(5,2)"),
                   sampling=dict(steps=4), evaluation=dict(num_samples=300, steps=10, every=250))
  flags = [f"--config.{section}.{key}={value}" for section, values in overrides.items()
           for key, value in values.items()]
  # One CPU device, as a user's run has (the tests' 8 fake devices slow the step by a third).
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-m", "hdit_jax.main", "--config=configs/quickstart.py",
       f"--workdir={workdir}", *flags], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=1200)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"trained to step 500: EMA weights {workdir / 'ema_00000500.safetensors'}" in result.stdout
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  losses = [r["loss"] for r in records]
  assert len(losses) == 10
  assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:2]), losses
  assert (workdir / "samples" / "samples_00000500.png").exists()
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert (workdir / "ema_00000500.safetensors").exists()
  assert list((workdir / "profile").rglob("*.xplane.pb"))
  assert all(k in records[-1] for k in ("grad_norm", "lr", "images_per_second",
                                        "tflops_per_device", "step_time"))
  # The digit metric at step 250 and at the last: accuracy and FD improve with training (measured
  # on a 2-core CPU: FD 114 -> 49, accuracy 0.21 -> 0.35 from step 200 to 500).
  evaluations = [json.loads(line) for line in open(workdir / "eval.jsonl")]
  assert [e["step"] for e in evaluations] == [250, 500]
  first, last = evaluations
  assert last["digits_class_accuracy"] >= 0.25, evaluations
  assert last["digits_class_accuracy"] > first["digits_class_accuracy"] + 0.05, evaluations
  assert last["digits_fd"] < 0.75 * first["digits_fd"], evaluations
  # One class per column: the grid's rows are 0 .. 9.
  rows = (workdir / "samples" / "samples_00000500.labels.txt").read_text().splitlines()
  assert rows == [" ".join(str(c) for c in range(10))] * 2



def test_the_dit_baseline_trains_samples_and_is_scored(tmp_path, digit_classifier_dir):
  """The training loop with a DiT, which has no dropout to switch off for sampling."""
  from hdit_jax.config import dit_model  # pylint: disable=import-outside-toplevel
  from hdit_jax.training import trainer  # pylint: disable=import-outside-toplevel
  config = tiny_config(data=1)
  config.model = dit_model(depth=1, width=32, num_heads=2, patch_size=2, input_size=(16, 16),
                           input_channels=1, num_classes=10, dtype="float32")
  config.training.update(num_steps=2, checkpoint_every=2, sample_every=2)
  config.evaluation.update(metric="digits", num_samples=8, steps=2, batch_size=8)
  shutil.copy(digit_classifier_dir / digits.FILENAME, tmp_path / digits.FILENAME)
  trainer.train(config, str(tmp_path), jax.devices()[:1])
  scored = [json.loads(line) for line in open(tmp_path / "eval.jsonl")]
  assert [e["step"] for e in scored] == [2] and 0 <= scored[0]["digits_class_accuracy"] <= 1
  assert (tmp_path / "samples" / "samples_00000002.png").exists()


def test_deterministic_merge_switches_dropout_off():
  config = tiny_config(data=1)   # dropout 0.1 in its second level
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
  model_def, _, _, _, init = state_lib.setup(config, mesh, dict(config.sharding_rules))
  state = init()
  # Perturbed, so that the zero-initialised output projection lets dropout show.
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(5), p.shape),
                        state.params)
  batch = random_batch(config, 4)
  x, sigma = jax.numpy.asarray(batch["image"]), jax.numpy.full((4,), 2.0)
  label = jax.numpy.asarray(batch["label"])

  def output(seed, deterministic):
    model = model_def.merge(params, state.buffers, jax.random.key(seed), deterministic)
    return np.asarray(model(x, sigma, class_cond=label))

  np.testing.assert_array_equal(output(0, True), output(1, True))
  assert not np.allclose(output(0, False), output(1, False))


def test_a_nonfinite_step_is_skipped_and_counted():
  config = tiny_config(data=1)
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
  model_def, _, shardings, tx, init = state_lib.setup(config, mesh, dict(config.sharding_rules))
  step = jax.jit(make_train_step(config, model_def, tx, 1), donate_argnums=0)
  good = random_batch(config, 16)
  poisoned = dict(good, image=good["image"].copy())
  poisoned["image"][3, 5, 7, 0] = np.nan
  state, key = init(), jax.random.key(0)
  state, first = step(state, good, key)
  before = jax.device_get((state.params, state.ema, state.opt_state.inner_state))
  state, bad = step(state, poisoned, key)
  assert not np.isfinite(float(bad["loss"]))
  assert (int(bad["nonfinite_consecutive"]), int(bad["nonfinite_total"])) == (1, 1)
  # Parameters and Adam moments are left as they were; the EMA moves toward those parameters.
  after = jax.device_get((state.params, state.opt_state.inner_state))
  jax.tree.map(np.testing.assert_array_equal, after, (before[0], before[2]))
  state, third = step(state, good, key)
  assert (int(third["nonfinite_consecutive"]), int(third["nonfinite_total"])) == (0, 1)
  assert int(first["nonfinite_total"]) == 0 and int(state.step) == 3
  for tree in (state.params, state.ema):
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree))
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), jax.device_get(state.params),
                         before[0])
  assert any(jax.tree.leaves(changed))


def test_uint8_batches_are_scaled_on_the_device():
  config = tiny_config(data=1)
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
  model_def, _, _, tx, init = state_lib.setup(config, mesh, dict(config.sharding_rules))
  step = jax.jit(make_train_step(config, model_def, tx, 1))
  batch = random_batch(config, 16, seed=4)
  pixels = np.random.default_rng(4).integers(0, 256, batch["image"].shape, dtype=np.uint8)
  state = init()
  # Perturbed, so that the zero-initialised output projection lets the input show.
  state = state.replace(params=jax.tree.map(lambda p: p + 0.05, state.params))
  _, as_uint8 = step(state, dict(batch, image=pixels), jax.random.key(1))
  _, as_float = step(state, dict(batch, image=pixels.astype(np.float32) / 127.5 - 1),
                     jax.random.key(1))
  _, other = step(state, dict(batch, image=np.flip(pixels, 1).astype(np.float32) / 127.5 - 1),
                  jax.random.key(1))
  np.testing.assert_allclose(float(as_uint8["loss"]), float(as_float["loss"]), rtol=1e-6)
  assert abs(float(other["loss"]) - float(as_float["loss"])) > 1e-4 * float(as_float["loss"])


def _poison_third_batch(monkeypatch):
  from hdit_jax.training import trainer  # pylint: disable=import-outside-toplevel
  real, calls = trainer._global_batch, []   # pylint: disable=protected-access

  def poisoned(local, sharding):
    calls.append(1)
    if len(calls) == 3:
      local = dict(local, image=np.full_like(local["image"], np.inf))
    return real(local, sharding)

  monkeypatch.setattr(trainer, "_global_batch", poisoned)
  return trainer


def test_a_run_with_a_poisoned_batch_ends_finite(tmp_path, monkeypatch, caplog):
  trainer = _poison_third_batch(monkeypatch)
  config = tiny_config(data=1)
  config.training.update(num_steps=6, checkpoint_every=100)
  state = trainer.train(config, str(tmp_path), jax.devices()[:1])
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["nonfinite_total"] for r in records] == [0, 0, 1, 1, 1, 1]
  assert int(state.step) == 6
  for tree in (state.params, state.ema):
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree))
  assert "1 steps with a non-finite loss or gradients skipped" in caplog.text


def test_a_run_halts_at_a_nonfinite_step_when_told(tmp_path, monkeypatch):
  trainer = _poison_third_batch(monkeypatch)
  config = tiny_config(data=1)
  config.training.update(num_steps=6, checkpoint_every=1, max_consecutive_nonfinite=0)
  with pytest.raises(trainer.TrainingHalted, match=r"last checkpoint \(step 2\) is intact"):
    trainer.train(config, str(tmp_path), jax.devices()[:1])
  saved = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), keep=2)
  assert saved.latest_step() == 2
  saved.close()
