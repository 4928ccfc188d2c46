"""SIGTERM and the TPU runtime's preemption notice, seen by the training loop."""

import signal
import threading

import jax
import orbax.checkpoint as ocp
from absl import logging


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
