"""Orbax checkpoints of the train state and the data iterator, local or on gs://.

Saves are asynchronous; orbax commits a step only once it is complete, so a crash,
preemption or storage failure mid-save leaves the last good checkpoint as the latest, and
the uncommitted remains are removed when the directory is next opened. A save that fails
(tensorstore retries each request `retries` times first) is reported by `finished()`, not
raised: the loop decides whether to go on. Keeps the last `keep` steps plus every multiple
of `keep_every`.
"""

import logging as std_logging
import os
import time
from typing import Any, NamedTuple

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from hdit_jax.training import checkpoint_integrity as integrity
from hdit_jax.training import host_agreement as agreement
from hdit_jax.training.checkpoint_integrity import CheckpointError
from hdit_jax.training.host_agreement import StrandedHosts
from hdit_jax.training.validate import ConfigError


def error_line(error: BaseException) -> str:
  """An exception as one short line for a log or an error message: its type and first line,
  and its cause's where it has one (orbax's read errors say which array index failed, and
  their cause which file and why); tensorstore's spec dumps are left out."""
  def first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    line = lines[0].split(" See full TensorStore details")[0] if lines else ""
    return f"{type(e).__name__}: {line[:200]}"
  cause = error.__cause__
  return first_line(error) + (f" ({first_line(cause)})" if cause is not None else "")


class _LastOrbaxError(std_logging.Handler):
  """The last error that orbax logged: some failures of a background save are only logged
  (the step is then left uncommitted), not raised."""

  def __init__(self):
    super().__init__(std_logging.ERROR)
    self.reason: str | None = None

  def emit(self, record: std_logging.LogRecord) -> None:
    if f"{os.sep}orbax{os.sep}" in record.pathname:
      error = record.exc_info[1] if record.exc_info else None
      self.reason = error_line(error) if error is not None else record.getMessage()[:300]


class SaveOutcome(NamedTuple):
  step: int
  error: str | None   # None: committed


def set_storage_retries(retries: int) -> None:
  """How often tensorstore retries a failed request to GCS (exponential back-off from 1 s to
  32 s between tries; tensorstore's default is 32) before the array write, and so the save,
  fails. Orbax builds its tensorstore context from these module defaults and offers no
  other hook."""
  from orbax.checkpoint._src.serialization import tensorstore_utils  # pylint: disable=import-outside-toplevel
  for context in (tensorstore_utils._BASE_TS_CONTEXT,  # pylint: disable=protected-access
                  tensorstore_utils._DEFAULT_OCDBT_TS_CONTEXT):  # pylint: disable=protected-access
    context["gcs_request_retries"] = {"max_retries": int(retries)}


