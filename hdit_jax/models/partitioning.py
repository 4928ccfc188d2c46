"""The attention kernels on a device mesh: every device runs them on its own shard.

XLA cannot partition a Pallas kernel (a custom call): on TPU the lowering refuses ("Mosaic
kernels cannot be automatically partitioned"), on GPU the operands are gathered onto every
device, which then computes the whole batch. While a jitted function is traced inside
`kernels_on_mesh(mesh, batch_axes, heads_axes)`, `on_shards` runs the attention operations
under `jax.shard_map`, split over the batch and, where they divide, over the heads (all the
operations are independent per image and per head). Outside it they run as they are.
"""

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
from jax.sharding import Mesh, PartitionSpec as P


@dataclasses.dataclass(frozen=True)
class _KernelMesh:
  mesh: Mesh
  batch: tuple[str, ...]
  heads: tuple[str, ...]


_ACTIVE: contextvars.ContextVar[_KernelMesh | None] = contextvars.ContextVar("kernel_mesh",
                                                                           default=None)


@contextlib.contextmanager
def kernels_on_mesh(mesh: Mesh, batch_axes: str | Sequence[str] | None,
                    heads_axes: str | Sequence[str] | None = ()):
  """Trace the model's attention kernels per shard of `mesh`: the batch split over
  `batch_axes`, the heads over `heads_axes` (one axis name, several, or None as a
  PartitionSpec entry or a sharding rule gives them; axes of size 1 are ignored)."""
  as_tuple = lambda axes: (axes,) if isinstance(axes, str) else tuple(axes or ())
  batch_axes, heads_axes = as_tuple(batch_axes), as_tuple(heads_axes)
  unknown = [a for a in (*batch_axes, *heads_axes) if a not in mesh.shape]
  if unknown:
    raise ValueError(f"axes {unknown} are not in the mesh {dict(mesh.shape)}")
  batch = tuple(a for a in batch_axes if mesh.shape[a] > 1)
  heads = tuple(a for a in heads_axes if mesh.shape[a] > 1 and a not in batch)
  token = _ACTIVE.set(_KernelMesh(mesh, batch, heads) if batch or heads else None)
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def _divides(axes: tuple[str, ...], mesh: Mesh, sizes: list[int]) -> tuple[str, ...]:
  """`axes` if their product divides every size, else () (that dimension stays whole)."""
  n = math.prod(mesh.shape[a] for a in axes)
  return axes if axes and all(s % n == 0 for s in sizes) else ()


def on_shards(fn: Callable[..., Any], *args: jax.Array, layouts: Sequence[str],
              out_layouts: Any) -> Any:
  """fn(*args), per device shard under an active `kernels_on_mesh`, else directly.

  `layouts` has one string per argument, a letter per dimension: 'b' the batch, 'h' the heads,
  '.' a dimension every shard holds whole; `out_layouts` is the same for fn's outputs (a
  string or a pytree of them). A dimension that the mesh axes do not divide stays whole.
  """
  active = _ACTIVE.get()
  if active is None:
    return fn(*args)
  sizes = {role: [x.shape[layout.index(role)] for x, layout in zip(args, layouts)
                  if role in layout] for role in "bh"}
  axes = {"b": _divides(active.batch, active.mesh, sizes["b"]),
          "h": _divides(active.heads, active.mesh, sizes["h"])}
  if not axes["b"] and not axes["h"]:
    return fn(*args)
  spec = lambda layout: P(*(axes.get(role) or None for role in layout))
  return jax.shard_map(fn, mesh=active.mesh, in_specs=tuple(spec(l) for l in layouts),
                       out_specs=jax.tree.map(spec, out_layouts), check_vma=False)(*args)
