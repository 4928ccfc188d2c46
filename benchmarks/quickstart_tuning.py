"""Tune the quickstart: train variants side by side and score them with the digit metric.

Two ways to spend a budget:

  # Learning per step, on any backend (a GPU runs many of these tiny models at once):
  python benchmarks/quickstart_tuning.py --out=OUT --steps=3000 --concurrent=8 \
      --guidance=1,2,3 [--variants=a,b]

  # Cost per step on a CPU: each variant pinned to its own cores for a fixed time.
  python benchmarks/quickstart_tuning.py --out=OUT --minutes=2 --cores_per_run=2

Each variant is the quickstart config (`configs/quickstart.py`) with the overrides below. The
step-bounded mode trains each for `--steps`, evaluates the EMA weights every `--eval_every` steps
and at the end once per guidance scale; the time-bounded mode reports seconds per step. Together
they say which variant reaches the best class accuracy within a CPU time budget.
Writes quickstart_tuning.json / .md and the last sample grid of each variant to OUT.
"""

import argparse
import copy
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).parent.parent

_WIDE = {"model.widths": (96, 192), "model.mapping_width": 96, "model.mapping_d_ff": 192}
_FAST = {"optimizer.lr": 4e-3, "optimizer.warmup_steps": 200, "optimizer.mapping_lr_scale": 1.0}
_C = {**_FAST, "optimizer.lr": 5e-3, "data.batch_size": 32, "model.depths": (1, 3),
      "ema.power": 2 / 3}
VARIANTS = {
    "base": {},
    "lr2e-3": {"optimizer.lr": 2e-3},
    "lr4e-3_w200": {"optimizer.lr": 4e-3, "optimizer.warmup_steps": 200},
    "global": {"optimizer.lr": 2e-3, "model.attention": ("global", "global")},
    "wide": {"optimizer.lr": 2e-3, **_WIDE},
    "deep": {"optimizer.lr": 2e-3, "model.depths": (2, 2)},
    "b128": {"optimizer.lr": 2e-3, "data.batch_size": 128},
    "b32": {"optimizer.lr": 2e-3, "data.batch_size": 32},
    "ema2/3": {"optimizer.lr": 2e-3, "ema.power": 2 / 3},
    "lognormal": {"optimizer.lr": 2e-3, "diffusion.sigma_density.type": "lognormal"},
    "map_lr1": {"optimizer.lr": 2e-3, "optimizer.mapping_lr_scale": 1.0},
    "wide_deep": {"optimizer.lr": 2e-3, "model.depths": (2, 2), **_WIDE},
    "wide_deep_global": {"optimizer.lr": 2e-3, "model.depths": (2, 2), **_WIDE,
                         "model.attention": ("global", "global")},
    # Second round: a stronger class signal (mapping network at the full learning rate) and a
    # higher learning rate, for runs of about 1,000 steps.
    "fast": _FAST,
    "fast_lr6e-3": {**_FAST, "optimizer.lr": 6e-3},
    "fast_map3": {**_FAST, "optimizer.mapping_lr_scale": 3.0},
    "fast_ema2/3": {**_FAST, "ema.power": 2 / 3},
    "fast_b32": {**_FAST, "data.batch_size": 32, "optimizer.lr": 3e-3},
    "fast_l1x3": {**_FAST, "model.depths": (1, 3)},
    "fast_l1w192": {**_FAST, "model.widths": (64, 192)},
    "fast_map128": {**_FAST, "model.mapping_width": 128, "model.mapping_d_ff": 256,
                    "model.mapping_depth": 2},
    "fast_drop0.2": {**_FAST, "diffusion.cond_dropout_rate": 0.2},
    "fast_wd0": {**_FAST, "optimizer.weight_decay": 0.0},
    # Third round: combinations, each with the steps that fit 10 minutes on a 2-core CPU
    # (its seconds per step measured there).
    "c_b32_l1x3": {**_C, "training.num_steps": 1240},
    "c_b32": {**_C, "model.depths": (1, 2), "training.num_steps": 1300},
    "c_b16_l1x3": {**_C, "data.batch_size": 16, "optimizer.lr": 3e-3, "training.num_steps": 2700},
    "c_b16_l1x3_lr5e-3": {**_C, "data.batch_size": 16, "training.num_steps": 2700},
    "c_b32_l1x3_lr8e-3": {**_C, "optimizer.lr": 8e-3, "training.num_steps": 1240},
    "c_b32_l1x3_ema3/4": {**_C, "ema.power": 0.75, "training.num_steps": 1240},
    "c_b64_l1x3_lr6e-3": {**_C, "data.batch_size": 64, "optimizer.lr": 6e-3,
                          "training.num_steps": 560},
    "c_b32_l1x3_map3": {**_C, "optimizer.mapping_lr_scale": 3.0, "training.num_steps": 1240},
    # Fourth round: around c_b32_l1x3, with a second seed for its spread.
    "c_seed1": {**_C, "seed": 1, "training.num_steps": 1240},
    "c_lr4e-3": {**_C, "optimizer.lr": 4e-3, "training.num_steps": 1240},
    "c_b2_0.99": {**_C, "optimizer.b2": 0.99, "training.num_steps": 1240},
    "c_w32": {**_C, "model.widths": (32, 128), "training.num_steps": 1850},
    "c_b16_lr4e-3": {**_C, "data.batch_size": 16, "optimizer.lr": 4e-3, "training.num_steps": 2700},
    "c_b24": {**_C, "data.batch_size": 24, "training.num_steps": 1650},
    "wide_deep_b32": {"optimizer.lr": 2e-3, "model.depths": (2, 2), **_WIDE,
                      "data.batch_size": 32},
}


