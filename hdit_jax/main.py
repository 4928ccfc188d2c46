"""Entry point: train, sample, evaluate, or export, from an ml_collections config.

  python -m hdit_jax.main --config=configs/imagenet256.py --workdir=gs://BUCKET/run
  python -m hdit_jax.main --config=configs/quickstart.py --workdir=/tmp/q --mode=sample
  python -m hdit_jax.main --config=configs/quickstart.py --workdir=/tmp/q --mode=evaluate

Run the same command on every host of a TPU slice; `jax.distributed.initialize()` finds the
others (it is skipped on one host).
"""

import importlib.util
import logging as std_logging
import os
import re
import sys
import traceback

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from hdit_jax import cli
from hdit_jax.evaluation.evaluator import Evaluator
from hdit_jax.sampling import batches, files
from hdit_jax.training import checkpoint as ckpt_lib
from hdit_jax.training import mesh as mesh_lib
from hdit_jax.training import metrics as metrics_lib
from hdit_jax.training import trainer
from hdit_jax.training import workdir as workdir_lib
from hdit_jax.training.export import ema_path, export_ema
from hdit_jax.training.validate import ConfigError, validate_config

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory, local or gs://.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample", "evaluate", "export"],
                          "train: train (resuming from the latest checkpoint); sample: an arr_0 "
                          ".npz and a grid from a checkpoint's EMA weights; evaluate: "
                          "config.evaluation's metric of a checkpoint, to eval.jsonl; export: "
                          "the EMA weights as an hdit-jax weight file.")
_STEP = flags.DEFINE_integer("step", None, "sample / evaluate / export: the checkpoint's step "
                             "(default: the latest).")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 64, "sample: number of images.")
_SEED = flags.DEFINE_integer("seed", 0, "sample: random seed.")
_PNGS = flags.DEFINE_bool("pngs", False, "sample: also write one PNG per image.")
_STORAGE_TIMEOUT = flags.DEFINE_float("storage_timeout", 20.0, "Seconds a gs:// workdir has to "
                                      "answer at the start before the run gives up.")


PREEMPTED_EXIT_CODE = 75   # EX_TEMPFAIL
INTERRUPTED_EXIT_CODE = 130   # 128 + SIGINT, as a shell reports Ctrl-C


def _announces_several_processes() -> bool:
  """Whether the environment says that this is one of several processes (then a failure to
  join them is an error, never a silent fallback to independent runs)."""
  env = os.environ
  return ("," in env.get("TPU_WORKER_HOSTNAMES", "") or bool(env.get("JAX_COORDINATOR_ADDRESS"))
          or int(env.get("SLURM_NTASKS", "1") or 1) > 1
          or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1)


def initialize_distributed() -> None:
  """Join the other hosts: TPU slices, SLURM and Open MPI are detected by JAX; elsewhere set
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID."""
  explicit = {}
  if os.environ.get("JAX_NUM_PROCESSES"):
    explicit = dict(num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                    process_id=int(os.environ["JAX_PROCESS_ID"]))
  try:
    jax.distributed.initialize(**explicit)
  except (ValueError, RuntimeError) as e:
    if _announces_several_processes():
      raise
    logging.info("single host (%s)", e)


def _flag_values(argv: list[str], name: str) -> list[str]:
  """The values given to --name (as --name=v or --name v), in order."""
  values = []
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      values.append(arg.split("=", 1)[1])
    elif arg == f"--{name}" and i + 1 < len(argv):
      values.append(argv[i + 1])
  return values


