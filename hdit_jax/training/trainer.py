"""The training loop: data, sharded state, the jitted step, checkpoints, measurements, samples.

Read top to bottom, this is the whole run. `python -m hdit_jax.main --config=... --workdir=...`
calls `train(config, workdir)` on every host.
"""

import contextlib
import os
import time
from typing import Any

import jax
import numpy as np
import tqdm
from absl import logging
from jax.experimental import multihost_utils

from hdit_jax import flops as flops_lib
from hdit_jax.data.pipeline import make_loader
from hdit_jax.evaluation.evaluator import Evaluator
from hdit_jax.sampling import batches, files
from hdit_jax.training import checkpoint as ckpt_lib
from hdit_jax.training import mesh as mesh_lib
from hdit_jax.training import preemption
from hdit_jax.training import metrics as metrics_lib
from hdit_jax.training import state as state_lib
from hdit_jax.training.export import ema_path, export_ema
from hdit_jax.training.optimizer import nonfinite_counts
from hdit_jax.training.step import jit_train_step
from hdit_jax.training.validate import ConfigError, validate_config
from hdit_jax.training.workdir import checkpoint_dir


class TrainingHalted(RuntimeError):
  """The run cannot go on (too many non-finite steps or failed checkpoint saves in a row); its
  last complete checkpoint is intact."""


class Interrupted(Exception):
  """Stopped by Ctrl-C with the step's checkpoint saved."""

  def __init__(self, step: int):
    super().__init__(f"interrupted at step {step}: checkpoint saved")
    self.step = step


class SaveFailures:
  """Counts failed checkpoint saves and stops the run after more than `limit` in a row."""

  def __init__(self, checkpointer: ckpt_lib.Checkpointer, limit: int):
    self.checkpointer, self.limit = checkpointer, limit
    self.total = self.in_a_row = 0

  def account(self, outcomes: list[ckpt_lib.SaveOutcome], final_step: int | None = None) -> None:
    """`final_step`: the run ends (or is preempted) with this step's save, so its failure stops
    it whatever the limit."""
    for outcome in outcomes:
      final = outcome.step == final_step
      if outcome.error is None:
        self.in_a_row = 0
        continue
      self.total += 1
      self.in_a_row += 1
      latest = self.checkpointer.latest_step()
      newest = (f"the newest complete checkpoint, step {latest}, is intact" if latest is not None
                else "no checkpoint is complete yet")
      if final or self.in_a_row > self.limit:
        why = ("it was the run's last" if final else
               f"{self.in_a_row} saves in a row failed (more than "
               f"training.max_consecutive_checkpoint_failures = {self.limit})")
        raise TrainingHalted(
            f"checkpoint step {outcome.step} could not be saved to {self.checkpointer.directory}"
            f" ({outcome.error}) and {why}; {newest}. Check the storage, then run again to "
            "resume from it.")
      logging.warning("checkpoint step %d could not be saved to %s (%s); %s, and training goes "
                      "on (%d saves failed in a row, at most %d allowed)", outcome.step,
                      self.checkpointer.directory, outcome.error, newest, self.in_a_row,
                      self.limit)


def _sum_over_hosts(value: int) -> int:
  if jax.process_count() == 1:
    return value
  return int(np.sum(multihost_utils.process_allgather(np.int64(value))))


