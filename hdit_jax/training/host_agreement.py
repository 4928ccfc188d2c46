"""How the processes (hosts) of a job agree on a checkpoint's outcome.

orbax's barriers inside a save and a restore are collectives that never time out: a host that
fails before one of them leaves the others waiting there, and the next collective it runs
pairs with theirs (gloo aborts; an accelerator hangs). So whether a save began and whether a
restore succeeded is agreed through JAX's coordination service instead (a barrier with a
timeout, then one read of every host's word), and a host that hears nothing stops the job,
its reason left for the others first.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import distributed   # the coordination service's key-value store: no public API
from jax.experimental import multihost_utils


class StrandedHosts(RuntimeError):
  """A save's start or a restore failed on some hosts while the others went into it: those wait
  inside orbax's collectives for hosts that cannot join them again. The job must stop (`main`
  exits at once, past every closer that would wait for them)."""


_agreements = itertools.count()
_STOPPED_KEY = "hdit_jax/stopped_by"   # a host's word that it stopped the job, and why
_SERVICE_GONE = ("the job's coordination service (in process 0) is gone: process 0 stopped; "
                 "its log has the reason")


def on_every_process(ok: bool) -> bool:
  """`ok` on every process (a collective: only where every host runs this same code)."""
  if jax.process_count() == 1:
    return ok
  return bool(multihost_utils.process_allgather(jnp.asarray(ok)).all())


def steps_on_every_process(steps: list[int]) -> tuple[list[int], list[int]]:
  """(the steps every process lists, those only some list), from each process's `steps`."""
  if jax.process_count() == 1:
    return sorted(steps), []
  most = int(multihost_utils.process_allgather(jnp.asarray(len(steps))).max())
  padded = np.full(max(most, 1), -1, np.int32)
  padded[:len(steps)] = steps
  listed = [set(row.tolist()) - {-1} for row in np.asarray(
      multihost_utils.process_allgather(jnp.asarray(padded))).reshape(jax.process_count(), -1)]
  common = set.intersection(*listed)
  return sorted(common), sorted(set.union(*listed) - common)


def _client():
  client = distributed.global_state.client
  if client is None:
    raise RuntimeError(
        f"{jax.process_count()} JAX processes without jax.distributed.initialize(): the hosts' "
        "checkpoints agree through its coordination service; call it first (python -m "
        "hdit_jax.main does)")
  return client


def stop_the_job(message: str) -> StrandedHosts:
  """The error to raise on a host that stops the job, its reason left for the other hosts
  first: they may be waiting for it inside a collective that its exit breaks."""
  if jax.process_count() > 1:
    try:
      _client().key_value_set(_STOPPED_KEY, f"host {jax.process_index()}: {message}")
    except jax.errors.JaxRuntimeError:   # another host said it first, or the service is gone
      pass
  return StrandedHosts(message)


def _raise_if_another_host_stopped() -> None:
  try:
    word = _client().key_value_try_get(_STOPPED_KEY)
  except jax.errors.JaxRuntimeError as e:
    if "NOT_FOUND" in str(e):
      return
    raise StrandedHosts(_SERVICE_GONE) from None
  raise StrandedHosts(f"the job was stopped by {word}")


def reports_of_every_process(ok: bool, timeout_s: float) -> list[bool | None]:
  """Each process's `ok`, None where one did not report within `timeout_s`. Where it went
  wrong, a host that stopped the job first (and so broke the collectives the others wait in)
  is named instead, by raising StrandedHosts."""
  if jax.process_count() == 1:
    return [ok]
  if not ok:
    _raise_if_another_host_stopped()
  client, name = _client(), f"hdit_jax/agreement/{next(_agreements)}"
  try:
    client.key_value_set(f"{name}/{jax.process_index()}", str(int(ok)))
    try:
      client.wait_at_barrier(name, max(1, int(timeout_s * 1000)))
    except jax.errors.JaxRuntimeError:   # (DEADLINE_EXCEEDED) a host did not come
      pass
    said = dict(client.key_value_dir_get(f"{name}/"))
  except jax.errors.JaxRuntimeError:
    raise StrandedHosts(_SERVICE_GONE) from None
  reports = [None if said.get(f"{name}/{rank}") is None else said[f"{name}/{rank}"] == "1"
             for rank in range(jax.process_count())]
  if None in reports:
    _raise_if_another_host_stopped()
  return reports
