"""Device mesh from the config, and shardings from the parameters' logical axis names.

The model annotates logical names only (`embed`, `mlp`, `qkv`, `heads`, `mapping`, `classes`);
one rule list in the config maps them to mesh axes, so the same model runs on one CPU, a GPU
host or a TPU pod. A dimension that a mesh axis does not divide stays replicated.
"""

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(cfg: Mapping[str, Any], num_devices: int) -> tuple[int, ...]:
  """Sizes of (data, fsdp, tensor); one of them may be -1 for 'the remaining devices'."""
  sizes = [int(cfg[a]) for a in AXES]
  unknown = [i for i, s in enumerate(sizes) if s == -1]
  if len(unknown) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh: at most one axis may be -1 and the others positive, got "
                     f"{dict(zip(AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if unknown:
    if num_devices % known:
      raise ValueError(f"mesh: {num_devices} devices cannot be split by {known} "
                       f"({dict(zip(AXES, sizes))})")
    sizes[unknown[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"{num_devices} are present")
  return tuple(sizes)


def make_mesh(cfg: Mapping[str, Any], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The (data, fsdp, tensor) mesh; with `dcn_data` > 1 slices are laid along `data` (multislice)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(cfg, len(devices))
  dcn = int(cfg.get("dcn_data", 1) or 1)
  if dcn > 1:
    from jax.experimental import mesh_utils  # pylint: disable=import-outside-toplevel
    if shape[0] % dcn:
      raise ValueError(f"mesh.data = {shape[0]} is not divisible by mesh.dcn_data = {dcn}")
    grid = mesh_utils.create_hybrid_device_mesh((shape[0] // dcn,) + shape[1:],
                                                (dcn, 1, 1), devices)
  else:
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def mesh_spec(logical: Sequence[str | None] | None, shape: Sequence[int],
              rules: Mapping[str, Any], mesh: Mesh) -> P:
  """PartitionSpec for an array with logical axis names; each mesh axis used at most once."""
  if not logical:
    return P()
  used, out = set(), []
  for name, dim in zip(logical, shape):
    axes = rules.get(name) if name else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in axes)
    if not axes or dim % size:
      out.append(None)
      continue
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else axes)
  return P(*out)


def state_shardings(abstract: nnx.State, rules: Mapping[str, Any], mesh: Mesh) -> nnx.State:
  """NamedShardings for an (abstract) nnx.State whose Variables carry `out_sharding` names."""
  def sharding(variable):
    names = variable.get_metadata().get("out_sharding")
    return variable.replace(NamedSharding(mesh, mesh_spec(names, variable.shape, rules, mesh)))
  return jax.tree.map(sharding, abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
