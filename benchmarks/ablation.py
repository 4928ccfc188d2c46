"""The ablation ladder on real digits: train every rung of configs/mnist_ablation.py, score it.

  # Train and score (resumable: rerun the same command to go on after a time limit):
  python benchmarks/ablation.py run --workdir=/tmp/ablation [--runs=dit_b4,dit_b4@1,...] \
      [--steps=2500] [--concurrent=11] [--minutes=9]

  # Collect the results of one or more workdirs into a table, a JSON file and one picture:
  python benchmarks/ablation.py report --workdir=/tmp/ablation [--workdir=...] \
      --out=benchmarks/results

A run is VARIANT or VARIANT@SEED. Every run trains the same number of steps at the same batch
(the same images seen) through the real training loop, so the rungs differ only by their
architecture and loss weighting, as in the paper's table. The runs of one command share the
accelerator (tiny models leave it mostly idle); so that wall time still compares, each run then
times its own train step with the accelerator to itself. Each run is scored by the digit metric
(`hdit_jax/evaluation/digits.py`) with one fixed sampler, unguided and at guidance 2.

A run that the time limit (`--minutes`) stops saves a checkpoint and goes on at the next command
with the same workdir; a finished run keeps its `result.json` and is not trained again.
"""

import argparse
import contextlib
import fcntl
import importlib.util
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).parent.parent
CONFIG = ROOT / "configs" / "mnist_ablation.py"
DEFAULT_RUNS = ("dit_b4", "dit_b4@1", "hourglass", "natten", "geglu", "rope", "soft_min_snr",
                "soft_min_snr@1", "shifted_window", "skip_add", "skip_concat")
GUIDANCE = (1.0, 2.0)       # the fixed evaluation: unguided, and guided at 2
TIMED_STEPS = 30
CLASSIFIER = "digit_classifier.safetensors"   # the digit metric's cached classifier


def parse_run(run: str) -> tuple[str, int]:
  variant, _, seed = run.partition("@")
  return variant, int(seed or 0)


