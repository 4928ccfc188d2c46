"""Orbax checkpoints of the train state and the data iterator, local or on gs://.

Saves are asynchronous; orbax commits a step only once it is complete, so a crash or
preemption mid-save leaves the last good checkpoint as the latest. Keeps the last
`keep` steps plus every multiple of `keep_every`.
"""

import signal
import threading
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
  """Saves the steps it is given and restores the latest complete one, onto any mesh.

  `use_ocdbt` (orbax's default format, few large files) can be turned off for storage that
  does not implement GCS's object generations fully (the local GCS emulator).
  """

  def __init__(self, directory: str, *, keep: int, keep_every: int | None = None,
               asynchronous: bool = True, use_ocdbt: bool = True, create: bool = True):
    options = ocp.CheckpointManagerOptions(
        # The loop decides when to save; orbax keeps and deletes.
        save_interval_steps=1, max_to_keep=keep, keep_period=keep_every or None,
        enable_async_checkpointing=asynchronous, create=create)
    try:
      self.manager = ocp.CheckpointManager(
          directory, options=options,
          item_handlers={"state": ocp.StandardCheckpointHandler(use_ocdbt=use_ocdbt),
                         "data": grain.checkpoint.CheckpointHandler()})
    except Exception as e:  # pylint: disable=broad-except
      raise OSError(f"cannot open the checkpoint directory {directory}: "
                    f"{type(e).__name__}: {e}") from e
    self.directory = directory

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iterator: Any) -> bool:
    if self.manager.latest_step() == step:
      return False
    args = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**args), force=True)

  def restore(self, abstract_state: Any, data_iterator: Any, step: int | None = None) -> Any:
    """Restore into `abstract_state`'s shapes and shardings (any mesh); the iterator in place."""
    step = self.manager.latest_step() if step is None else step
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    logging.info("restored step %d from %s", step, self.directory)
    return restored["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


class PreemptionWatcher:
  """Notices SIGTERM (and the TPU runtime's preemption notice on multi-host) so that the loop
  can save and exit cleanly."""

  def __init__(self, manager: ocp.CheckpointManager | None = None):
    self._flag = threading.Event()
    self._manager = manager
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)
    else:
      self._previous = None

  def _on_signal(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and exiting")
    self._flag.set()

  def preempted(self, step: int) -> bool:
    if self._flag.is_set():
      return True
    if self._manager is not None and jax.process_count() > 1:
      # All hosts agree on the step through JAX's preemption sync point.
      return bool(self._manager.reached_preemption(step))
    return False

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
