"""A training workdir's latest (or a given) checkpoint, restored as the EMA model on the mesh."""

import os
from typing import Any, NamedTuple

from etils import epath
from flax import nnx
from jax.sharding import Mesh

from hdit_jax.training import checkpoint as ckpt_lib
from hdit_jax.training import mesh as mesh_lib
from hdit_jax.training import state as state_lib


class Restored(NamedTuple):
  model: nnx.Module          # the EMA weights, deterministic (no dropout), sharded on `mesh`
  model_def: state_lib.ModelDef
  state: state_lib.TrainState
  step: int
  mesh: Mesh


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")


def restore_ema(config: Any, workdir: str, step: int | None = None) -> Restored:
  """The EMA model of `workdir`'s latest checkpoint (or of `step`) on the config's mesh.

  Reads only: a workdir without checkpoints is an error, and nothing is created in it.
  """
  directory = checkpoint_dir(workdir)
  if not epath.Path(directory).exists():
    raise FileNotFoundError(f"no checkpoints in {workdir}: train first (--mode=train), or "
                            "check --workdir")
  mesh = mesh_lib.make_mesh(config.mesh)
  model_def, abstract, _, _, _ = state_lib.setup(config, mesh, dict(config.sharding_rules))
  checkpointer = ckpt_lib.Checkpointer(directory, keep=1, create=False)
  try:
    steps = checkpointer.manager.all_steps()
    if not steps:
      raise FileNotFoundError(f"no complete checkpoint in {directory}")
    if step is not None and step not in steps:
      raise FileNotFoundError(f"no checkpoint of step {step} in {directory}; it has "
                              f"{sorted(steps)}")
    if step is None:   # the newest one that restores
      # Reads only: a damaged step is skipped but not moved (training may be writing here).
      state, step = checkpointer.restore_latest_good(abstract, None, set_aside=False)
    else:
      state = checkpointer.restore(abstract, None, step)
  finally:
    checkpointer.close()
  model = model_def.merge(state.ema, state.buffers, deterministic=True)
  return Restored(model, model_def, state, int(step), mesh)
