"""Sampling and FID-feature throughput on the local devices, timed as a user calls them.

  PYTHONPATH=$PWD python benchmarks/sample_throughput.py --out benchmarks/results
  (add --quick for a CPU smoke run with the quickstart model)

Sampling: the public `generate` (one call per batch, as `sample_batches` makes them) for the
557M ImageNet-256 model (random weights; time does not depend on their values), DPM++(2M) 50
steps with classifier-free guidance (batch doubled inside), bf16: the first call (compile +
run), the next calls (the steady state: the compiled sampler is reused), and 1,000 images through
`sample_batches`, extrapolated to the 50,000 that FID needs. Inception: pool3 features of uint8
256x256 images (pytorch-fid's preprocessing, resize to 299 included) in float32 at 'highest'
precision (exact) and at the default precision (TF32 convolutions on NVIDIA GPUs).
Writes sample_throughput_<device>.json and .md.
"""

import argparse
import importlib.util
import json
import os
import pathlib
import time

import jax
import numpy as np
from flax import nnx

from hdit_jax.config import apply_overrides
from hdit_jax.evaluation.inception import FIDInceptionV3, InceptionFeatures
from hdit_jax.models import build_model
from hdit_jax.sampling import batches
from hdit_jax.sampling.generate import SamplerSettings, generate

ROOT = pathlib.Path(__file__).parent.parent


def load_config(name: str):
  spec = importlib.util.spec_from_file_location("cfg", ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def random_weights(model: nnx.Module, scale: float = 0.02) -> nnx.Module:
  """Fill every parameter (the zero-initialised outputs too) with small random values."""
  state = nnx.state(model, nnx.Param)
  keys = iter(jax.random.split(jax.random.key(0), len(jax.tree.leaves(state))))
  nnx.update(model, jax.tree.map(lambda p: p + scale * jax.random.normal(next(keys), p.shape,
                                                                         p.dtype), state))
  return nnx.view(model, deterministic=True)


def timed(fn):
  start = time.perf_counter()
  out = fn()
  jax.block_until_ready(out)
  return out, time.perf_counter() - start


# What bench_sampling sets itself, so that --set may not change it.
HARNESS_KEYS = ("sampling.sampler", "sampling.steps", "sampling.guidance_scale",
                "sampling.batch_size")


def check_overrides(overrides):
  for item in overrides:
    if item.partition("=")[0] in HARNESS_KEYS:
      raise ValueError(f"override {item!r}: set by the harness (DPM++(2M), 50 steps, "
                       "guidance 1.5, batch 64)")


def sampling_config(config_name: str, overrides=()):
  """The config of `config_name` with `overrides` applied (ValueError for a bad one)."""
  check_overrides(overrides)
  return apply_overrides(load_config(config_name), overrides)


def bench_sampling(config_name: str, batch: int, total: int, steps: int, guidance: float,
                   overrides=()):
  config = sampling_config(config_name, overrides)
  config.sampling.update(sampler="dpmpp_2m", steps=steps, guidance_scale=guidance,
                         batch_size=batch)
  model = random_weights(build_model(config.model, rngs=nnx.Rngs(0)))
  settings = SamplerSettings.from_config(config)
  call = lambda i: generate(model, config, jax.random.key(i), batch, settings=settings)
  _, first = timed(lambda: call(0))
  calls = [timed(lambda i=i: call(i))[1] for i in range(1, 4)]
  start = time.perf_counter()
  count = sum(len(images) for images, _ in batches.sample_batches(
      model, config, total, 0, batch_size=batch, settings=settings, progress=False))
  run = time.perf_counter() - start
  steady = float(np.median(calls))
  return {
      "config": config_name, "overrides": list(overrides), "dtype": config.model.dtype,
      "sampler": "dpmpp_2m",
      "steps": steps, "guidance_scale": guidance, "batch": batch,
      "first_call_s": first, "next_calls_s": calls, "steady_call_s": steady,
      "second_over_steady": calls[0] / steady, "images_per_s_per_call": batch / steady,
      "images": count, "run_s": run, "run_images_per_s": count / run,
      "extrapolated_50k_s": run / count * 50_000,
  }


def bench_inception(batch: int, size: int, repeats: int):
  rng = np.random.default_rng(0)
  model = FIDInceptionV3()
  state = nnx.state(model)
  keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(state))))
  nnx.update(model, jax.tree.map(lambda p: p + 0.05 * jax.random.normal(next(keys), p.shape),
                                 state))
  images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
  out = {}
  for precision in ("highest", None):
    extract = InceptionFeatures(model, precision=precision)
    _, compile_s = timed(lambda: extract(images))
    times = [timed(lambda: extract(images))[1] for _ in range(repeats)]
    out[precision or "default"] = {"batch": batch, "image_size": size, "first_call_s": compile_s,
                                   "median_s": float(np.median(times)),
                                   "images_per_s": batch / float(np.median(times))}
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default="benchmarks/results")
  parser.add_argument("--quick", action="store_true", help="CPU smoke run (quickstart model)")
  parser.add_argument("--skip", choices=["sampling", "inception"], default=None)
  parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                      help="change the sampled model's config (repeatable)")
  parser.add_argument("--suffix", default="", help="added to the result file names")
  parser.add_argument("--images", type=int, default=1000,
                      help="images of the timed multi-batch run (imagenet256)")
  args = parser.parse_args()
  if args.images < 1:
    parser.error(f"--images must be at least 1, got {args.images}")
  try:   # a bad --set is a usage error, before anything runs
    sampling_config("quickstart" if args.quick else "imagenet256", args.set)
  except ValueError as e:
    parser.error(str(e))
  device = jax.devices()[0]
  result = {"device": device.device_kind, "devices": jax.device_count(),
            "jax": jax.__version__, "backend": jax.default_backend(),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}
  if args.skip != "inception":
    result["inception"] = bench_inception(8 if args.quick else 500, 64 if args.quick else 256,
                                          2 if args.quick else 5)
    print(json.dumps(result["inception"], indent=1), flush=True)
  if args.skip != "sampling":
    result["sampling"] = (bench_sampling("quickstart", 8, 16, 5, 1.5, args.set) if args.quick
                          else bench_sampling("imagenet256", 64, args.images, 50, 1.5, args.set))
    print(json.dumps(result["sampling"], indent=1), flush=True)
  name = device.device_kind.replace(" ", "_") + args.suffix
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, f"sample_throughput_{name}.json"), "w") as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(args.out, f"sample_throughput_{name}.md"), "w") as f:
    f.write(markdown(result))
  print(markdown(result))