def run_config(run: str, steps: int, eval_samples: int = 0):
  """The config of one run: the variant's, its seed, `steps` steps, evaluations mid-way and at
  the end, and a sample grid at the end."""
  variant, seed = parse_run(run)
  spec = importlib.util.spec_from_file_location("mnist_ablation", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(variant)
  config.seed = seed
  config.training.update(num_steps=steps, checkpoint_every=max(steps // 4, 1),
                         sample_every=steps, keep_checkpoints=1)
  config.evaluation.update(every=max(steps // 2, 1), guidance_scale=GUIDANCE[0])
  if eval_samples:
    config.evaluation.num_samples = eval_samples
  return config


def _read_jsonl(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _time_train_step(config):
  """A generator: its first `next` compiles and warms the train step on a synthetic batch, the
  second times it and returns the median seconds per step."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from hdit_jax.training import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from hdit_jax.training import state as state_lib  # pylint: disable=import-outside-toplevel
  from hdit_jax.training.step import jit_train_step  # pylint: disable=import-outside-toplevel

  mesh = mesh_lib.make_mesh(config.mesh, jax.devices())
  model_def, _, shardings, tx, init = state_lib.setup(config, mesh, dict(config.sharding_rules))
  step = jit_train_step(config, model_def, tx, mesh, shardings)
  size, channels = int(config.data.image_size), int(config.model.input_channels)
  rng = np.random.default_rng(0)
  batch = {"image": rng.uniform(-1, 1, (config.data.batch_size, size, size, channels)
                                ).astype(np.float32),
           "label": rng.integers(0, 10, config.data.batch_size).astype(np.int32)}
  batch = jax.device_put(batch, mesh_lib.batch_sharding(mesh))
  key = jax.random.key(0)
  state = init()
  for _ in range(3):
    state, measurements = step(state, batch, key)
  jax.block_until_ready(measurements)
  yield   # compiled and warm: the caller waits for the accelerator to itself
  times = []
  for _ in range(TIMED_STEPS):
    start = time.perf_counter()
    state, measurements = step(state, batch, key)
    jax.block_until_ready(measurements)
    times.append(time.perf_counter() - start)
  yield sorted(times)[len(times) // 2]


def worker(run: str, workdir: pathlib.Path, steps: int, eval_samples: int) -> None:
  """Train and score one run in this process, then time its step alone; writes result.json."""
  import jax  # pylint: disable=import-outside-toplevel
  from hdit_jax import flops  # pylint: disable=import-outside-toplevel
  from hdit_jax.evaluation.evaluator import Evaluator  # pylint: disable=import-outside-toplevel
  from hdit_jax.training import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from hdit_jax.training import trainer  # pylint: disable=import-outside-toplevel
  from hdit_jax.training import workdir as workdir_lib  # pylint: disable=import-outside-toplevel

  config = run_config(run, steps, eval_samples)
  start = time.perf_counter()
  trainer.train(config, str(workdir))
  train_seconds = time.perf_counter() - start
  metrics = _read_jsonl(workdir / "metrics.jsonl")
  if not metrics or metrics[-1]["step"] < steps:
    return   # stopped by the time limit: the checkpoint lets the next command go on

  # The training loop scored the last step unguided; the other guidance scales are added here.
  evaluations = _read_jsonl(workdir / "eval.jsonl")
  finals = {str(GUIDANCE[0]): next(e for e in evaluations if e["step"] == steps)}
  restored = workdir_lib.restore_ema(config, str(workdir))
  for guidance in GUIDANCE[1:]:
    evaluation = config.copy_and_resolve_references()
    evaluation.evaluation.guidance_scale = guidance
    finals[str(guidance)] = Evaluator(evaluation, str(workdir), restored.mesh,
                                      mesh_lib.BATCH_AXES)(restored.model)

  timer = _time_train_step(config)
  next(timer)
  (workdir / "ready").touch()
  while not (workdir.parent / "all_ready").exists():
    time.sleep(0.5)
  with open(workdir.parent / "timing.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    step_seconds = next(timer)
    fcntl.flock(lock, fcntl.LOCK_UN)

  variant, seed = parse_run(run)
  counts = flops.count(config.model)
  tail = [m["loss"] for m in metrics[-max(len(metrics) // 10, 1):]]
  result = {
      "run": run, "variant": variant, "seed": seed, "params": counts["params"],
      "gmacs_per_image": counts["gmacs_per_image"], "steps": steps,
      "batch_size": int(config.data.batch_size),
      "images_seen": steps * int(config.data.batch_size),
      "loss_weighting": config.diffusion.loss_weighting,
      "final_loss": sum(tail) / len(tail),
      "losses": [[m["step"], m["loss"]] for m in metrics],
      "evaluations": evaluations,
      "finals": finals,
      "step_seconds_alone": step_seconds,
      "train_seconds_alone": step_seconds * steps,
      "train_wall_seconds_shared": train_seconds,
      "device": jax.devices()[0].device_kind, "jax": jax.__version__,
      "evaluation": {"sampler": config.evaluation.sampler, "steps": config.evaluation.steps,
                     "num_samples": config.evaluation.num_samples},
  }
  (workdir / "result.json").write_text(json.dumps(result, indent=1))


def _launch(run: str, workdir: pathlib.Path, args, log) -> subprocess.Popen:
  # Tiny models share one accelerator: memory on demand, not preallocated per process.
  env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_PYTHON_CLIENT_PREALLOCATE="false")
  command = [sys.executable, os.path.abspath(__file__), "worker", f"--run={run}",
             f"--workdir={workdir}", f"--steps={args.steps}",
             f"--eval_samples={args.eval_samples}"]
  return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def run_all(args) -> int:
  root = pathlib.Path(args.workdir)
  root.mkdir(parents=True, exist_ok=True)
  (root / "all_ready").unlink(missing_ok=True)
  deadline = time.time() + args.minutes * 60
  runs = [r for r in args.runs.split(",") if not (root / _dirname(r) / "result.json").exists()]
  for run in runs:
    run_config(run, args.steps)   # an unknown variant fails here, before anything starts
  pending, running = list(runs), {}
  started, last_status = time.time(), time.time()
  with contextlib.ExitStack() as stack:
    while pending or running:
      if time.time() - last_status > 60:
        print(f"{time.time() - started:.0f} s: " + ", ".join(
            f"{r} step {_last_step(root / _dirname(r))}" for r in running), flush=True)
        last_status = time.time()
      while pending and len(running) < args.concurrent:
        run = pending.pop(0)
        workdir = root / _dirname(run)
        workdir.mkdir(exist_ok=True)
        if args.classifier and not (workdir / CLASSIFIER).exists():
          shutil.copy(args.classifier, workdir / CLASSIFIER)
        (workdir / "ready").unlink(missing_ok=True)
        (root / "all_ready").unlink(missing_ok=True)   # a new wave: its own barrier
        log = stack.enter_context(open(workdir / "log.txt", "a"))
        running[run] = _launch(run, workdir, args, log)
      time.sleep(2)
      for run in [r for r, p in running.items() if p.poll() is not None]:
        if running.pop(run).returncode:
          print(f"{run} failed: see {root / _dirname(run) / 'log.txt'}", flush=True)
      # Time the steps only once every run of this wave has trained and been scored.
      if running and all((root / _dirname(r) / "ready").exists() for r in running):
        (root / "all_ready").touch()
      if time.time() > deadline and running:
        print(f"time limit: stopping {sorted(running)} (rerun to go on)", flush=True)
        for process in running.values():
          process.send_signal(signal.SIGTERM)   # the trainer checkpoints and exits
        for process in running.values():
          process.wait()
        running, pending = {}, []
  done = [r for r in args.runs.split(",") if (root / _dirname(r) / "result.json").exists()]
  print(f"{len(done)} of {len(args.runs.split(','))} runs finished in {root}")
  return 0 if len(done) == len(args.runs.split(",")) else 1


def _last_step(workdir: pathlib.Path) -> int:
  try:   # the file may be mid-write
    metrics = _read_jsonl(workdir / "metrics.jsonl")
  except ValueError:
    return -1
  return metrics[-1]["step"] if metrics else 0


def _dirname(run: str) -> str:
  return run.replace("@", "_seed")


def _fmt(result: dict, guidance: float) -> str:
  final = result["finals"][str(guidance)]
  return f"{final['digits_fd']:.1f} / {final['digits_class_accuracy']:.3f}"


def table(results: list[dict]) -> str:
  lines = ["| run | params | fwd GMACs/img | images seen | loss weighting | final loss | "
           "unguided: FD / accuracy | guidance 2: FD / accuracy | step ms (alone) | "
           "train s (alone) | train s (shared) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    lines.append(
        f"| {r['run']} | {r['params'] / 1e6:.2f}M | {r['gmacs_per_image']:.3f} | "
        f"{r['images_seen']:,} | {r['loss_weighting']} | {r['final_loss']:.4f} | "
        f"{_fmt(r, GUIDANCE[0])} | {_fmt(r, GUIDANCE[1])} | "
        f"{r['step_seconds_alone'] * 1e3:.1f} | {r['train_seconds_alone']:.0f} | "
        f"{r['train_wall_seconds_shared']:.0f} |")
  return "\n".join(lines) + "\n"


def picture(results: list[dict], grids: list[pathlib.Path], path: pathlib.Path,
            per_row: int = 4, scale: int = 2) -> None:
  """Every run's last sample grid, side by side, each under its run name and metrics."""
  from PIL import Image, ImageDraw  # pylint: disable=import-outside-toplevel
  images = [Image.open(g).convert("L") for g in grids]
  width = max(im.width for im in images) * scale
  height = max(im.height for im in images) * scale
  label = 28
  rows = -(-len(images) // per_row)
  sheet = Image.new("L", (per_row * (width + 8), rows * (height + label + 8)), 255)
  draw = ImageDraw.Draw(sheet)
  for i, (result, image) in enumerate(zip(results, images)):
    x, y = (i % per_row) * (width + 8), (i // per_row) * (height + label + 8)
    draw.text((x + 2, y + 1), result["run"], fill=0)
    draw.text((x + 2, y + 13), f"unguided FD/acc {_fmt(result, GUIDANCE[0])}", fill=0)
    sheet.paste(image.resize((image.width * scale, image.height * scale), Image.NEAREST),
                (x, y + label))
  sheet.save(path)


def report(args) -> int:
  results, grids = [], []
  for root in args.workdir:
    for result_file in sorted(pathlib.Path(root).glob("*/result.json")):
      results.append(json.loads(result_file.read_text()))
      grids.append(sorted((result_file.parent / "samples").glob("*.png"))[-1])
  if not results:
    print(f"no finished runs (result.json) under {args.workdir}")
    return 1
  order = {v: i for i, v in enumerate(DEFAULT_RUNS)}
  ranked = sorted(zip(results, grids), key=lambda rg: (order.get(rg[0]["run"], 99), rg[0]["run"]))
  results, grids = [r for r, _ in ranked], [g for _, g in ranked]
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  device = results[0]["device"].replace(" ", "_")
  header = (f"# The ablation ladder on digits (`benchmarks/ablation.py`)\n\n"
            f"{results[0]['device']}, jax {results[0]['jax']}. Each run: "
            f"configs/mnist_ablation.py, {results[0]['steps']} steps of batch "
            f"{results[0]['batch_size']}; scored on {results[0]['evaluation']['num_samples']} "
            f"samples ({results[0]['evaluation']['sampler']}, "
            f"{results[0]['evaluation']['steps']} steps) by the digit metric. Final loss: the "
            "mean of the last tenth of the logged losses (snr and soft-min-snr losses are on "
            "different scales). The runs of one command share the accelerator: 'train s "
            "(shared)' is their wall time there (compilation and scoring included); 'step ms "
            "(alone)' is the median of 30 train steps with the accelerator to one run, and "
            "'train s (alone)' that times the steps.\n\n")
  (out / f"ablation_{device}.md").write_text(header + table(results))
  (out / f"ablation_{device}.json").write_text(json.dumps(results, indent=1))
  picture(results, grids, out / f"ablation_{device}.png")
  print(header + table(results))
  return 0


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  run = sub.add_parser("run", help="train and score the runs")
  run.add_argument("--workdir", required=True)
  run.add_argument("--runs", default=",".join(DEFAULT_RUNS))
  run.add_argument("--steps", type=int, default=2500)
  run.add_argument("--concurrent", type=int, default=len(DEFAULT_RUNS))
  run.add_argument("--minutes", type=float, default=9.0, help="time limit of this command")
  run.add_argument("--eval_samples", type=int, default=0,
                   help="samples per score (0: the config's evaluation.num_samples)")
  run.add_argument("--classifier", default="",
                   help="a cached digit_classifier.safetensors (else each run trains one)")
  rep = sub.add_parser("report", help="tabulate finished runs")
  rep.add_argument("--workdir", action="append", required=True)
  rep.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
  work = sub.add_parser("worker")
  work.add_argument("--run", required=True)
  work.add_argument("--workdir", required=True)
  work.add_argument("--steps", type=int, required=True)
  work.add_argument("--eval_samples", type=int, default=0)
  args = parser.parse_args()
  if args.command == "worker":
    worker(args.run, pathlib.Path(args.workdir), args.steps, args.eval_samples)
    return 0
  return run_all(args) if args.command == "run" else report(args)


if __name__ == "__main__":
  sys.exit(main())
