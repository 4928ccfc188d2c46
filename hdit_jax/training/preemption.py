"""SIGTERM, Ctrl-C and the TPU runtime's preemption notice, seen by the training loop."""

import os
import signal
import sys
import threading

import jax
import orbax.checkpoint as ocp
from absl import logging


class PreemptionWatcher:
  """Notices SIGTERM (and the TPU runtime's preemption notice on multi-host) so that the loop
  can save and exit cleanly. On a single process the first Ctrl-C (SIGINT) does the same, and
  marks the stop `interrupted`; a second one ends the process at once. Several
  processes keep Python's Ctrl-C: one host's save alone could not complete."""

  def __init__(self, manager: ocp.CheckpointManager | None = None):
    self._flag = threading.Event()
    self._manager = manager
    self.interrupted = False
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)
      if jax.process_count() == 1:
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and exiting")
    self._flag.set()

  def _on_sigint(self, signum, frame):
    del signum, frame
    if self.interrupted:   # the second Ctrl-C: at once (a save in flight never replaces the
      # last complete checkpoint; a KeyboardInterrupt could land in a callback and be lost)
      print("interrupted again: stopped without saving", file=sys.stderr, flush=True)
      os._exit(130)  # pylint: disable=protected-access
    logging.warning("Ctrl-C: saving a checkpoint and exiting (Ctrl-C again stops at once)")
    self.interrupted = True
    self._flag.set()

  def preempted(self, step: int) -> bool:
    if self._flag.is_set():
      return True
    if self._manager is not None and jax.process_count() > 1:
      # All hosts agree on the step through JAX's preemption sync point.
      return bool(self._manager.reached_preemption(step))
    return False

  def close(self) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}
