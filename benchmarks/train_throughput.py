"""Training throughput of the real train step, per config and batch, each case in its own process.

  PYTHONPATH=$PWD python benchmarks/train_throughput.py --out benchmarks/results \\
      [--cases imagenet256:64,128 ffhq1024:16 ladder] [--steps 20]
  (--quick: a CPU smoke run with the quickstart model)

Each case builds the config's model, optimizer and jitted train step (the function the training
loop runs: EDM loss, AdamW, clipping, EMA) on every local device, feeds one synthetic batch
(already on the device: the input pipeline is measured by loader_throughput.py), runs a few
warm-up steps, then times `--steps` steps one by one (blocking on each) and reports the median:
images/s, ms per step, TFLOP/s per device and MFU from the analytic FLOP count (3 x the forward),
the peak device memory and the time of the first call (compile + run).

`ladder` is the paper's Fig. 1 comparison: HDiT-B/4 (the ImageNet-128 ablation's final recipe:
widths 384 / 768, depths 2 / 11, neighborhood then global attention), one more neighborhood level
of width 384 and depth 2 per doubling of the resolution, and DiT-B/4 in pixel space, at 128,
256, 512 and 1024 pixels. A case that runs out of memory is recorded as such.

Writes train_throughput_<device>.json and .md (and .png for the ladder).
"""

import argparse
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).parent.parent
# The ladder's batch per resolution: as large as fits both models on one 80 GB device, and no
# smaller than keeps the device busy.
LADDER_BATCH = {128: 64, 256: 32, 512: 16, 1024: 4}
# DiT-B/4 at 512 and 1024 (6.3 and 85 TMACs per image) are timed over fewer steps.
FEW_STEPS = {"ladder-dit-512": 5, "ladder-dit-1024": 3}
DEFAULT_CASES = ("imagenet256:64,128", "ffhq1024:16", "ladder")
# What each case sets itself (with every mesh.* key), so that --set may not change it.
HARNESS_KEYS = ("data.batch_size", "data.source")


def load_config(name: str, arg=None):
  spec = importlib.util.spec_from_file_location("cfg", ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def ladder_config(model: str, size: int):
  """HDiT-B/4 or DiT-B/4 at `size` pixels (batch set by the caller)."""
  from hdit_jax.config import dit_model, hdit_model  # pylint: disable=import-outside-toplevel
  config = load_config("imagenet128_ablation", "soft_min_snr")
  if model == "dit":
    config.model = dit_model("B/4", input_size=(size, size), num_classes=1000)
    config.diffusion.loss_weighting = "snr"
  else:
    extra = {128: 0, 256: 1, 512: 2, 1024: 3}[size]
    m = config.model
    config.model = hdit_model(**{
        **m.to_dict(), "input_size": (size, size),
        "depths": (2,) * extra + tuple(m.depths), "widths": (384,) * extra + tuple(m.widths),
        "d_heads": (64,) * (extra + 2), "kernel_sizes": (7,) * (extra + 2),
        "window_sizes": (8,) * (extra + 2), "dropout_rate": (0.0,) * (extra + 2),
        "attention": ("neighborhood",) * (extra + 1) + ("global",), "d_ffs": ()})
  config.data.image_size = size
  return config


def case_config(case: str, batch: int, overrides=()):
  """`config[:arg]` of configs/, or `ladder-hdit-SIZE` / `ladder-dit-SIZE`, with `overrides`
  (`section.key=value`) applied."""
  if case.startswith("ladder-"):
    _, model, size = case.split("-")
    config = ladder_config(model, int(size))
  else:
    name, _, arg = case.partition(":")
    config = load_config(name, arg or None)
  config.data.update(batch_size=batch, source="synthetic")
  config.mesh.update(data=-1, fsdp=1, tensor=1)
  from hdit_jax.config import apply_overrides  # pylint: disable=import-outside-toplevel
  for item in overrides:
    if item.partition("=")[0] in HARNESS_KEYS or item.startswith("mesh."):
      raise ValueError(f"override {item!r}: set by the harness (the batch: --cases NAME:BATCH)")
  return apply_overrides(config, overrides)


def prepare_case(case: str, batch: int, overrides=()):
  """(config, jitted train step, fresh state, synthetic batch on the devices, key) of a case,
  over every local device."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from hdit_jax.training import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  from hdit_jax.training import state as state_lib  # pylint: disable=import-outside-toplevel
  from hdit_jax.training.step import jit_train_step  # pylint: disable=import-outside-toplevel

  config = case_config(case, batch, overrides)
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices())
  model_def, _, shardings, tx, init = state_lib.setup(config, mesh, dict(config.sharding_rules))
  step = jit_train_step(config, model_def, tx, mesh, shardings)
  size, channels = int(config.data.image_size), int(config.model.input_channels)
  rng = np.random.default_rng(0)
  batch_data = {"image": rng.uniform(-1, 1, (batch, size, size, channels)).astype(np.float32),
                "label": rng.integers(0, max(int(config.model.get("num_classes", 0)), 1),
                                      batch).astype(np.int32)}
  if float(config.data.augment_prob) > 0:
    batch_data["aug_cond"] = np.zeros((batch, 9), np.float32)
  batch_data = jax.device_put(batch_data, mesh_lib.batch_sharding(mesh))
  state = init()
  jax.block_until_ready(state)
  return config, step, state, batch_data, jax.random.key(0)


def measure(case: str, batch: int, steps: int, warmup: int, overrides=()) -> dict:
  """One case in this process (see the module docstring)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from hdit_jax import flops  # pylint: disable=import-outside-toplevel
  from hdit_jax.training import metrics  # pylint: disable=import-outside-toplevel

  config, step, state, batch_data, key = prepare_case(case, batch, overrides)
  devices = jax.devices()
  size = int(config.data.image_size)
  start = time.perf_counter()
  state, out = step(state, batch_data, key)
  jax.block_until_ready(out)
  first_call = time.perf_counter() - start
  for _ in range(warmup):
    state, out = step(state, batch_data, key)
  jax.block_until_ready(out)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, out = step(state, batch_data, key)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - start)
  median = float(np.median(times))
  gmacs = flops.count(config.model)["gmacs_per_image"]
  step_flops = metrics.train_flops_per_image(gmacs) * batch
  peak = metrics.peak_flops(devices[0])
  memory = devices[0].memory_stats() or {}
  return {
      "case": case, "batch": batch, "devices": len(devices), "device": devices[0].device_kind,
      "overrides": list(overrides),
      "params": int(sum(x.size for x in jax.tree.leaves(state.params))),
      "image_size": size, "dtype": config.model.dtype, "fwd_gmacs_per_image": gmacs,
      "first_call_s": first_call, "step_ms": median * 1e3,
      "step_ms_range": [min(times) * 1e3, max(times) * 1e3],
      "images_per_s": batch / median, "ms_per_image": median * 1e3 / batch,
      "tflops_per_device": step_flops / median / len(devices) / 1e12,
      "mfu": step_flops / median / len(devices) / peak if peak else None,
      "peak_memory_gib": memory.get("peak_bytes_in_use", 0) / 2**30 or None,
      "loss_finite": bool(np.isfinite(float(out["loss"]))),
  }