class Checkpointer:
  """Saves the steps it is given and restores the latest complete one, onto any mesh.

  `use_ocdbt` (orbax's default format, few large files) can be turned off for storage that
  does not implement GCS's object generations fully (the local GCS emulator).
  """

  def __init__(self, directory: str, *, keep: int, keep_every: int | None = None,
               asynchronous: bool = True, use_ocdbt: bool = True, create: bool = True,
               retries: int | None = None, host_timeout_s: float = 300):
    if retries is not None:
      set_storage_retries(retries)
    options = ocp.CheckpointManagerOptions(
        # The loop decides when to save; orbax keeps and deletes.
        save_interval_steps=1, max_to_keep=keep, keep_period=keep_every or None,
        enable_async_checkpointing=asynchronous, create=create,
        # Remains of saves that never committed (a crash, a storage failure): a step directory
        # without its commit marker on gs://, a temporary directory locally.
        cleanup_tmp_directories=create)
    try:
      self.manager = ocp.CheckpointManager(
          directory, options=options,
          item_handlers={"state": ocp.StandardCheckpointHandler(use_ocdbt=use_ocdbt),
                         "data": grain.checkpoint.CheckpointHandler(),
                         "fingerprint": ocp.JsonCheckpointHandler()})
    except Exception as e:  # pylint: disable=broad-except
      raise OSError(f"cannot open the checkpoint directory {directory}: "
                    f"{type(e).__name__}: {e}") from e
    self.directory = directory
    # How long a host waits for the others' word on a save's start or a restore before it takes
    # the silent ones to be stuck in orbax's barriers (collectives that never time out). Long
    # enough for the slowest host's own failure to surface (tensorstore's retries).
    self.host_timeout_s = host_timeout_s
    self._stranded = False   # set when this host stops the job: the others wait in orbax
    self._in_flight: int | None = None   # the step being saved in the background
    self._outcomes: list[SaveOutcome] = []
    # On absl's logger, ahead of the handlers that print (and may shorten) its records.
    self._orbax_errors = _LastOrbaxError()
    std_logging.getLogger("absl").addHandler(self._orbax_errors)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iterator: Any) -> bool:
    """Start saving `step` (after the previous save has ended); False if it is saved already."""
    self._settle(block=True)
    latest = self.manager.latest_step()
    # Decided together: a host that skipped orbax's save would leave the others in its barriers.
    if not agreement.on_every_process(latest != step):
      return False
    args = {"state": ocp.args.StandardSave(state),
            "fingerprint": ocp.args.JsonSave(integrity.fingerprint(state))}
    if data_iterator is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self._orbax_errors.reason = None
    error = None
    try:
      started = self.manager.save(step, args=ocp.args.Composite(**args), force=True)
    except Exception as e:  # pylint: disable=broad-except
      # Its start failed (the directory could not be made, storage unreachable).
      started, error = False, error_line(e)
    # Every process takes the same view, so that later collectives pair up.
    reports = self._reports(error is None)
    if None in reports:
      silent = [rank for rank, ok in enumerate(reports) if ok is None]
      here = (f"could not be started on host {jax.process_index()} ({error})" if error else
              f"began on host {jax.process_index()}")
      raise self._stop(
          f"checkpoint step {step} {here}, and host(s) {', '.join(map(str, silent))} did not "
          f"say within {self.host_timeout_s:.0f} s whether it began there: the hosts no longer "
          f"agree on the save, and the job cannot go on. The newest complete checkpoint, step "
          f"{latest}, is intact: run the job again to resume from it.")
    if not all(reports):
      self._reload()
      self._outcomes.append(SaveOutcome(step, error or "its start failed on another host"))
      if started:   # begun here, failed elsewhere: let it end, it is not counted as saved
        self._quietly_wait()
      return False
    if started:
      self._in_flight = step
    return started

  def _reports(self, ok: bool) -> list[bool | None]:
    try:
      return agreement.reports_of_every_process(ok, self.host_timeout_s)
    except StrandedHosts:
      self._stranded = True
      raise

  def _stop(self, message: str) -> StrandedHosts:
    self._stranded = True
    return agreement.stop_the_job(message)

  def finished(self, block: bool = False) -> list[SaveOutcome]:
    """The saves that have ended since the last call, committed or failed; with `block`, after
    waiting for the one in flight. The same on every process (call it on all at once)."""
    self._settle(block)
    outcomes, self._outcomes = self._outcomes, []
    return outcomes

  def _reload(self) -> str | None:
    """Read the steps from storage again; the reason if storage cannot be listed."""
    try:
      self.manager.reload()
      return None
    except Exception as e:  # pylint: disable=broad-except
      return f"its directory cannot be listed ({error_line(e)})"

  def _quietly_wait(self) -> str | None:
    try:
      self.manager.wait_until_finished()
      return None
    except Exception as e:  # pylint: disable=broad-except
      return error_line(e)

  def _settle(self, block: bool) -> None:
    if self._in_flight is None:
      return
    if not block and not agreement.on_every_process(not self.manager.is_saving_in_progress()):
      return
    step, self._in_flight = self._in_flight, None
    error = self._quietly_wait()
    # Committed means: in storage. Not the in-memory list, which dropped the steps this save
    # replaces and keeps a step whose failure orbax only logged.
    listing_error = self._reload()
    committed = listing_error is None and step in self.manager.all_steps()
    if not committed and error is None:
      error = listing_error or ((self._orbax_errors.reason or "orbax ended the save without "
                                 "committing it") + " (the step was not committed)")
    if agreement.on_every_process(committed):
      if error is not None:
        logging.warning("checkpoint step %d is complete in storage although a process reported "
                        "%s", step, error)
      self._outcomes.append(SaveOutcome(step, None))
    else:
      self._outcomes.append(SaveOutcome(step, error or "it was not committed on another host"))

  def restore(self, abstract_state: Any, data_iterator: Any, step: int | None = None) -> Any:
    """Restore into `abstract_state`'s shapes and shardings (any mesh); the iterator in place."""
    step = self.manager.latest_step() if step is None else step
    restored, error = self._agreed_read(abstract_state, data_iterator, step, tries=1,
                                        set_aside=False)
    if restored is None:
      raise error or CheckpointError(f"checkpoint step {step} in {self.directory} cannot be "
                                     "restored on another host (its log says why)")
    self._verify(restored, step)
    return restored["state"]

  def _agreed_read(self, abstract_state: Any, data_iterator: Any, step: int, tries: int,
                   set_aside: bool) -> tuple[dict[str, Any] | None, BaseException | None]:
    """(the step's items, None) where it was read on every process, else (None, this
    process's error or None); one that did not say stops the job (_strand_on_restore)."""
    restored, error = None, None
    for _ in range(tries):
      try:
        restored = self._read(abstract_state, data_iterator, step)
        break
      except ConfigError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        error = e
    reports = self._reports(restored is not None)
    if None in reports:
      self._strand_on_restore(step, error, reports, set_aside)
    return (restored, None) if all(reports) else (None, error)

  def _read(self, abstract_state: Any, data_iterator: Any, step: int) -> dict[str, Any]:
    """A step's items as orbax restores them (no collective of this module's own)."""
    integrity.check_same_model(self._saved_shapes(step), abstract_state, step, self.directory)
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    if (epath.Path(self.directory) / str(step) / "fingerprint").exists():
      args["fingerprint"] = ocp.args.JsonRestore()
    try:
      return self.manager.restore(step, args=ocp.args.Composite(**args))
    except ValueError as e:
      if "in checkpoint does not match" not in str(e):
        raise
      # Not damage: grain refuses a data position saved by another input pipeline (its worker
      # count, or its sampler: hosts, workers, dataset size, seed).
      raise ConfigError(
          f"checkpoint step {step} in {self.directory} holds the data position of another input "
          f"pipeline ({' '.join(str(e).split())}): resume with the same number of hosts, "
          "data.num_workers, dataset and seed, or start a new workdir") from None

  def _verify(self, restored: dict[str, Any], step: int) -> None:
    """Compare the restored arrays with the fingerprint saved beside them (a collective)."""
    if restored.get("fingerprint") is not None:
      integrity.check_fingerprint(restored["fingerprint"],
                                  integrity.fingerprint(restored["state"]))
    else:
      logging.warning("checkpoint step %d in %s has no fingerprint: its arrays are not verified",
                      step, self.directory)
    logging.info("restored step %d from %s", step, self.directory)

  def steps(self, set_aside: bool = True) -> list[int]:
    """The complete steps, as every process lists them. With `set_aside`, a step that some
    process does not list (its listing failed or is stale) is moved to STEP.unlisted by process
    0 and every process reads the directory again: the hosts' orbax managers must hold one
    list, or a later save of that step would fail on some of them only."""
    common, unlisted = agreement.steps_on_every_process(self.manager.all_steps())
    if unlisted and set_aside:
      logging.warning("checkpoint steps %s in %s are not listed on every host: set aside as "
                      "STEP.unlisted (complete, perhaps; kept)", unlisted, self.directory)
      self._set_aside(unlisted, "unlisted")
    return common

  def restore_latest_good(self, abstract_state: Any, data_iterator: Any,
                          set_aside: bool = True) -> tuple[Any, int]:
    """(state, step) of the newest checkpoint that restores on every process. A damaged newer
    one (a truncated or altered array file, missing metadata) is named in the log and, with
    `set_aside`, moved to STEP.damaged; a checkpoint of another model is refused, not skipped.

    A step that fails on some hosts only leaves the others inside orbax's restore, waiting for
    them: a host that failed moves it aside (with `set_aside`) and raises StrandedHosts, and
    the job's next start restores the one before."""
    failures, damaged = [], []
    for step in reversed(self.steps(set_aside)):
      # A second try, so that a passing storage error is not damage.
      restored, error = self._agreed_read(abstract_state, data_iterator, step, 2, set_aside)
      if restored is not None:
        try:
          self._verify(restored, step)   # the same verdict on every host
          self._set_aside(damaged if set_aside else [])
          return restored["state"], step
        except CheckpointError as e:
          error = e
      reason = error_line(error) if error is not None else "it failed on another host"
      failures.append(f"step {step}: {reason}")
      logging.warning("checkpoint step %d in %s cannot be restored (%s); trying the one before",
                      step, self.directory, reason)
      damaged.append(step)
    raise CheckpointError(f"no checkpoint in {self.directory} can be restored: "
                          + "; ".join(failures))

  def _strand_on_restore(self, step: int, error: BaseException | None,
                         reports: list[bool | None], set_aside: bool) -> None:
    silent = ", ".join(str(rank) for rank, ok in enumerate(reports) if ok is None)
    here = f"host {jax.process_index()}"
    if error is None:
      what = f"was restored on {here}, but host(s) {silent} did not say whether it was there"
    else:
      what = (f"cannot be restored on {here} ({error_line(error)}), and host(s) {silent} wait "
              "inside the restore for it")
      # One mover: the first host that failed (two renames at once would race; on gs:// a
      # rename is a copy and a delete per object).
      mover = min(rank for rank, ok in enumerate(reports) if ok is False)
      if not set_aside:
        what += (". Restore an earlier step (--step), or move this one aside (to "
                 f"{step}.damaged) and run again")
      elif mover != jax.process_index():
        what += f". Host {mover} moves it aside: the job's next start restores the one before it"
      elif moved := self._move_aside(step):
        what += f". It was moved to {moved}: the job's next start restores the one before it"
      else:
        what += ". It could not be moved aside: move it yourself, then run the job again"
    raise self._stop(
        f"checkpoint step {step} in {self.directory} {what}. The hosts no longer agree on the "
        "restore, and the job cannot go on.")

  def _move_aside(self, step: int, suffix: str = "damaged") -> str | None:
    """Move a step to STEP.<suffix> (a later name if that exists); where it went, or None."""
    source = epath.Path(self.directory) / str(step)
    target = epath.Path(self.directory) / f"{step}.{suffix}"
    if target.exists():
      target = target.parent / f"{step}.{suffix}.{int(time.time())}"
    try:
      source.rename(target)
    except OSError as e:
      logging.warning("could not move the checkpoint %s aside (%s)", source, e)
      return None
    logging.warning("moved the checkpoint %s to %s (delete it yourself once you have looked at "
                    "it)", source, target)
    return str(target)

  def _set_aside(self, steps: list[int], suffix: str = "damaged") -> None:
    """Move steps to STEP.<suffix> (damaged ones: kept for a look, out of the way of the steps
    that training writes again and of the keep-last-K count, which would delete good ones)."""
    if not steps:
      return
    if jax.process_index() == 0:   # left in place if it fails: the others must not wait
      for step in steps:
        self._move_aside(step, suffix)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"hdit_jax: checkpoints set aside as {suffix}")
    self.manager.reload()

  def _saved_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
    """Array name -> shape of the whole saved state, from a step's metadata."""
    metadata = self.manager.item_metadata(step)["state"]
    if metadata is None:
      raise CheckpointError("its metadata is missing or unreadable")
    return integrity.shapes(metadata.tree if hasattr(metadata, "tree") else metadata)

  def wait(self) -> None:
    """Wait for the save in flight; its outcome is kept for `finished()`."""
    self._settle(block=True)

  def close(self) -> None:
    """Wait for the save in flight and close; a failure not collected is logged."""
    if self._stranded:   # the other hosts wait inside orbax: closing it would wait for them
      std_logging.getLogger("absl").removeHandler(self._orbax_errors)
      return
    try:
      for outcome in self.finished(block=True):
        if outcome.error:
          logging.error("checkpoint step %d in %s was not saved: %s", outcome.step,
                        self.directory, outcome.error)
    finally:
      std_logging.getLogger("absl").removeHandler(self._orbax_errors)
      self.manager.close()