def _check_config_file(argv: list[str]) -> None:
  """The --config file's problems in one line (ml_collections reports them as tracebacks, or
  later, as an OSError about an earlier failure): missing, not Python, no get_config, or a
  get_config that refuses its argument."""
  given = _flag_values(argv, "config")
  if not given:
    return
  path, _, arg = given[-1].partition(":")
  if not os.path.isfile(path):
    cli.exit_with_error(f"--config: no config file {path}")
  spec = importlib.util.spec_from_file_location("hdit_jax_checked_config", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    cli.exit_with_error(f"--config: {path} is not valid Python: {e.msg} (line {e.lineno})")
  except Exception as e:  # pylint: disable=broad-except
    cli.exit_with_error(f"--config: loading {path} failed: {type(e).__name__}: {e}")
  if not callable(getattr(module, "get_config", None)):
    cli.exit_with_error(f"--config: {path} defines no get_config(), which a config file must "
                     "(see configs/quickstart.py)")
  try:
    module.get_config(arg) if arg else module.get_config()
  except Exception as e:  # pylint: disable=broad-except
    cli.exit_with_error(f"--config: {given[-1]}: {e}")


def _override_error(error: Exception, argv: list[str]) -> str:
  """A failed --config.* override, named: ml_collections says only the key (`'widht'`)."""
  overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
  if isinstance(error, (KeyError, AttributeError)) and error.args:
    key = str(error.args[0]).strip("'\"")
    for override in overrides:
      path = override.split("=", 1)[0]
      if key in path.split("."):
        return (f"--config.{path}: the config has no key {key!r}. Every key must exist in "
                "hdit_jax/config.py (its defaults) or the config file.")
  return (f"a --config.* override cannot be applied: {error}. Every key must exist in "
          "hdit_jax/config.py (its defaults) and take a value of the default's type.")


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a config file's problems and a config override that names no
  key (or a value of the wrong type) reported in one line instead of ml_collections'
  traceback."""
  _check_config_file(argv)
  try:
    return cli.parse_flags(argv)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    cli.exit_with_error(_override_error(e, argv))


def _check_workdir(workdir: str) -> None:
  """A local workdir must be a directory, or one that training can create (nothing is created
  here: a run refused for its config leaves no workdir behind)."""
  if "://" in workdir:
    return
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    cli.exit_with_error(f"--workdir {workdir} is a file: give a directory (training creates it)")
  parent = cli.existing_ancestor(workdir)
  if not os.path.isdir(parent):
    cli.exit_with_error(f"--workdir {workdir} cannot be created: {parent} is a file")


# tensorstore's errors begin with an absl status code: "OUT_OF_RANGE: Error reading ...".
_TENSORSTORE_STATUS = re.compile(r"^[A-Z][A-Z_]+: ")


def _from_orbax(error: BaseException | None) -> bool:
  """Whether an exception was raised in orbax (or in tensorstore under it)."""
  while error is not None:
    frames = traceback.extract_tb(error.__traceback__)
    if any(f"{os.sep}orbax{os.sep}" in frame.filename for frame in frames):
      return True
    error = error.__cause__ or error.__context__
  return False


def _quiet_storage_logs(record: std_logging.LogRecord) -> bool:
  """Drops orbax's INFO lines (about a hundred per run, breaking up the progress bar), the
  tracebacks of orbax's and gcsfs's errors (a failed save logs hundreds of lines; the loop names
  its reason in one), and asyncio's reports of the reads of a damaged checkpoint left unawaited
  once its restore failed (hundreds; the restore's failure is named in one line)."""
  if record.name == "asyncio" and record.exc_info and (
      _from_orbax(record.exc_info[1]) or _TENSORSTORE_STATUS.match(str(record.exc_info[1]))):
    return False
  if f"{os.sep}orbax{os.sep}" in record.pathname:
    if record.levelno < std_logging.WARNING:
      return False
  elif f"{os.sep}gcsfs{os.sep}" not in record.pathname:
    return True
  record.exc_info, record.exc_text = None, None
  return True


def _ignore_callbacks_into_closed_loops(previous=sys.unraisablehook):
  """tensorstore hands the results of requests still in flight when an orbax save fails to the
  save's asyncio loop, closed by then; each "Event loop is closed" is reported as unraisable
  (hundreds of tracebacks). Those (no frame outside asyncio), and the exceptions of orbax's
  reads of a damaged checkpoint, closed unawaited once its restore failed, are dropped."""
  def hook(unraisable):
    frames = [frame.filename for frame in traceback.extract_tb(unraisable.exc_traceback)]
    if (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"
        and frames and all(f"{os.sep}asyncio{os.sep}" in name for name in frames)):
      return
    code = getattr(unraisable.object, "cr_code", None)   # an orbax read, dropped unawaited
    if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
      return
    previous(unraisable)
  sys.unraisablehook = hook


def exit_stranded(error: ckpt_lib.StrandedHosts) -> None:
  """Gone at once, with the reason: the exit's closers (jax.distributed's shutdown barrier among
  them) would wait for the hosts stuck inside the save; this process's end ends their wait."""
  print(f"error: {error}", file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(1)  # pylint: disable=protected-access


def main(argv):
  del argv
  if _CONFIG.value is None or not _WORKDIR.value:
    cli.exit_with_error("--config and --workdir are required (--helpfull lists the flags)")
  if _MODE.value == "sample" and _NUM_IMAGES.value < 1:
    cli.exit_with_error(f"--num_images must be at least 1, got {_NUM_IMAGES.value}")
  _check_workdir(_WORKDIR.value)
  logging.get_absl_handler().addFilter(_quiet_storage_logs)
  _ignore_callbacks_into_closed_loops()
  initialize_distributed()
  logging.info("JAX %s: process %d of %d, %d devices", jax.__version__, jax.process_index(),
               jax.process_count(), jax.device_count())
  try:
    workdir_lib.check_reachable(_WORKDIR.value, _STORAGE_TIMEOUT.value)
    if _MODE.value != "train":   # training checks its config itself
      validate_config(_CONFIG.value, jax.device_count(), jax.process_count())
    _run(_CONFIG.value, _WORKDIR.value)
  except ckpt_lib.StrandedHosts as e:
    exit_stranded(e)
  except (ConfigError, FileNotFoundError) as e:
    cli.exit_with_error(str(e))   # a mismatched checkpoint, too: the config is not the run's
  except (trainer.TrainingHalted, ckpt_lib.CheckpointError, workdir_lib.StorageUnreachable) as e:
    cli.exit_with_error(str(e), status=1)   # a run that cannot go on: as plainly said
  except trainer.Interrupted as e:
    print(f"{e} in {workdir_lib.checkpoint_dir(_WORKDIR.value)}: the same command resumes",
          file=sys.stderr)
    sys.exit(INTERRUPTED_EXIT_CODE)
  except KeyboardInterrupt:   # before the loop, or a second Ctrl-C
    print("interrupted; the checkpoints saved before are intact: the same command resumes",
          file=sys.stderr)
    sys.exit(INTERRUPTED_EXIT_CODE)


def _run(config, workdir: str) -> None:
  if _MODE.value == "train":
    state = trainer.train(config, workdir)
    if jax.process_index() == 0:
      _say_where(config, workdir, int(state.step))
    if int(state.step) < config.training.num_steps:
      # Stopped early (preempted) with a checkpoint saved: "try again", for the launchers'
      # resume loops (launch/tpu_vm.sh run, SLURM requeue).
      sys.exit(PREEMPTED_EXIT_CODE)
    return
  restored = workdir_lib.restore_ema(config, workdir, _STEP.value)
  is_host0 = jax.process_index() == 0
  if _MODE.value == "sample":
    _sample(config, workdir, restored)
  elif _MODE.value == "evaluate":
    writer = metrics_lib.MetricWriter(workdir, enabled=is_host0)
    try:
      evaluator = Evaluator(config, workdir, restored.mesh, mesh_lib.BATCH_AXES)
      writer.evaluation(restored.step, evaluator(restored.model))
    finally:
      writer.close()
  else:
    path = ema_path(workdir, restored.step)
    export_ema(config, restored.model_def, restored.state, path, write=is_host0)
    if is_host0:
      print(f"wrote {path}")


def _say_where(config, workdir: str, step: int) -> None:
  """The closing line of a run: where its results are."""
  if step < config.training.num_steps:
    print(f"stopped at step {step} of {config.training.num_steps} (preempted), checkpoint saved "
          f"in {workdir_lib.checkpoint_dir(workdir)}: the same command resumes")
    return
  written = [f"EMA weights {ema_path(workdir, step)}",
             f"checkpoints {workdir_lib.checkpoint_dir(workdir)}",
             f"metrics {os.path.join(workdir, 'metrics.jsonl')} and TensorBoard "
             f"{os.path.join(workdir, 'tensorboard')}"]
  if config.training.sample_every:
    written.append(f"sample grids {os.path.join(workdir, 'samples')}")
  if config.evaluation.metric:
    written.append(f"{config.evaluation.metric} metrics {os.path.join(workdir, 'eval.jsonl')}")
  print(f"trained to step {step}: " + "; ".join(written))


def _sample(config, workdir: str, restored: workdir_lib.Restored) -> None:
  """workdir/samples/samples_<step>_seed<seed>.{npz,png} (and .labels.txt), drawn over the
  training mesh (named apart from training's grids, samples_<step>.png, which it keeps)."""
  num = _NUM_IMAGES.value
  name = f"samples_{restored.step:08d}_seed{_SEED.value}"
  out_dir = os.path.join(workdir, "samples")
  shape = tuple(config.model.input_size) + (int(config.model.input_channels),)
  stream = batches.sample_batches(restored.model, config, num, _SEED.value, mesh=restored.mesh,
                                  batch_axes=mesh_lib.BATCH_AXES)
  for _ in files.write_samples(stream, num, shape, out_dir, name,
                               conditional=bool(config.model.get("num_classes", 0)),
                               pngs=_PNGS.value, write=jax.process_index() == 0):
    pass
  if jax.process_index() == 0:
    print(f"wrote {num} images: {out_dir}/{name}.npz and the grid {out_dir}/{name}.png")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
