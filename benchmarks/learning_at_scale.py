"""The full 557M ImageNet-256 model learns: a few minutes of training on upsampled digits.

  python benchmarks/learning_at_scale.py --workdir=/tmp/scale --out=benchmarks/results \
      [--steps=1200] [--batch=64] [--eval_every=200] [--eval_samples=500]

configs/imagenet256.py unchanged (557M parameters, its optimizer groups, EMA, bf16 compute)
but for its data: the 5,000 embedded MNIST digits resized to 256x256 in 3 channels, 10 classes.
The digit metric (`hdit_jax/evaluation/digits.py`) scores the EMA weights every `--eval_every`
steps, unguided, so the table shows loss, class accuracy and digit Frechet distance against
steps. Writes learning_at_scale_<device>.md/.json and the last sample grid (each image shrunk to
64x64) to --out. The workdir takes about 10 GB (the last checkpoint and the EMA weights).
"""

import argparse
import importlib.util
import json
import pathlib
import shutil
import sys
import time

ROOT = pathlib.Path(__file__).parent.parent


def scale_config(args):
  spec = importlib.util.spec_from_file_location("imagenet256", ROOT / "configs" / "imagenet256.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.model.num_classes = 10
  c.data.update(source="embedded", name="mnist", split="train", image_size=256,
                batch_size=args.batch, num_workers=0)
  c.training.update(num_steps=args.steps, log_every=20, checkpoint_every=args.steps,
                    keep_checkpoints=1, sample_every=args.steps, num_sample_images=50)
  c.sampling.update(sampler="dpmpp_2m", steps=20, guidance_scale=1.0)
  c.evaluation.update(metric="digits", every=args.eval_every, num_samples=args.eval_samples,
                      sampler="dpmpp_2m", steps=20, guidance_scale=1.0)
  return c


def _read_jsonl(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def table(metrics: list[dict], evaluations: list[dict]) -> str:
  scored = {e["step"]: e for e in evaluations}
  lines = ["| step | images seen | loss (mean since the last row) | img/s | MFU | digit FD | "
           "class accuracy |", "|---|---|---|---|---|---|---|"]
  batch = metrics[0]["batch_size"] if metrics and "batch_size" in metrics[0] else None
  rows = sorted({m["step"] for m in metrics if m["step"] in scored} | {metrics[-1]["step"]})
  previous = 0
  for step in rows:
    window = [m for m in metrics if previous < m["step"] <= step]
    loss = sum(m["loss"] for m in window) / len(window)
    last = window[-1]
    e = scored.get(step)
    score = (f"{e['digits_fd']:.1f} | {e['digits_class_accuracy']:.3f}" if e else "- | -")
    seen = f"{step * batch:,}" if batch else "-"
    lines.append(f"| {step} | {seen} | {loss:.4f} | {last['images_per_second']:.0f} | "
                 f"{last.get('mfu', 0):.1%} | {score} |")
    previous = step
  return "\n".join(lines) + "\n"


def shrink_grid(path: pathlib.Path, out: pathlib.Path, image_size: int, to: int = 64) -> None:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  grid = Image.open(path)
  factor = image_size // to
  grid.resize((grid.width // factor, grid.height // factor), Image.Resampling.BOX).save(out)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
  parser.add_argument("--steps", type=int, default=1200)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--eval_every", type=int, default=200)
  parser.add_argument("--eval_samples", type=int, default=500)
  parser.add_argument("--classifier", default="",
                      help="a cached digit_classifier.safetensors (else one is trained)")
  args = parser.parse_args()

  import jax  # pylint: disable=import-outside-toplevel
  from hdit_jax import flops  # pylint: disable=import-outside-toplevel
  from hdit_jax.training import trainer  # pylint: disable=import-outside-toplevel

  workdir, out = pathlib.Path(args.workdir), pathlib.Path(args.out)
  workdir.mkdir(parents=True, exist_ok=True)
  out.mkdir(parents=True, exist_ok=True)
  if args.classifier:
    shutil.copy(args.classifier, workdir / "digit_classifier.safetensors")
  config = scale_config(args)
  start = time.perf_counter()
  trainer.train(config, str(workdir))
  seconds = time.perf_counter() - start

  metrics = [dict(m, batch_size=args.batch) for m in _read_jsonl(workdir / "metrics.jsonl")]
  evaluations = _read_jsonl(workdir / "eval.jsonl")
  counts = flops.count(config.model)
  device = jax.devices()[0].device_kind
  header = (
      f"# The 557M model learns (`benchmarks/learning_at_scale.py`)\n\n"
      f"{device}, jax {jax.__version__}: configs/imagenet256.py ({counts['params']:,} "
      f"parameters, {counts['gmacs_per_image']:.1f} GMACs per forward, bf16) on the embedded "
      f"MNIST digits resized to 256x256x3 (10 classes), batch {args.batch}, "
      f"{args.steps} steps in {seconds:.0f} s (compilation, evaluations and the last "
      f"checkpoint included). Digit metric: {args.eval_samples} unguided samples, DPM++(2M) "
      f"20 steps, from the EMA weights; held-out real digits score FD 0.68, accuracy 0.985.\n\n")
  text = header + table(metrics, evaluations)
  name = f"learning_at_scale_{device.replace(' ', '_')}"
  (out / f"{name}.md").write_text(text)
  (out / f"{name}.json").write_text(json.dumps(
      {"device": device, "jax": jax.__version__, "params": counts["params"],
       "gmacs_per_image": counts["gmacs_per_image"], "batch_size": args.batch,
       "steps": args.steps, "seconds": seconds, "metrics": metrics,
       "evaluations": evaluations}, indent=1))
  grids = sorted((workdir / "samples").glob("*.png"))
  if grids:
    shrink_grid(grids[-1], out / f"{name}.png", config.data.image_size)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
