"""One of two JAX processes saving and restoring through one Checkpointer, with failures that
strike one host or both (run by test_multihost.py), failures injected inside orbax:
  python two_host_checkpoints.py DIR PORT RANK SCENARIO [FAILING_HOST]
SCENARIO: agree, strand_save, strand_restore or resume. Prints one JSON line per stage."""

import json
import sys

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from hdit_jax import main as main_lib
from hdit_jax.training import checkpoint as ckpt_lib


def main(directory: str, port: int, rank: int, scenario: str, failing: int) -> None:
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=rank)
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  state = {"w": jax.device_put(jnp.arange(16.0), sharding),
           "b": jax.device_put(jnp.ones((8, 3)), sharding)}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          state)
  checkpointer = ckpt_lib.Checkpointer(directory, keep=10, host_timeout_s=10)
  manager = checkpointer.manager
  inner = manager._checkpointer  # pylint: disable=protected-access   # orbax's own checkpointer

  def report(stage: str, **values) -> None:
    print(json.dumps(dict(stage=stage, **values)), flush=True)

  def outcomes():
    return [list(o) for o in checkpointer.finished(block=True)]

  def fails(target, method: str, error: Exception, hosts=(failing,), times: int = 1):
    """`target.method` raises `error` on its next `times` calls on `hosts`."""
    if rank not in hosts:
      return
    original, left = getattr(target, method), [times]

    def failing_call(*args, **kwargs):
      if left[0] > 0:
        left[0] -= 1
        raise error
      return original(*args, **kwargs)
    setattr(target, method, failing_call)

  def restored_latest():
    restored, step = checkpointer.restore_latest_good(abstract, None)
    w = multihost_utils.process_allgather(restored["w"], tiled=True)
    report("restored", step=step, w0=float(w[0]), steps=manager.all_steps())

  try:
    if scenario in ("resume", "strand_restore"):
      if scenario == "strand_restore":
        # The newest step cannot be read on one host (twice: not a passing error); the other
        # reads it and waits in orbax's barrier at the end of the restore.
        fails(inner, "_restore", OSError("injected: a shard cannot be read"), times=2)
      restored_latest()
      checkpointer.close()
      return
    checkpointer.save(1, state, None)
    report("saved", outcomes=outcomes())
    if scenario == "strand_save":
      # One host's save of step 2 fails inside orbax (past its first barrier); the other goes
      # on into orbax's next barrier and waits there for it.
      fails(inner, "save", OSError("injected: the step's directory cannot be made"))
      checkpointer.save(2, jax.tree.map(lambda x: x + 2, state), None)
      report("saved", outcomes=outcomes())   # never reached
      return
  except ckpt_lib.StrandedHosts as e:
    main_lib.exit_stranded(e)

  # Storage refuses step 2 on both hosts: a failed save, and training goes on.
  fails(inner, "save", OSError("injected: storage refused the step"), hosts=(0, 1))
  started = checkpointer.save(2, jax.tree.map(lambda x: x + 2, state), None)
  report("start failed", started=started, outcomes=outcomes(), latest=manager.latest_step())
  checkpointer.save(3, jax.tree.map(lambda x: x + 3, state), None)
  report("saved", outcomes=outcomes())
  # Step 4 is written, but host 1 cannot list the directory to see it committed.
  checkpointer.save(4, jax.tree.map(lambda x: x + 4, state), None)
  fails(manager, "reload", OSError("injected: listing refused"), hosts=(1,))
  report("listing failed", outcomes=outcomes())
  # Host 1's listing lacks step 4 (stale): both hosts restore step 3, step 4 is set aside, and
  # training saves step 4 again on both.
  if rank == 1:
    listed = manager.all_steps
    manager.all_steps = lambda: [s for s in listed() if s != 4]
  restored_latest()
  if rank == 1:
    manager.all_steps = listed
  checkpointer.save(4, jax.tree.map(lambda x: x + 40, state), None)
  report("saved again", outcomes=outcomes(), steps=manager.all_steps())
  checkpointer.close()


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4],
       int(sys.argv[5]) if len(sys.argv) > 5 else 1)
