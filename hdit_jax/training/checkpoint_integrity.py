"""What makes a checkpoint trustworthy to restore: the same model and train-state layout as
the config builds (by array shapes), and arrays equal to those saved (by fingerprints).
"""

import math
from typing import Any

import jax
import jax.numpy as jnp

from hdit_jax.training.validate import ConfigError


class CheckpointError(RuntimeError):
  """No checkpoint of the directory can be restored."""


def _name(path) -> str:
  parts = []
  for entry in path:
    part = str(getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry))))
    if part != "value":   # an nnx Variable's array
      parts.append(part)
  return ".".join(parts)


def shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_name(path): tuple(leaf.shape) for path, leaf in leaves if hasattr(leaf, "shape")}


def check_same_model(saved: dict[str, tuple[int, ...]], abstract_state: Any, step: int,
                      directory: str) -> None:
  """Refuse a checkpoint whose parameters (another model) or other state (another optimizer
  layout, from another hdit-jax version) differ from what this config builds."""
  built = shapes(abstract_state)
  changed = [f"{k} is {saved[k]} there, {built[k]} here" for k in sorted(saved.keys() & built)
             if saved[k] != built[k]]
  changed += [f"{k} is missing there" for k in sorted(built.keys() - saved.keys())]
  changed += [f"{k} is not built here" for k in sorted(saved.keys() - built.keys())]
  if not changed:
    return
  more = f" (and {len(changed) - 3} more)" if len(changed) > 3 else ""
  what = "; ".join(changed[:3]) + more
  reshaped = [k for k in saved.keys() & built if saved[k] != built[k]
               and len(saved[k]) < len(built[k]) and math.prod(saved[k]) == math.prod(built[k])]
  if reshaped and len(reshaped) == len(changed):
    raise ConfigError(
        f"the checkpoint at step {step} in {directory} was written by an earlier hdit-jax, whose "
        f"fused projections were flat ({what}). Export its EMA weights with that version "
        "(--mode=export; this version loads them), or train in a new workdir.")
  if any(c.startswith("params.") for c in changed):
    raise ConfigError(
        f"the checkpoint at step {step} in {directory} is of another model than this config "
        f"builds: {what}. Resume with the run's own config (its model section), or train this "
        "one in a new workdir.")
  raise ConfigError(
      f"the checkpoint at step {step} in {directory} holds a train state laid out otherwise "
      f"than this version of hdit-jax builds (written by another version?): {what}. Resume "
      "it with the version that wrote it, or train in a new workdir.")


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
  """A position-weighted sum of an array's bits, mod 2^32: exact under any sharding (integer
  sums), and changed by any altered, zeroed or swapped element."""
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32).reshape(-1)
  else:
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)
  weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
  return jnp.sum(bits * weights, dtype=jnp.uint32)


_fingerprints = jax.jit(lambda tree: jax.tree.map(_leaf_fingerprint, tree))


def fingerprint(state: Any) -> dict[str, int]:
  """Array name -> fingerprint, saved beside a checkpoint and checked when it is restored."""
  values = jax.device_get(_fingerprints(state))
  return {_name(path): int(v) for path, v in jax.tree_util.tree_flatten_with_path(values)[0]}


def check_fingerprint(saved: dict[str, int], restored: dict[str, int]) -> None:
  differ = sorted(k for k in saved.keys() | restored.keys() if saved.get(k) != restored.get(k))
  if differ:
    more = f" (and {len(differ) - 3} more)" if len(differ) > 3 else ""
    raise CheckpointError(f"the restored arrays differ from those saved: {', '.join(differ[:3])}"
                          f"{more}")