def run_case(case: str, batch: int, steps: int, warmup: int, timeout: float,
             overrides=()) -> dict:
  """`measure` in a fresh process, so that each case's peak memory is its own."""
  command = [sys.executable, __file__, "--worker", case, "--batch", str(batch),
             "--steps", str(steps), "--warmup", str(warmup)]
  command += [f"--set={item}" for item in overrides]
  env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
  try:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
  except subprocess.TimeoutExpired:
    return {"case": case, "batch": batch, "error": f"over {timeout:.0f} s"}
  for line in reversed(done.stdout.splitlines()):
    if line.startswith("{"):
      return json.loads(line)
  tail = done.stderr.strip().splitlines()[-3:]
  oom = any("RESOURCE_EXHAUSTED" in l or "out of memory" in l.lower() for l in tail)
  return {"case": case, "batch": batch, "error": "out of memory" if oom else " | ".join(tail)}


def expand(cases: list[str]) -> list[tuple[str, int]]:
  found = []
  for case in cases:
    if case == "ladder":
      for size, batch in LADDER_BATCH.items():
        found += [(f"ladder-hdit-{size}", batch), (f"ladder-dit-{size}", batch)]
      continue
    name, _, batches = case.rpartition(":") if case.count(":") else (case, "", "64")
    found += [(name, int(b)) for b in batches.split(",")]
  return found


