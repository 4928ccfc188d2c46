"""Sampling compiles once, and image i depends on the seed and i alone: not on the number of
devices, the batch size, the mesh or how the weights are sharded."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hdit_jax.config import base_config, hdit_model
from hdit_jax.models import build_model
from hdit_jax.sampling import batches, files
from hdit_jax.sampling import generate as generate_lib


def tiny_config(num_classes=5, sampler="euler_ancestral", guidance=2.0):
  c = base_config()
  c.model = hdit_model(input_size=(16, 16), input_channels=1, patch_size=(2, 2), depths=(1, 1),
                       widths=(16, 32), d_heads=(8, 8), kernel_sizes=(3, 3), mapping_width=16,
                       mapping_depth=1, mapping_d_ff=32, num_classes=num_classes,
                       dtype="float32")
  c.diffusion.update(sigma_data=0.6, sigma_max=80.0)
  c.sampling.update(sampler=sampler, steps=2, guidance_scale=guidance)
  return c


def perturbed_model(config, seed=0):
  """Random non-zero weights (the zero-initialised outputs would make every sample equal)."""
  model = build_model(config.model, rngs=nnx.Rngs(seed))
  state = nnx.state(model, nnx.Param)
  keys = iter(jax.random.split(jax.random.key(seed + 1), 1000))
  nnx.update(model, jax.tree.map(lambda p: p + 0.2 * jax.random.normal(next(keys), p.shape),
                                 state))
  return nnx.view(model, deterministic=True)


def one_axis_mesh(n):
  return Mesh(np.asarray(jax.devices()[:n]), ("batch",))


def test_second_call_reuses_the_compiled_sampler():
  config = tiny_config()
  model = perturbed_model(config)
  generate_lib._compiled_sampler.cache_clear()   # pylint: disable=protected-access
  first = generate_lib.generate(model, config, jax.random.key(0), 8)
  again = generate_lib.generate(perturbed_model(config), config, jax.random.key(3), 8)
  info = generate_lib._compiled_sampler.cache_info()   # pylint: disable=protected-access
  assert (info.misses, info.hits) == (1, 1)
  graphdef, _ = nnx.split(model)
  settings = generate_lib.SamplerSettings.from_config(config)
  batch = NamedSharding(generate_lib.default_mesh(), P(("batch",)))
  jitted = generate_lib._compiled_sampler(graphdef, settings, 5, (16, 16, 1), batch)  # pylint: disable=protected-access
  assert jitted._cache_size() == 1   # one trace and compile for both calls
  assert not np.allclose(np.asarray(first), np.asarray(again))
  # Other settings build another sampler (traced only when called).
  other = generate_lib._compiled_sampler(  # pylint: disable=protected-access
      graphdef, generate_lib.SamplerSettings.from_config(config, steps=3), 5, (16, 16, 1), batch)
  assert other is not jitted


def test_images_do_not_depend_on_devices_or_batching():
  config = tiny_config()
  model = perturbed_model(config)
  key = jax.random.key(7)
  one = np.asarray(generate_lib.generate(model, config, key, 5, mesh=one_axis_mesh(1)))
  eight = np.asarray(generate_lib.generate(model, config, key, 5, mesh=one_axis_mesh(8)))
  np.testing.assert_allclose(eight, one, atol=2e-4)
  # Images 3 and 4 drawn alone (start=3) are images 3 and 4 of the whole run.
  tail = np.asarray(generate_lib.generate(model, config, key, 2, start=3, mesh=one_axis_mesh(8)))
  np.testing.assert_allclose(tail, one[3:], atol=2e-4)
  assert np.abs(one[0] - one[1]).max() > 1e-2   # distinct images, not one repeated


def test_batches_and_hosts_layout_give_the_same_run():
  config = tiny_config()
  model = perturbed_model(config)
  small, small_labels = batches.sample_images(model, config, 7, 0, batch_size=5,
                                              mesh=one_axis_mesh(1), progress=False)
  big, big_labels = batches.sample_images(model, config, 7, 0, batch_size=16,
                                          mesh=one_axis_mesh(8), progress=False)
  np.testing.assert_array_equal(small_labels, big_labels)
  assert np.abs(small.astype(int) - big).max() <= 1   # uint8 rounding of float noise
  assert small.shape == (7, 16, 16, 1) and small.dtype == np.uint8
  np.testing.assert_array_equal(small_labels,
                                generate_lib.random_labels(jax.random.key(0), 5, 0, 7))


def test_sharded_weights_on_the_training_mesh():
  """Periodic samples during training: FSDP-sharded EMA weights, batch over (data, fsdp)."""
  config = tiny_config()
  model = perturbed_model(config)
  key = jax.random.key(1)
  reference = np.asarray(generate_lib.generate(model, config, key, 8, mesh=one_axis_mesh(8)))
  mesh = Mesh(np.asarray(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
  sharded = perturbed_model(config)
  graphdef, state = nnx.split(sharded)

  def shard(leaf):
    spec = P("fsdp") if leaf.ndim and leaf.shape[0] % 2 == 0 else P()
    return jax.device_put(leaf, NamedSharding(mesh, spec))
  sharded = nnx.merge(graphdef, jax.tree.map(shard, state))
  out = generate_lib.generate(sharded, config, key, 8, mesh=mesh, batch_axes=("data", "fsdp"))
  assert out.sharding.spec == P(("data", "fsdp"))
  np.testing.assert_allclose(np.asarray(out), reference, atol=2e-4)
  # The weights stayed where they were (sharded), not gathered onto every device.
  leaves = [l for l in jax.tree.leaves(nnx.state(sharded)) if getattr(l, "ndim", 0) == 2]
  assert any(l.sharding.spec == P("fsdp") for l in leaves)


def test_bad_requests_are_refused():
  config = tiny_config()
  model = perturbed_model(config)
  with pytest.raises(ValueError, match="num_images"):
    generate_lib.generate(model, config, jax.random.key(0), 0)
  with pytest.raises(ValueError, match="labels must be in"):
    generate_lib.generate(model, config, jax.random.key(0), 2, labels=np.array([0, 9]))
  with pytest.raises(ValueError, match="unknown sampler"):
    generate_lib.generate(model, config, jax.random.key(0), 2, sampler="nope")
  uncond = tiny_config(num_classes=0, guidance=1.5)
  with pytest.raises(ValueError, match="unconditional"):
    generate_lib.generate(perturbed_model(uncond), uncond, jax.random.key(0), 2)
  with pytest.raises(ValueError, match="unconditional"):
    batches.draw_labels(tiny_config(num_classes=0), 3, 0, labels=[1])
  with pytest.raises(ValueError, match="batch_size must be at least 1"):
    next(batches.sample_batches(model, config, 2, 0, batch_size=-1))


def test_a_run_that_writes_no_images_leaves_no_file(tmp_path):
  """A stream that ends early is an error, and the partial npz is removed (it was left behind,
  with a ZipFile warning at exit, when the stream had no batch at all)."""
  stream = files.write_samples(iter([]), 3, (4, 4, 1), str(tmp_path), "s", conditional=False)
  with pytest.raises(RuntimeError, match="0 of 3 images written"):
    list(stream)
  assert not list(tmp_path.iterdir())


def test_a_model_in_training_mode_samples_without_dropout():
  """A weight file's model is built in training mode; with dropout it crashed the sampler (its
  RNG keys, and its draws inside the sampler's scan). It samples as the deterministic model."""
  config = tiny_config(num_classes=0, sampler="euler", guidance=1.0)
  config.model.dropout_rate = (0.5, 0.5)
  deterministic = perturbed_model(config)
  training_mode = nnx.view(deterministic, deterministic=False)   # the same weights, dropping
  want = generate_lib.generate(deterministic, config, jax.random.key(0), 3)
  got = generate_lib.generate(training_mode, config, jax.random.key(0), 3)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 1))
  dropped = training_mode(x, jax.numpy.ones((2,)))
  kept = deterministic(x, jax.numpy.ones((2,)))
  assert not np.allclose(np.asarray(dropped), np.asarray(kept))   # dropout acts in training mode
