"""The jitted train step: diffusion loss, gradient accumulation, AdamW, EMA, measurements."""

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from hdit_jax.diffusion import densities, losses
from hdit_jax.models.partitioning import kernels_on_mesh
from hdit_jax.training import mesh as mesh_lib
from hdit_jax.training.optimizer import ema_decay, ema_update, learning_rate, nonfinite_counts
from hdit_jax.training.state import ModelDef, TrainState

Batch = Mapping[str, jax.Array]   # image [B, H, W, C] uint8 or in [-1, 1], label [B], aug_cond [B, 9]


def make_train_step(config: Any, model_def: ModelDef, tx: optax.GradientTransformation,
                    sigma_groups: int) -> Callable[[TrainState, Batch, jax.Array],
                                                   tuple[TrainState, dict[str, jax.Array]]]:
  """step(state, batch, key) -> (state, metrics); pure, to be jitted with shardings.

  `sigma_groups`: strata groups for the noise levels, the number of batch shards, so that every
  device's share of the batch spans the whole noise range (as per-process strata do).
  """
  diffusion = config.diffusion
  accum = int(config.training.grad_accum_steps)
  num_classes = int(config.model.get("num_classes", 0))
  density = densities.make_density(diffusion.sigma_density, sigma_data=diffusion.sigma_data,
                                   image_size=max(config.model.input_size))

  def microbatch_loss(params, buffers, micro, dropout_key):
    model = model_def.merge(params, buffers, dropout_key)
    cond = {}
    if "aug_cond" in micro:
      cond["aug_cond"] = micro["aug_cond"]
    if num_classes:
      cond["class_cond"] = micro["label"]
    per_sample = losses.diffusion_loss(model, micro["image"], micro["noise"], micro["sigma"],
                                       diffusion.sigma_data, diffusion.loss_weighting,
                                       int(diffusion.loss_scales), **cond)
    return jnp.mean(per_sample)

  grad_fn = jax.value_and_grad(microbatch_loss)

  def train_step(state: TrainState, batch: Batch, key: jax.Array):
    key = jax.random.fold_in(key, state.step)
    k_noise, k_sigma, k_drop, k_dropout = jax.random.split(key, 4)
    images = batch["image"]
    # uint8 batches (no augmentation) are scaled here, on the device: [0, 255] -> [-1, 1].
    images = (images.astype(jnp.float32) / 127.5 - 1.0 if images.dtype == jnp.uint8
              else images.astype(jnp.float32))
    n = images.shape[0]
    inputs = dict(batch, image=images,
                  noise=jax.random.normal(k_noise, images.shape, jnp.float32),
                  sigma=density(k_sigma, n, sigma_groups))
    if num_classes:
      inputs["label"] = losses.drop_labels(k_drop, batch["label"], num_classes,
                                           diffusion.cond_dropout_rate)
    # Microbatch a takes rows a, a + accum, ...: every microbatch spans all devices' shares.
    micro = jax.tree.map(
        lambda x: x.reshape((n // accum, accum) + x.shape[1:]).swapaxes(0, 1), inputs)

    def accumulate(carry, xs):
      loss_sum, grad_sum = carry
      index, mb = xs
      loss, grads = grad_fn(state.params, state.buffers, mb, jax.random.fold_in(k_dropout, index))
      return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (loss, grads), _ = jax.lax.scan(accumulate, (jnp.zeros(()), zeros),
                                    (jnp.arange(accum), micro))
    loss, grads = loss / accum, jax.tree.map(lambda g: g / accum, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay(state.step, config.ema.power, config.ema.max_value)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema=ema_update(state.ema, params, decay))
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "update_norm": optax.tree.norm(updates), "ema_decay": decay,
               "lr": learning_rate(config.optimizer)(state.step), **nonfinite_counts(opt_state)}
    return new_state, metrics

  return train_step


def jit_train_step(config: Any, model_def: ModelDef, tx: optax.GradientTransformation,
                   mesh: jax.sharding.Mesh, shardings: Any):
  """The train step jitted over `mesh`: the state in `shardings` (donated), the batch split over
  (data, fsdp), one noise-level stratum group per batch shard."""
  sigma_groups = mesh.shape["data"] * mesh.shape["fsdp"]
  step = make_train_step(config, model_def, tx, sigma_groups)
  heads = dict(config.sharding_rules).get("heads")

  def per_shard_kernels_step(*args):
    with kernels_on_mesh(mesh, mesh_lib.BATCH_AXES, heads):
      return step(*args)

  return jax.jit(per_shard_kernels_step,
                 in_shardings=(shardings, mesh_lib.batch_sharding(mesh),
                               mesh_lib.replicated(mesh)),
                 out_shardings=(shardings, None), donate_argnums=0)