def markdown(result: dict) -> str:
  lines = [f"# Train-step throughput: {result['devices']}x {result['device']}, "
           f"jax {result['jax']}", "",
           "Synthetic data already on the device; median of "
           f"{result['steps']} steps after {result['warmup']} warm-up steps (fewer for "
           f"{', '.join(FEW_STEPS)}: {', '.join(map(str, FEW_STEPS.values()))})."
           + (f" Config changes: `{' '.join(result['overrides'])}`." if result.get("overrides")
              else "")
           + (f" `XLA_FLAGS={result['xla_flags']}`." if result.get("xla_flags") else ""), "",
           "| case | batch | params | images/s | ms/step | ms/image | TFLOP/s/device | MFU | "
           "peak memory | first call |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in result["cases"]:
    if "error" in r:
      lines.append(f"| {r['case']} | {r['batch']} | | {r['error']} | | | | | | |")
      continue
    mfu = f"{r['mfu']:.1%}" if r["mfu"] else "-"
    memory = f"{r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] else "-"
    lines.append(f"| {r['case']} | {r['batch']} | {r['params'] / 1e6:.1f}M | "
                 f"{r['images_per_s']:.1f} | {r['step_ms']:.1f} | {r['ms_per_image']:.3f} | "
                 f"{r['tflops_per_device']:.0f} | {mfu} | {memory} | {r['first_call_s']:.0f} s |")
  ladder = _ladder_rows(result)
  if ladder:
    lines += ["", "Cost against resolution (ms per training image; x: the factor per doubling; "
              "pixels x4 per doubling):", "", "| size | HDiT-B/4 | x | DiT-B/4 | x |",
              "|---|---|---|---|---|"]
    previous = {}
    for size, row in ladder:
      cells = []
      for model in ("hdit", "dit"):
        value = row.get(model)
        growth = (f"{value / previous[model]:.2f}" if value and previous.get(model) else "")
        cells += [f"{value:.3f}" if value else row.get(model + "_error", "-"), growth]
        previous[model] = value
      lines.append(f"| {size}² | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _ladder_rows(result: dict) -> list[tuple[int, dict]]:
  rows: dict[int, dict] = {}
  for r in result["cases"]:
    if r["case"].startswith("ladder-"):
      _, model, size = r["case"].split("-")
      entry = rows.setdefault(int(size), {})
      if "error" in r:
        entry[model + "_error"] = r["error"]
      else:
        entry[model] = r["ms_per_image"]
  return sorted(rows.items())


def plot(result: dict, path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  import matplotlib.ticker  # pylint: disable=import-outside-toplevel,unused-import
  rows = _ladder_rows(result)
  fig, ax = plt.subplots(figsize=(5, 4))
  for model, label in (("hdit", "HDiT-B/4"), ("dit", "DiT-B/4")):
    points = [(size, row[model]) for size, row in rows if row.get(model)]
    if points:
      ax.plot(*zip(*points), "o-", label=label)
  sizes = [size for size, _ in rows]
  hdit = [row.get("hdit") for _, row in rows]
  if hdit and hdit[0]:
    ax.plot(sizes, [hdit[0] * (s / sizes[0]) ** 2 for s in sizes], "k:", label="linear in pixels")
  ax.set(xscale="log", yscale="log", xlabel="resolution (pixels per side)",
         ylabel="ms per training image", xticks=sizes, xticklabels=[str(s) for s in sizes],
         title=f"train step, {result['device']}")
  ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default="benchmarks/results")
  parser.add_argument("--cases", nargs="*", default=list(DEFAULT_CASES))
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--timeout", type=float, default=400)
  parser.add_argument("--quick", action="store_true", help="CPU smoke run (quickstart model)")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--batch", type=int, default=64, help=argparse.SUPPRESS)
  parser.add_argument("--suffix", default="", help="added to the result file names")
  parser.add_argument("--report", default=None, help="rewrite the .md/.png of this .json")
  parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                      help="change every case's config (repeatable), e.g. model.remat=True")
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(measure(args.worker, args.batch, args.steps, args.warmup, args.set)),
          flush=True)
    return
  if args.report:
    with open(args.report) as f:
      write(json.load(f), args.out, args.suffix)
    return
  import jax  # pylint: disable=import-outside-toplevel
  cases = expand(["quickstart:8"] if args.quick else args.cases)
  try:   # a bad --set is a usage error, before any case runs
    for case, batch in cases:
      case_config(case, batch, args.set)
  except ValueError as e:
    parser.error(str(e))
  result = {"device": jax.devices()[0].device_kind, "devices": jax.device_count(),
            "jax": jax.__version__, "steps": args.steps, "warmup": args.warmup,
            "overrides": args.set, "xla_flags": os.environ.get("XLA_FLAGS", ""), "cases": []}
  for case, batch in cases:
    steps = min(args.steps, FEW_STEPS.get(case, args.steps))
    r = run_case(case, batch, steps, min(args.warmup, steps), args.timeout, args.set)
    print(json.dumps(r), flush=True)
    result["cases"].append(r)
    write(result, args.out, args.suffix)   # after every case: a cut-off run keeps the others
  print(markdown(result))


def write(result: dict, out: str, suffix: str) -> None:
  """The .json, .md and (for the ladder, where matplotlib is installed) .png of a result."""
  name = result["device"].replace(" ", "_") + suffix
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, f"train_throughput_{name}.json"), "w") as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(out, f"train_throughput_{name}.md"), "w") as f:
    f.write(markdown(result))
  if _ladder_rows(result) and importlib.util.find_spec("matplotlib"):
    plot(result, os.path.join(out, f"train_throughput_{name}.png"))


if __name__ == "__main__":
  main()