def _global_batch(local: dict[str, np.ndarray], sharding: jax.sharding.NamedSharding):
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def train(config: Any, workdir: str, devices: list[jax.Device] | None = None
          ) -> state_lib.TrainState:
  """Train (resuming from the latest checkpoint in workdir) on `devices` (default: all)."""
  devices = devices or jax.devices()
  validate_config(config, len(devices), jax.process_count())
  is_host0 = jax.process_index() == 0
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  rules = dict(config.sharding_rules)
  logging.info("mesh %s on %d devices (%s)", dict(mesh.shape), len(devices),
               devices[0].device_kind)

  # The data first: its problems are the user's, and cheap to find before the model is built.
  try:
    loader, num_classes = make_loader(config, seed=config.seed)
  except (FileNotFoundError, ValueError) as e:   # a missing folder, no images, no such split
    raise ConfigError(f"data ({config.data.source} {config.data.name!r}): {e}") from None
  if config.model.get("num_classes", 0) and num_classes > config.model.num_classes:
    raise ConfigError(f"the dataset has {num_classes} classes but model.num_classes is "
                      f"{config.model.num_classes}: set --config.model.num_classes="
                      f"{num_classes}")

  model_def, abstract_state, shardings, tx, init = state_lib.setup(config, mesh, rules)
  data_iterator = iter(loader)

  training = config.training
  checkpointer = ckpt_lib.Checkpointer(
      checkpoint_dir(workdir), keep=training.keep_checkpoints,
      keep_every=training.keep_every, use_ocdbt=training.checkpoint_ocdbt,
      retries=training.checkpoint_retries,
      host_timeout_s=float(training.checkpoint_host_timeout))
  save_failures = SaveFailures(checkpointer, int(training.max_consecutive_checkpoint_failures))
  steps = checkpointer.steps()   # one list on every host, so that every host takes one branch
  latest = steps[-1] if steps else None
  if latest is not None and latest > training.num_steps:
    checkpointer.close()
    raise ConfigError(f"the checkpoint in {workdir} is at step {latest}, past "
                      f"training.num_steps = {training.num_steps}: raise training.num_steps to "
                      "train on, or use another workdir")
  if latest is not None:
    state, restored_step = checkpointer.restore_latest_good(abstract_state, data_iterator)
    if restored_step != latest:
      logging.warning("resuming from step %d: the newer checkpoints could not be restored (see "
                      "above)", restored_step)
  else:
    state = init()
  start_step = int(state.step)
  if start_step == training.num_steps:
    logging.info("the checkpoint in %s is at training.num_steps = %d: nothing to train",
                 workdir, start_step)

  batch_sharding = mesh_lib.batch_sharding(mesh)
  train_step = jit_train_step(config, model_def, tx, mesh, shardings)
  base_key = jax.random.key(config.seed)

  forward_gmacs = flops_lib.count(config.model)["gmacs_per_image"]
  flops_per_step = metrics_lib.train_flops_per_image(forward_gmacs) * config.data.batch_size
  peak = metrics_lib.peak_flops(devices[0], training.get("peak_tflops", 0.0))
  writer = metrics_lib.MetricWriter(workdir, enabled=is_host0, resume_step=start_step)
  watcher = preemption.PreemptionWatcher(checkpointer.manager)
  profile_start, profile_steps = training.profile_steps
  evaluator = (Evaluator(config, workdir, mesh, mesh_lib.BATCH_AXES)
               if config.evaluation.metric else None)
  evaluation_every = int(config.evaluation.every)
  progress = tqdm.tqdm(total=training.num_steps, initial=start_step, disable=not is_host0,
                       dynamic_ncols=True)

  last_time, last_step = time.perf_counter(), start_step
  step = start_step
  reported_skips = int(jax.device_get(nonfinite_counts(state.opt_state)["nonfinite_total"]))
  replaced_here = reported_replaced = 0   # unreadable image reads: on this host / last shown
  # Live JAX arrays with no save in flight (one in flight holds a copy of the state): flat over
  # a run without leaks, where the plain count depends on the saves' timing.
  live_between_saves = None
  try:
    while step < training.num_steps:
      if profile_steps and step == profile_start:
        jax.profiler.start_trace(os.path.join(workdir, "profile"))
      local = next(data_iterator)
      replaced_here += int(local.pop("replaced").sum())
      batch = _global_batch(local, batch_sharding)
      state, measurements = train_step(state, batch, base_key)
      step += 1
      if profile_steps and step == profile_start + profile_steps:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()

      if step % training.log_every == 0 or step == training.num_steps:
        measurements = jax.device_get(measurements)   # blocks: the timing below is honest
        now = time.perf_counter()
        seconds_per_step = (now - last_time) / (step - last_step)
        images_per_second = config.data.batch_size / seconds_per_step
        tflops = flops_per_step / seconds_per_step / len(devices) / 1e12
        measurements.update(step_time=seconds_per_step, images_per_second=images_per_second,
                            tflops_per_device=tflops)
        if peak:
          measurements["mfu"] = tflops * 1e12 / peak
        replaced = _sum_over_hosts(replaced_here)
        measurements["data_unreadable_total"] = replaced
        save_failures.account(checkpointer.finished())
        measurements["checkpoint_failures_total"] = save_failures.total
        measurements.update(metrics_lib.host_measurements())
        if live_between_saves is not None:
          measurements["live_arrays_between_saves"] = float(live_between_saves)
        writer.scalars(step, measurements)
        skips = int(measurements["nonfinite_total"])
        postfix = dict(loss=f"{measurements['loss']:.4f}", img_s=f"{images_per_second:.1f}")
        if skips:
          postfix["skipped"] = skips
        if replaced:
          postfix["bad_images"] = replaced
        progress.set_postfix(**postfix)
        if replaced > reported_replaced:
          logging.warning("step %d: %d reads of unreadable images so far in this run, each "
                          "replaced by the next readable image (the files are named in warnings "
                          "from the processes that read them)", step, replaced)
          reported_replaced = replaced
        in_a_row = int(measurements["nonfinite_consecutive"])
        if skips > reported_skips:
          logging.warning("step %d: %d steps with a non-finite loss or gradients skipped so far "
                          "(they leave the parameters unchanged), %d in a row now", step, skips,
                          in_a_row)
        # Checked at log steps: a streak is seen if it lasts to one (0: any skip at all).
        limit = training.max_consecutive_nonfinite
        if in_a_row > limit or (limit == 0 and skips > reported_skips):
          raise TrainingHalted(
              f"{max(in_a_row, 1)} steps in a row up to step {step} had a non-finite loss or "
              "gradients "
              f"(more than training.max_consecutive_nonfinite = "
              f"{training.max_consecutive_nonfinite}); they were skipped and the last "
              f"checkpoint (step {checkpointer.latest_step()}) is intact. Check the data and "
              "the learning rate, then run again to resume from it.")
        reported_skips = skips
        last_time, last_step = time.perf_counter(), step
      progress.update(1)

      sampled = bool(training.sample_every) and (
          step % training.sample_every == 0 or step == training.num_steps)
      evaluated = evaluator is not None and (
          step == training.num_steps or (evaluation_every and step % evaluation_every == 0))
      if sampled:
        write_samples(config, model_def.merge(state.ema, state.buffers, deterministic=True),
                      mesh, step, workdir, writer)
      if evaluated:
        writer.evaluation(step, evaluator(model_def.merge(state.ema, state.buffers,
                                                          deterministic=True)))
      if sampled or evaluated:
        # Sampling time is not training time: throughput restarts from here.
        jax.block_until_ready(state)
        last_time, last_step = time.perf_counter(), step
      preempted = watcher.preempted(step)
      final = step == training.num_steps or preempted
      if step % training.checkpoint_every == 0 or final:
        # The previous save's outcome first: a halt then leaves no save in flight.
        save_failures.account(checkpointer.finished(block=True))
        live_between_saves = len(jax.live_arrays())
        checkpointer.save(step, state, data_iterator)
        if final:
          save_failures.account(checkpointer.finished(block=True), final_step=step)
      if preempted:
        if watcher.interrupted:
          raise Interrupted(step)
        logging.warning("preempted at step %d: checkpoint saved, exiting", step)
        return state
    export_ema(config, model_def, state, ema_path(workdir, step),
               write=is_host0)
  finally:
    # Run last-in first-out, each even if one before it raises (the SIGTERM handler and the
    # metric uploads are never skipped).
    with contextlib.ExitStack() as closing:
      closing.callback(progress.close)
      closing.callback(writer.close)
      closing.callback(watcher.close)
      closing.callback(checkpointer.close)
  return state


