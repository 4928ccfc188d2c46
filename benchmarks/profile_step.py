"""Where the train step's (or sampling's) time goes: the device kernels of a few traced steps,
by total time.

  PYTHONPATH=$PWD python benchmarks/profile_step.py --case imagenet256 --batch 64 \\
      --out benchmarks/results [--steps 3] [--top 40] [--sampling]

Builds the case with benchmarks/train_throughput.py's prepare_case (the loop's jitted train step, synthetic
data already on the device), warms up, traces `--steps` steps with jax.profiler, and reads the
trace back (jax.profiler.ProfileData): every event on the device planes' kernel lines, grouped
by kernel name, with its share of the device-busy time and a coarse class (matmul, attention,
fusion, copy, collective). Writes profile_<case>_<device>.md and .json (and, with --hlo, the
compiled step's HLO, whose fusion names the kernel names are).
"""

import argparse
import collections
import gzip
import json
import pathlib
import re
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from train_throughput import prepare_case  # pylint: disable=wrong-import-position

# By name, first match wins: cuBLAS's Hopper kernels are `nvjet_*`; cuDNN's fused attention
# `cudnn_*sdpa*`; the neighborhood-attention kernels `na2d_*`.
CLASSES = (("collective", ("nccl", "all-reduce", "all_reduce", "all-gather", "reduce-scatter")),
           ("neighborhood attention", ("na2d",)),
           ("global attention", ("sdpa", "flash", "fmha")),
           ("matmul", ("nvjet", "gemm", "cutlass", "matmul", "xmma", "cublas")),
           ("concatenate", ("concatenate",)),
           ("copy", ("memcpy", "memset", "copy", "transpose")),
           ("fusion", ("fusion", "reduce", "convert")))


def kernel_class(name: str) -> str:
  lowered = name.lower()
  for label, words in CLASSES:
    if any(w in lowered for w in words):
      return label
  return "other"


def family(name: str) -> str:
  """A kernel's name without XLA's numbering (`loop_add_fusion_12` -> `loop_add_fusion`)."""
  return re.sub(r"(_\d+|__\d+)+$", "", name)


def device_events(xspace_path: str):
  """(kernel name, duration ns) of every event on the device planes' kernel (stream) lines."""
  from jax.profiler import ProfileData  # pylint: disable=import-outside-toplevel
  data = ProfileData.from_file(xspace_path)
  for plane in data.planes:
    if not plane.name.startswith("/device:"):
      continue
    for line in plane.lines:
      # GPU planes: one line per stream plus summary lines ("XLA Ops", "XLA Modules", ...);
      # only the streams' kernel events are counted, once each.
      if not line.name.lower().startswith("stream"):
        continue
      for event in line.events:
        yield event.name, event.duration_ns


def traced_kernels(run, repeats: int):
  """(kernel name -> total ns, kernel name -> calls, wall s per repeat) over `repeats` runs."""
  import jax  # pylint: disable=import-outside-toplevel
  trace_dir = tempfile.mkdtemp(prefix="hdit-profile-")
  start = time.perf_counter()
  with jax.profiler.trace(trace_dir):
    for _ in range(repeats):
      out = run()
    jax.block_until_ready(out)
  wall = (time.perf_counter() - start) / repeats
  xspace = next(pathlib.Path(trace_dir).rglob("*.xplane.pb"))
  totals, counts = collections.Counter(), collections.Counter()
  for name, duration in device_events(str(xspace)):
    totals[name] += duration
    counts[name] += 1
  if not totals:
    from jax.profiler import ProfileData  # pylint: disable=import-outside-toplevel
    print("no device kernel events found; the trace's planes and lines:")
    for plane in ProfileData.from_file(str(xspace)).planes:
      print(" ", plane.name, [line.name for line in plane.lines][:12])
  return totals, counts, wall


