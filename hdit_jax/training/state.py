"""The train state: parameters, fixed buffers, optimizer state and EMA, all sharded on a mesh.

The model's graph (its static structure) is split off once; the step merges it with the
state's arrays, so the state is a plain pytree that orbax saves and restores onto any mesh.
"""

from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from hdit_jax.models import build_model
from hdit_jax.models.layers import Buffer
from hdit_jax.training import mesh as mesh_lib
from hdit_jax.training.optimizer import make_optimizer


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State
  buffers: nnx.State
  opt_state: optax.OptState
  ema: nnx.State


@flax.struct.dataclass
class ModelDef:
  """What the step needs besides the arrays: the graph and the RNG state for dropout."""
  graphdef: Any = flax.struct.field(pytree_node=False)
  rng_state: nnx.State

  def merge(self, params: nnx.State, buffers: nnx.State, dropout_key: jax.Array | None = None,
            deterministic: bool = False) -> nnx.Module:
    model = nnx.merge(self.graphdef, params, buffers, self.rng_state, copy=True)
    if dropout_key is not None:
      nnx.reseed(model, default=dropout_key)
    if deterministic:
      # Models without dropout (the DiT) have nothing to switch: not an error.
      model = nnx.view(model, deterministic=True, raise_if_not_found=False)
    return model


def split_model(model: nnx.Module) -> tuple[ModelDef, nnx.State, nnx.State]:
  graphdef, params, buffers, rng_state = nnx.split(model, nnx.Param, Buffer, ...)
  return ModelDef(graphdef, rng_state), params, buffers


def setup(config: Any, mesh: Mesh, rules: Mapping[str, Any]):
  """Everything the loop needs to create or restore a sharded state, without allocating it.

  Returns (model definition, abstract state with shardings, state shardings, optimizer,
  init) where init() creates the state directly into its shardings under jit.
  """
  abstract_model = nnx.eval_shape(lambda: build_model(config.model, rngs=nnx.Rngs(0)))
  model_def, abstract_params, abstract_buffers = split_model(abstract_model)
  tx = make_optimizer(config.optimizer, abstract_params)

  def init_fn(key):
    model = build_model(config.model, rngs=nnx.Rngs(key))
    _, params, buffers = split_model(model)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, buffers=buffers,
                      opt_state=tx.init(params), ema=jax.tree.map(jnp.copy, params))

  shardings = state_shardings(init_fn, abstract_params, abstract_buffers, mesh, rules)
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      jax.eval_shape(init_fn, jax.random.key(0)), shardings)
  # The RNG state holds only dropout streams, reseeded every step: any concrete value will do.
  # Made under jit, so that it spans every host's devices (device_put reaches only this host's).
  rng_state = jax.jit(lambda: jax.tree.map(_concrete, model_def.rng_state),
                      out_shardings=mesh_lib.replicated(mesh))()
  model_def = ModelDef(model_def.graphdef, rng_state)
  init = lambda: jax.jit(init_fn, out_shardings=shardings)(jax.random.key(config.seed))
  return model_def, abstract_state, shardings, tx, init


def _concrete(leaf: jax.ShapeDtypeStruct) -> jax.Array:
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    return jax.random.split(jax.random.key(0), leaf.shape) if leaf.shape else jax.random.key(0)
  return jnp.zeros(leaf.shape, leaf.dtype)


def state_shardings(init: Callable[[jax.Array], TrainState], abstract_params: nnx.State,
                    abstract_buffers: nnx.State, mesh: Mesh, rules: Mapping[str, Any]) -> Any:
  """Shardings of every state leaf: parameters, their EMA and their Adam moments from the
  logical-axis rules; counts and other scalars replicated."""
  param_sh = mesh_lib.state_shardings(abstract_params, rules, mesh)
  buffer_sh = mesh_lib.state_shardings(abstract_buffers, rules, mesh)
  by_path = {_path_key(p): s for p, s in jax.tree_util.tree_flatten_with_path(param_sh)[0]}
  abstract = jax.eval_shape(init, jax.random.key(0))

  def opt_leaf(path, _):
    # An optimizer leaf that mirrors a parameter ends with that parameter's path.
    key = _path_key(path)
    for start in range(len(key)):
      if key[start:] in by_path:
        return by_path[key[start:]]
    return mesh_lib.replicated(mesh)

  opt_sh = jax.tree_util.tree_map_with_path(opt_leaf, abstract.opt_state)
  return TrainState(step=mesh_lib.replicated(mesh), params=param_sh, buffers=buffer_sh,
                    opt_state=opt_sh, ema=param_sh)


def _path_key(path) -> tuple[str, ...]:
  return tuple(str(entry) for entry in path)
