"""The attention kernels on a mesh of 8 devices: each device runs them on its own shard.

XLA cannot partition a Pallas kernel: the TPU lowering refuses a sharded one outright, and on
GPU the operands would be gathered onto every device. The train step and the sampler trace
the kernels under shard_map (hdit_jax.models.partitioning), which these tests see in what
jax.export lowers for TPU and CUDA (the kernels' operand shapes are one device's share), and
in the numbers: the operations run per shard (on the CPU: the interpreted Pallas TPU kernel and
the q/k kernel's reference) give the loss and gradients of one device.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hdit_jax.models import attention, build_model, partitioning
from hdit_jax.sampling import generate
from hdit_jax.training import mesh as mesh_lib
from hdit_jax.training import state as state_lib
from hdit_jax.training.step import jit_train_step, make_train_step
from hdit_kernels import qk_norm_rope
from hdit_kernels.neighborhood_attention import na2d
from conftest import rel_l2
from test_training import random_batch, tiny_config

BATCH = 16


def config_with(data=2, fsdp=2, tensor=2, **model):
  """The tiny config with d_head 64 (the q/k kernel's size): level 0 (8 x 8 tokens, 2 heads)
  neighborhood attention, level 1 (4 x 4, 4 heads) global."""
  config = tiny_config(data=data, fsdp=fsdp, tensor=tensor)
  config.model.update(widths=(128, 256), d_heads=(64, 64), dropout_rate=(0.0, 0.0), **model)
  config.data.batch_size = BATCH
  return config


def abstract_batch(config, sharding):
  h, w = config.model.input_size
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  return dict(image=spec((BATCH, h, w, 1), jnp.float32), label=spec((BATCH,), jnp.int32),
              aug_cond=spec((BATCH, 9), jnp.float32))


def exported_train_step(config, platform, **kw):
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices())
  model_def, abstract_state, shardings, tx, _ = state_lib.setup(
      config, mesh, dict(config.sharding_rules))
  step = jit_train_step(config, model_def, tx, mesh, shardings)
  key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                             sharding=mesh_lib.replicated(mesh))
  exported = jax.export.export(step, platforms=[platform], **kw)(
      abstract_state, abstract_batch(config, mesh_lib.batch_sharding(mesh)), key)
  return exported.mlir_module()


def kernel_operands(module: str, target: str) -> list[list[tuple[int, ...]]]:
  """The operand shapes of every custom call to `target` in a StableHLO module's text."""
  calls = []
  for line in module.splitlines():
    if f"stablehlo.custom_call @{target}(" not in line:
      continue
    signature = re.search(r"\} : \(([^)]*)\) ->", line)
    calls.append([tuple(int(n) for n in t.split("x")[:-1])
                  for t in re.findall(r"tensor<([^>]*)>", signature.group(1))])
  return calls


@pytest.mark.tpu_lowering
def test_train_step_lowers_for_a_tpu_mesh_with_a_shard_per_kernel():
  """Data 2 x FSDP 2 x tensor 2: each neighborhood kernel sees 16 / 4 images and 1 of 2 heads
  (the lowering raises 'Mosaic kernels cannot be automatically partitioned' otherwise)."""
  module = exported_train_step(config_with(attention_implementation="pallas_tpu"), "tpu")
  calls = kernel_operands(module, "tpu_custom_call")
  assert len(calls) == 3 * 2   # forward, dq, dk/dv at level 0's two layers (down and up)
  for shapes in calls:
    # q, k, v, o, dO [B, H, W, heads * d] and the statistics [B, H, W, heads]: 1 head.
    images = [s for s in shapes if len(s) == 4 and s[1:3] == (8, 8)]
    assert images and all(s[0] == BATCH // 4 and s[3] in (64, 1) for s in images), shapes


@pytest.mark.gpu_lowering
def test_train_step_lowers_for_a_gpu_mesh_with_a_shard_per_kernel():
  """The Triton neighborhood kernels and the Mosaic GPU q/k kernels take one device's
  share: 4 images, 1 head (the q/k kernel's operands are [tokens, 3, heads, d])."""
  config = config_with(attention_implementation="pallas_gpu", qk_implementation="mosaic_gpu",
                       dtype="bfloat16")   # the q/k kernel's dtypes: 16-bit
  triton_call = "__gpu$xla.gpu.triton"
  module = exported_train_step(
      config, "cuda", disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(triton_call)])
  triton = kernel_operands(module, triton_call)
  mosaic = kernel_operands(module, "mosaic_gpu_v2")
  assert triton and len(mosaic) == 2 * 2   # forward and backward, two layers
  for shapes in triton:
    images = [s for s in shapes if len(s) == 5]
    assert images and all(s[:4] == (BATCH // 4, 8, 8, 1) for s in images), shapes
  for shapes in mosaic:
    assert (BATCH // 4 * 64, 3, 1, 64) in shapes, shapes


@pytest.mark.tpu_lowering
def test_the_sampler_lowers_for_a_tpu_mesh_with_a_shard_per_kernel():
  """generate's compiled sampler over 8 devices: each kernel sees 2 of the 16 images, 4 of
  the 32 that guidance makes of them."""
  config = config_with(attention_implementation="pallas_tpu")
  model = build_model(config.model, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(nnx.view(model, deterministic=True, raise_if_not_found=False))
  mesh = Mesh(np.asarray(jax.devices()), ("batch",))
  batch = NamedSharding(mesh, P(("batch",)))
  settings = generate.SamplerSettings(sampler="euler", steps=2, guidance_scale=2.0)
  h, w = config.model.input_size
  sampler = generate._compiled_sampler(graphdef, settings, 10, (h, w, 1), batch)   # pylint: disable=protected-access
  spec = lambda shape, dtype, sharding: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  abstract_state = jax.tree.map(lambda a: spec(a.shape, a.dtype, NamedSharding(mesh, P())),
                                state)
  module = jax.export.export(sampler, platforms=["tpu"])(
      abstract_state, spec((2,), jnp.uint32, NamedSharding(mesh, P())),
      spec((BATCH,), jnp.int32, batch), spec((BATCH,), jnp.int32, batch)).mlir_module()
  calls = kernel_operands(module, "tpu_custom_call")
  assert calls
  for shapes in calls:
    assert all(s[0] == 2 * BATCH // 8 for s in shapes if len(s) == 4), shapes


def train_step_on(config, devices, per_shard: bool):
  """(step, init, batch sharding) of the tiny model on `devices` (4 noise-level strata)."""
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  model_def, _, shardings, tx, init = state_lib.setup(config, mesh, dict(config.sharding_rules))
  if per_shard:
    step = jit_train_step(config, model_def, tx, mesh, shardings)
  else:
    step = jax.jit(make_train_step(config, model_def, tx, 4),
                   in_shardings=(shardings, mesh_lib.batch_sharding(mesh),
                                 mesh_lib.replicated(mesh)), out_shardings=(shardings, None))
  return step, init, mesh_lib.batch_sharding(mesh)


def test_kernels_run_per_shard_give_the_numbers_of_one_device(monkeypatch):
  """The train step on data 2 x FSDP 2 x tensor 2 with the kernels' operations under shard_map
  gives the loss and gradient norm of one device, and the model every parameter's gradient.
  Neighborhood attention is Pallas TPU's kernel, interpreted; the q/k preparation is the
  kernel's jnp reference, let run in float32 (Mosaic GPU's interpreter synchronises its
  devices' threads, which 8 CPU devices on 2 cores do not all run at once). Float32 throughout,
  so that the shards' rounding stays far below a lost or doubled cross-device sum."""
  config = config_with(attention_implementation="pallas_tpu", qk_implementation="mosaic_gpu")
  monkeypatch.setattr(qk_norm_rope, "unsupported", lambda shape, dtype: None)
  monkeypatch.setattr(attention, "na2d", functools.partial(na2d, interpret=True))
  monkeypatch.setattr(qk_norm_rope, "qk_norm_rope",
                      lambda *args, implementation, **kw: qk_norm_rope.reference(*args, **kw))
  batch = random_batch(config, BATCH)
  results = []
  for devices, per_shard in ((jax.devices(), True), (jax.devices()[:1], False)):
    config.mesh.update(data=2 if per_shard else 1, fsdp=2 if per_shard else 1,
                       tensor=2 if per_shard else 1)
    step, init, sharding = train_step_on(config, devices, per_shard)
    placed = jax.device_put(batch, sharding)
    if per_shard:
      jaxpr = str(jax.make_jaxpr(step)(init(), placed, jax.random.key(3)))
      assert "na2d" in jaxpr
      assert jaxpr.count("shard_map[") >= 2 * 2 * 2   # two layers, two operations, fwd + bwd
    _, metrics = step(init(), placed, jax.random.key(3))
    results.append((float(metrics["loss"]), float(metrics["grad_norm"])))
  (l0, g0), (l1, g1) = results
  assert l0 > 0 and g0 > 0
  np.testing.assert_allclose([l0, g0], [l1, g1], rtol=1e-5)
  # Every parameter's gradient, of the model alone: the gains (per head, replicated over the
  # batch shards) need the cross-device sum that shard_map's transpose adds.
  model = build_model(config.model, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  # Live zero-initialised projections, so that every parameter carries a gradient.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(treedef, [p + 0.05 * jax.random.normal(k, p.shape, p.dtype)
                                        for p, k in zip(leaves, keys)])
  x = jnp.asarray(batch["image"])
  sigma, labels = jnp.linspace(0.1, 10.0, BATCH), jnp.asarray(batch["label"])

  def loss(p):
    out = nnx.merge(graphdef, p, rest)(x, sigma, class_cond=labels)
    return jnp.mean(jnp.square(out.astype(jnp.float32) - x))

  mesh = mesh_lib.make_mesh(dict(data=2, fsdp=2, tensor=2), jax.devices())

  def per_shard_grad(p):
    with partitioning.kernels_on_mesh(mesh, mesh_lib.BATCH_AXES, ("tensor",)):
      return jax.grad(loss)(p)

  on_mesh = jax.jit(per_shard_grad, out_shardings=mesh_lib.replicated(mesh))(params)
  one = jax.jit(jax.grad(loss))(params)
  checked = 0
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(one), jax.tree.leaves(on_mesh)):
    if float(jnp.linalg.norm(a.astype(jnp.float32))) > 0:
      assert rel_l2(b, a) < 1e-4, jax.tree_util.keystr(path)
      checked += 1
  assert checked > 20


def test_dimensions_the_mesh_does_not_divide_stay_whole():
  """3 heads over tensor 2 and 6 images over data x fsdp 4 are not split: the call runs on
  whole arrays (and gives the same values); 8 images and 4 heads are split."""
  mesh = mesh_lib.make_mesh(dict(data=2, fsdp=2, tensor=2), jax.devices())
  seen = []

  def double(x):
    seen.append(x.shape)
    return 2 * x

  for shape, share in (((6, 3, 5), (6, 3, 5)), ((8, 3, 5), (2, 3, 5)), ((6, 4, 5), (6, 2, 5)),
                       ((8, 4, 5), (2, 2, 5))):
    x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)

    def f(x):
      with partitioning.kernels_on_mesh(mesh, mesh_lib.BATCH_AXES, ("tensor",)):
        return partitioning.on_shards(double, x, layouts=("bh.",), out_layouts="bh.")

    np.testing.assert_array_equal(jax.jit(f)(x), 2 * x)
    assert seen[-1] == share, shape


def test_outside_a_mesh_and_on_one_device_the_call_is_direct():
  x = jnp.ones((4, 2))
  fn = lambda t: t + 1
  assert "shard_map" not in str(jax.make_jaxpr(
      lambda t: partitioning.on_shards(fn, t, layouts=("bh",), out_layouts="bh"))(x))
  one = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), mesh_lib.AXES)

  def on_one(t):
    with partitioning.kernels_on_mesh(one, mesh_lib.BATCH_AXES, ("tensor",)):
      return partitioning.on_shards(fn, t, layouts=("bh",), out_layouts="bh")

  assert "shard_map" not in str(jax.make_jaxpr(on_one)(x))
  with pytest.raises(ValueError, match="not in the mesh"):
    with partitioning.kernels_on_mesh(one, ("batch",)):
      pass
