"""A training workdir: whether its storage answers, and its latest (or a given) checkpoint,
restored as the EMA model on the mesh."""

import logging as std_logging
import os
import threading
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


class StorageUnreachable(OSError):
  """A remote workdir's storage does not answer."""


class _LastMessage(std_logging.Handler):
  def __init__(self):
    super().__init__(std_logging.DEBUG)
    self.message = ""

  def emit(self, record):
    self.message = record.getMessage()


def check_reachable(workdir: str, timeout_s: float) -> None:
  """For a remote workdir (gs://), fail within `timeout_s` if its storage does not answer,
  naming the last error; the storage clients would otherwise retry for about a minute per
  request (gcsfs: 6 tries, 1 s to 32 s apart) before the first error is seen."""
  if "://" not in workdir:
    return
  result: dict[str, Any] = {}

  def probe():
    try:
      result["exists"] = epath.Path(workdir).exists()
    except Exception as e:  # pylint: disable=broad-except
      result["error"] = e

  gcsfs_log = std_logging.getLogger("gcsfs")
  retries = _LastMessage()   # gcsfs tells each retried error at DEBUG level
  level, propagate = gcsfs_log.level, gcsfs_log.propagate
  gcsfs_log.addHandler(retries)
  gcsfs_log.setLevel(std_logging.DEBUG)
  gcsfs_log.propagate = False
  try:
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
  finally:
    gcsfs_log.removeHandler(retries)
    gcsfs_log.setLevel(level)
    gcsfs_log.propagate = propagate
  if "error" in result:
    raise StorageUnreachable(f"the workdir {workdir} cannot be reached: "
                             f"{ckpt_lib.error_line(result['error'])}. Check the bucket's name, "
                             "the network and the credentials (gcloud auth "
                             "application-default login)")
  if "exists" not in result:
    last = f" (last error: {retries.message[:300]})" if retries.message else ""
    raise StorageUnreachable(f"the workdir {workdir} did not answer within {timeout_s:g} s{last}. "
                             "Check the bucket's name, the network and the credentials, or "
                             "allow longer with --storage_timeout")


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
    steps = checkpointer.steps(set_aside=False)
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