def write_samples(config: Any, model: Any, mesh: jax.sharding.Mesh, step: int, workdir: str,
                  writer: metrics_lib.MetricWriter) -> None:
  """A grid of samples (workdir/samples/samples_<step>.png, its labels beside it, TensorBoard)
  from the EMA model, drawn over the training mesh from the sharded weights. A conditional
  model draws the classes in turn: with up to 16 classes, each column of the grid is one."""
  num_images = int(config.training.num_sample_images)
  num_classes = int(config.model.get("num_classes", 0))
  labels = np.arange(num_images) % num_classes if num_classes else None
  images, labels = batches.sample_images(
      model, config, num_images, config.seed + 1, labels=labels, mesh=mesh,
      batch_axes=mesh_lib.BATCH_AXES, progress=False)
  if jax.process_index() == 0:
    columns = num_classes if 0 < num_classes <= 16 else None
    path = os.path.join(workdir, "samples", f"samples_{step:08d}.png")
    try:
      picture = files.write_grid(images, labels if num_classes else None, path, columns)
    except Exception as e:  # pylint: disable=broad-except
      # A sample grid is worth a warning, not the run.
      logging.warning("could not write the sample grid %s (%s); training goes on", path,
                      ckpt_lib.error_line(e))
      return
    writer.image(step, "samples", picture)