def markdown(r) -> str:
  lines = [f"# Sampling and Inception throughput: {r['devices']}x {r['device']}, jax {r['jax']}",
           ""] + ([f"`XLA_FLAGS={r['xla_flags']}`", ""] if r.get("xla_flags") else [])
  if "sampling" in r:
    s = r["sampling"]
    changes = f" with `{' '.join(s['overrides'])}`" if s.get("overrides") else ""
    lines += [f"`generate`, {s['config']}{changes} ({s['dtype']}), {s['sampler']} "
              f"{s['steps']} steps, guidance {s['guidance_scale']}, batch {s['batch']}:", "",
              "| first call (compile + run) | next calls | images/s per call | "
              f"{s['images']} images | extrapolated to 50,000 |", "|---|---|---|---|---|",
              f"| {s['first_call_s']:.1f} s | {', '.join(f'{t:.2f}' for t in s['next_calls_s'])}"
              f" s (second / steady {s['second_over_steady']:.3f}) | "
              f"{s['images_per_s_per_call']:.2f} | {s['run_s']:.1f} s "
              f"({s['run_images_per_s']:.2f} img/s) | {s['extrapolated_50k_s'] / 3600:.2f} h |",
              ""]
  if "inception" in r:
    lines += ["FID Inception-v3 features (uint8 input, resize to 299 included):", "",
              "| precision | batch | input | images/s | first call |", "|---|---|---|---|---|"]
    for name, v in r["inception"].items():
      lines.append(f"| {name} | {v['batch']} | {v['image_size']}² | {v['images_per_s']:.0f} | "
                   f"{v['first_call_s']:.1f} s |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
