"""Tune the quickstart: train variants side by side, two CPU cores each, and score them.

  python benchmarks/quickstart_tuning.py --out=OUT --minutes=8 [--cores_per_run=2]

Each variant is the quickstart config (`configs/quickstart.py`) with overrides, trained by
`python -m hdit_jax.main` on the CPU (JAX_PLATFORMS=cpu) pinned to its own cores, evaluated with
the digit metric every `--eval_every` steps, and stopped after `--minutes`. The table gives, per
variant and evaluation: steps, wall time, seconds per step, digit FD and class accuracy, so the
steps that fit a time budget on another CPU follow from its measured seconds per step.
Writes quickstart_tuning.json / .md and the last sample grid of each variant (PNG) to OUT.
"""

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).parent.parent

VARIANTS = {
    "base": [],
    "lr2e-3": ["--config.optimizer.lr=2e-3"],
    "lr2e-3_b32": ["--config.optimizer.lr=2e-3", "--config.data.batch_size=32"],
    "lr3e-3_warm": ["--config.optimizer.lr=3e-3", "--config.optimizer.warmup_steps=200"],
    "lr2e-3_g3": ["--config.optimizer.lr=2e-3", "--config.evaluation.guidance_scale=3.0"],
    "wide": ["--config.optimizer.lr=2e-3", "--config.model.widths=(96,192)",
             "--config.model.d_heads=(32,32)", "--config.model.mapping_width=96",
             "--config.model.mapping_d_ff=192"],
    "global": ["--config.optimizer.lr=2e-3", "--config.model.attention=('global','global')"],
    "deep": ["--config.optimizer.lr=2e-3", "--config.model.depths=(2,2)"],
}


def launch(name, overrides, workdir, cores, args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  command = ["taskset", "-c", cores, sys.executable, "-m", "hdit_jax.main",
             "--config=configs/quickstart.py", f"--workdir={workdir}",
             "--config.training.num_steps=100000", "--config.training.log_every=50",
             "--config.training.checkpoint_every=100000", "--config.training.sample_every=0",
             f"--config.evaluation.every={args.eval_every}",
             f"--config.evaluation.num_samples={args.eval_samples}", *overrides]
  log = open(workdir / "log.txt", "w")
  return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def collect(name, workdir):
  def read(path):
    return [json.loads(line) for line in open(path)] if path.exists() else []
  metrics = read(workdir / "metrics.jsonl")
  evaluations = read(workdir / "eval.jsonl")
  step_times = [m["step_time"] for m in metrics[2:]]   # past compilation
  return {"variant": name, "overrides": VARIANTS[name], "evaluations": evaluations,
          "last_step": metrics[-1]["step"] if metrics else 0,
          "last_loss": metrics[-1]["loss"] if metrics else None,
          "seconds_per_step": sorted(step_times)[len(step_times) // 2] if step_times else None}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", required=True)
  parser.add_argument("--minutes", type=float, default=8.0)
  parser.add_argument("--cores_per_run", type=int, default=2)
  parser.add_argument("--eval_every", type=int, default=400)
  parser.add_argument("--eval_samples", type=int, default=500)
  parser.add_argument("--classifier", default=None, help="a cached digit_classifier.safetensors")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  runs = {}
  for i, name in enumerate(args.variants.split(",")):
    workdir = pathlib.Path("/tmp/quickstart_tuning") / name
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    if args.classifier:
      shutil.copy(args.classifier, workdir / "digit_classifier.safetensors")
    first = i * args.cores_per_run
    cores = f"{first}-{first + args.cores_per_run - 1}"
    runs[name] = (launch(name, VARIANTS[name], workdir, cores, args), workdir)
  deadline = time.time() + args.minutes * 60
  while time.time() < deadline and any(p.poll() is None for p, _ in runs.values()):
    time.sleep(10)
  for process, _ in runs.values():
    if process.poll() is None:
      process.terminate()
  time.sleep(5)
  results = [collect(name, workdir) for name, (_, workdir) in runs.items()]
  with open(out / "quickstart_tuning.json", "w") as f:
    json.dump(results, f, indent=1)
  lines = ["| variant | s/step | steps | loss | evaluations (step: digit FD / class accuracy) |",
           "|---|---|---|---|---|"]
  for r in results:
    evals = "; ".join(f"{e['step']}: {e['digits_fd']:.1f} / {e.get('digits_class_accuracy', 0):.3f}"
                      for e in r["evaluations"])
    sps = f"{r['seconds_per_step']:.3f}" if r["seconds_per_step"] else "-"
    loss = f"{r['last_loss']:.4f}" if r["last_loss"] is not None else "-"
    lines.append(f"| {r['variant']} | {sps} | {r['last_step']} | {loss} | {evals} |")
  (out / "quickstart_tuning.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
