"""AdamW with the official parameter groups, and the EMA schedule (spec sections 4.2 - 4.4).

Steps with non-finite gradients are skipped (optax.apply_if_finite) and counted.

Groups come from the parameters' `tags` metadata, as in k-diffusion: tag `wd` gets weight
decay, tag `mapping` (mapping network, AdaRMSNorm modulations) trains at lr * mapping_lr_scale.
"""

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

GROUPS = ("wd", "no_wd", "mapping_wd", "mapping_no_wd")


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def param_group(variable: nnx.Variable) -> str:
  tags = variable.get_metadata().get("tags") or ()
  return ("mapping_" if "mapping" in tags else "") + ("wd" if "wd" in tags else "no_wd")


def param_groups(params: nnx.State) -> nnx.State:
  """A label tree (a prefix of `params`) naming each parameter's optimizer group."""
  return jax.tree.map(param_group, params, is_leaf=_is_variable)


def learning_rate(cfg: Mapping[str, Any]) -> optax.Schedule:
  """Constant lr with an optional linear warm-up over `warmup_steps`."""
  if cfg.get("warmup_steps", 0) > 0:
    return optax.linear_schedule(cfg["lr"] / cfg["warmup_steps"], cfg["lr"], cfg["warmup_steps"])
  return optax.constant_schedule(cfg["lr"])


def make_optimizer(cfg: Mapping[str, Any], params: nnx.State) -> optax.GradientTransformation:
  """clip_by_global_norm(grad_clip) then AdamW per group (torch AdamW's decoupled decay)."""
  base = learning_rate(cfg)

  def adamw(lr_scale: float, weight_decay: float):
    return optax.adamw(lambda step: base(step) * lr_scale, b1=cfg["b1"], b2=cfg["b2"],
                       eps=cfg["eps"], weight_decay=weight_decay)

  scale = cfg["mapping_lr_scale"]
  groups = {"wd": adamw(1.0, cfg["weight_decay"]), "no_wd": adamw(1.0, 0.0),
            "mapping_wd": adamw(scale, cfg["weight_decay"]), "mapping_no_wd": adamw(scale, 0.0)}
  chain = [optax.multi_transform(groups, param_groups(params))]
  if cfg.get("grad_clip", 0) > 0:
    chain.insert(0, optax.clip_by_global_norm(cfg["grad_clip"]))
  # A step whose gradients are not finite leaves the parameters and moments as they were; its
  # state counts such steps (`nonfinite_counts`), and the loop decides when to stop.
  return optax.apply_if_finite(optax.chain(*chain), max_consecutive_errors=NEVER_APPLY)


# apply_if_finite applies a bad update after this many in a row: never, in practice.
NEVER_APPLY = 2**31 - 1


def nonfinite_counts(opt_state: Any) -> dict[str, jax.Array]:
  """Steps skipped for non-finite gradients: in a row now, and in all."""
  return {"nonfinite_consecutive": opt_state.notfinite_count,
          "nonfinite_total": opt_state.total_notfinite}


def ema_decay(step: jax.Array, power: float, max_value: float) -> jax.Array:
  """Inverse-decay warm-up: clamp(1 - (1 + t)^-power, 0, max_value); t = updates done so far.

  The first update uses decay 0 (EMA := weights); power 0.75 reaches 0.999 at t = 10^4.
  """
  t = jnp.asarray(step, jnp.float32)
  return jnp.clip(1 - (1 + t) ** -power, 0.0, max_value)


def ema_update(ema: Any, params: Any, decay: jax.Array) -> Any:
  return jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