def sampling_call(case: str, batch: int):
  """A `generate` call as sample_throughput.py times it: (run, model evaluations per call)."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from hdit_jax.models import build_model  # pylint: disable=import-outside-toplevel
  from hdit_jax.sampling.generate import SamplerSettings, generate  # pylint: disable=import-outside-toplevel
  from sample_throughput import load_config, random_weights  # pylint: disable=import-outside-toplevel
  config = load_config(case)
  config.sampling.update(sampler="dpmpp_2m", steps=50, guidance_scale=1.5, batch_size=batch)
  model = random_weights(build_model(config.model, rngs=nnx.Rngs(0)))
  settings = SamplerSettings.from_config(config)
  return (lambda: generate(model, config, jax.random.key(0), batch, settings=settings)), 50


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--case", default="imagenet256")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--top", type=int, default=40)
  parser.add_argument("--out", default="benchmarks/results")
  parser.add_argument("--hlo", action="store_true",
                      help="also write the compiled step's optimised HLO (.hlo.txt.gz), whose "
                           "fusion names are the kernels' names; read it with hlo_census.py")
  parser.add_argument("--sampling", action="store_true",
                      help="profile one `generate` call (DPM++(2M) 50 steps, guidance 1.5, "
                           "--batch images) instead of the train step; times per model "
                           "evaluation")
  args = parser.parse_args()

  import jax  # pylint: disable=import-outside-toplevel

  if args.sampling:
    run, per_call = sampling_call(args.case, args.batch)
    jax.block_until_ready(run())   # compiles
    repeats, unit = 1, per_call
    what = "sampler step"
  else:
    _, step, state, batch, key = prepare_case(args.case, args.batch)
    for _ in range(3):
      state, out = step(state, batch, key)
    jax.block_until_ready(out)
    holder = dict(state=state)

    def run():
      holder["state"], out = step(holder["state"], batch, key)
      return out
    repeats, unit, what = args.steps, 1, "step"
  totals, counts, wall = traced_kernels(run, repeats)
  per = repeats * unit   # the unit the figures are given per
  busy = sum(totals.values())
  by_class, by_family = collections.Counter(), collections.Counter()
  for name, duration in totals.items():
    by_class[kernel_class(name)] += duration
    by_family[family(name)] += duration
  device = jax.devices()[0].device_kind
  result = dict(case=args.case, batch=args.batch, repeats=repeats, device=device,
                jax=jax.__version__, unit=what, wall_ms_per_step=wall / unit * 1e3,
                device_busy_ms_per_step=busy / per / 1e6,
                classes={k: v / busy for k, v in by_class.most_common()} if busy else {},
                families=[dict(name=n, ms_per_step=t / per / 1e6, share=t / busy)
                          for n, t in by_family.most_common(args.top)],
                kernels=[dict(name=n, ms_per_step=t / per / 1e6, share=t / busy,
                              calls_per_step=counts[n] / per, kind=kernel_class(n))
                         for n, t in totals.most_common(args.top)])
  title = "Sampling profile" if args.sampling else "Train-step profile"
  lines = [f"# {title}: {args.case}, batch {args.batch}, {device}, jax {jax.__version__}",
           "", f"Wall {result['wall_ms_per_step']:.1f} ms per {what} (traced), device busy "
           f"{result['device_busy_ms_per_step']:.1f} ms (sum of kernel times on all streams)."
           + (f" A sampler step of DPM++(2M) is one model evaluation, on {2 * args.batch} images "
              "(guidance doubles the batch)." if args.sampling else ""),
           "", "| class | share of busy time |", "|---|---|"]
  lines += [f"| {k} | {v:.1%} |" for k, v in result["classes"].items()]
  lines += ["", f"| kernel family (XLA's numbering dropped) | ms per {what} | share |",
            "|---|---|---|"]
  lines += [f"| `{f['name'][:90]}` | {f['ms_per_step']:.2f} | {f['share']:.1%} |"
            for f in result["families"][:20]]
  lines += ["", f"| kernel | kind | ms per {what} | share | calls |", "|---|---|---|---|---|"]
  lines += [f"| `{k['name'][:90]}` | {k['kind']} | {k['ms_per_step']:.2f} | {k['share']:.1%} | "
            f"{k['calls_per_step']:.0f} |" for k in result["kernels"]]
  text = "\n".join(lines) + "\n"
  print(text)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  stem = (f"profile_{'sampling_' if args.sampling else ''}{args.case.replace(':', '_')}_"
          f"{device.replace(' ', '_')}")
  (out / f"{stem}.md").write_text(text)
  (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
  if args.hlo and not args.sampling:
    with gzip.open(out / f"{stem}.hlo.txt.gz", "wt") as f:
      f.write(step.lower(holder["state"], batch, key).compile().as_text())


if __name__ == "__main__":
  main()