def quickstart_config(overrides: dict):
  spec = importlib.util.spec_from_file_location("quickstart", ROOT / "configs" / "quickstart.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for key, value in overrides.items():
    *sections, leaf = key.split(".")
    node = config
    for section in sections:
      node = node[section]
    node[leaf] = value
  return config


def _flag(key, value) -> str:
  if isinstance(value, tuple):
    value = "(" + ",".join(repr(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return f"--config.{key}={value}"


def worker(args) -> None:
  """Train one variant for --steps in this process, then evaluate it per guidance scale."""
  from hdit_jax.evaluation.evaluator import Evaluator
  from hdit_jax.training import mesh as mesh_lib
  from hdit_jax.training import trainer
  from hdit_jax.training import workdir as workdir_lib

  workdir = args.workdir
  config = quickstart_config(VARIANTS[args.worker])
  # Steps and evaluations are counted at batch 64: every variant sees the same images.
  if "training.num_steps" in VARIANTS[args.worker]:
    steps = config.training.num_steps
    every = steps // 2
  else:
    scale = 64 / config.data.batch_size
    steps, every = round(args.steps * scale), round(args.eval_every * scale)
  config.training.update(num_steps=steps, log_every=50, checkpoint_every=steps,
                         sample_every=steps, num_sample_images=40)
  config.evaluation.update(every=every, num_samples=args.eval_samples,
                           guidance_scale=args.eval_guidance)
  start = time.perf_counter()
  trainer.train(config, workdir)
  train_seconds = time.perf_counter() - start
  restored = workdir_lib.restore_ema(config, workdir)
  finals = []
  for item in args.guidance.split(","):   # "g" or "g@lo-hi": guidance only for lo < sigma < hi
    scale, _, interval = item.partition("@")
    interval = tuple(float(x) for x in interval.split("-")) if interval else ()
    evaluation = copy.deepcopy(config)
    evaluation.evaluation.update(guidance_scale=float(scale), guidance_interval=interval,
                                 num_samples=args.final_samples)
    result = Evaluator(evaluation, workdir, restored.mesh, mesh_lib.BATCH_AXES)(restored.model)
    finals.append({"guidance": item, "guidance_scale": float(scale), **result})
  with open(os.path.join(workdir, "final.json"), "w") as f:
    json.dump({"train_seconds": train_seconds, "finals": finals}, f)


def _launch(name, workdir, args, env):
  command = [sys.executable, os.path.abspath(__file__), f"--worker={name}",
             f"--workdir={workdir}", f"--steps={args.steps}", f"--eval_every={args.eval_every}",
             f"--eval_samples={args.eval_samples}", f"--eval_guidance={args.eval_guidance}",
             f"--final_samples={args.final_samples}", f"--guidance={args.guidance}"]
  log = open(workdir / "log.txt", "w")
  return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _launch_timed(name, workdir, args, cores):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  command = ["taskset", "-c", cores, sys.executable, "-m", "hdit_jax.main",
             "--config=configs/quickstart.py", f"--workdir={workdir}",
             "--config.training.num_steps=100000", "--config.training.log_every=10",
             "--config.training.checkpoint_every=100000", "--config.training.sample_every=0",
             "--config.evaluation.metric=",
             *[_flag(k, v) for k, v in VARIANTS[name].items()]]
  log = open(workdir / "log.txt", "w")
  return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _read_jsonl(path):
  return [json.loads(line) for line in open(path)] if path.exists() else []


def collect(name, workdir):
  metrics = _read_jsonl(workdir / "metrics.jsonl")
  step_times = [m["step_time"] for m in metrics[2:]]   # past compilation
  final = workdir / "final.json"
  return {"variant": name, "overrides": dict(VARIANTS[name]),
          "evaluations": _read_jsonl(workdir / "eval.jsonl"),
          "finals": json.loads(final.read_text())["finals"] if final.exists() else [],
          "last_step": metrics[-1]["step"] if metrics else 0,
          "last_loss": metrics[-1]["loss"] if metrics else None,
          "seconds_per_step": sorted(step_times)[len(step_times) // 2] if step_times else None}


def _table(results) -> str:
  lines = ["| variant | s/step | steps | loss | during training at the eval guidance (step: FD / "
           "accuracy) | final, per guidance scale (g: FD / accuracy) |",
           "|---|---|---|---|---|---|"]
  for r in results:
    evals = "; ".join(f"{e['step']}: {e['digits_fd']:.1f} / {e['digits_class_accuracy']:.3f}"
                      for e in r["evaluations"])
    finals = "; ".join(f"{e.get('guidance', e['guidance_scale'])}: {e['digits_fd']:.1f} / "
                       f"{e['digits_class_accuracy']:.3f}" for e in r["finals"])
    sps = f"{r['seconds_per_step']:.3f}" if r["seconds_per_step"] else "-"
    loss = f"{r['last_loss']:.4f}" if r["last_loss"] is not None else "-"
    lines.append(f"| {r['variant']} | {sps} | {r['last_step']} | {loss} | {evals} | {finals} |")
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out")
  parser.add_argument("--steps", type=int, default=0,
                      help="step-bounded mode: steps per variant at batch 64 (scaled to others)")
  parser.add_argument("--minutes", type=float, default=2.0, help="time-bounded (CPU) mode")
  parser.add_argument("--concurrent", type=int, default=4)
  parser.add_argument("--cores_per_run", type=int, default=2)
  parser.add_argument("--eval_every", type=int, default=500)
  parser.add_argument("--eval_samples", type=int, default=500)
  parser.add_argument("--eval_guidance", type=float, default=2.0)
  parser.add_argument("--final_samples", type=int, default=1000)
  parser.add_argument("--guidance", default="1,2,3",
                      help="final evaluations: scales, each optionally @lo-hi (an interval)")
  parser.add_argument("--classifier", default=None, help="a cached digit_classifier.safetensors")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    return worker(args)

  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  names = args.variants.split(",")
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    sys.exit(f"unknown variants {unknown}; known: {list(VARIANTS)}")
  workdirs = {}
  for name in names:
    workdir = pathlib.Path("/tmp/quickstart_tuning") / name.replace("/", "_")
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    if args.classifier:
      shutil.copy(args.classifier, workdir / "digit_classifier.safetensors")
    workdirs[name] = workdir

  if args.steps:
    # Tiny models leave an accelerator mostly idle: run several at once, memory on demand.
    env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_PYTHON_CLIENT_PREALLOCATE="false")
    pending, running = list(names), {}
    while pending or running:
      while pending and len(running) < args.concurrent:
        name = pending.pop(0)
        running[name] = _launch(name, workdirs[name], args, env)
      time.sleep(5)
      for name in [n for n, p in running.items() if p.poll() is not None]:
        if running.pop(name).returncode:
          print(f"{name} failed: see {workdirs[name] / 'log.txt'}")
  else:
    processes = []
    for i, name in enumerate(names):
      first = i * args.cores_per_run
      cores = f"{first}-{first + args.cores_per_run - 1}"
      processes.append(_launch_timed(name, workdirs[name], args, cores))
    deadline = time.time() + args.minutes * 60
    while time.time() < deadline and any(p.poll() is None for p in processes):
      time.sleep(5)
    for process in processes:
      if process.poll() is None:
        process.terminate()
    time.sleep(3)

  results = [collect(name, workdirs[name]) for name in names]
  for name in names:
    grids = sorted((workdirs[name] / "samples").glob("*.png")) if (
        workdirs[name] / "samples").exists() else []
    if grids:
      shutil.copy(grids[-1], out / f"{name.replace('/', '_')}.png")
  with open(out / "quickstart_tuning.json", "w") as f:
    json.dump(results, f, indent=1)
  table = _table(results)
  (out / "quickstart_tuning.md").write_text(table)
  print(table)


if __name__ == "__main__":
  main()
