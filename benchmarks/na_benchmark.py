"""Neighborhood attention on the GPU: correctness against the reference, then timings.

Run on a CUDA machine from the repository root (the package need not be installed):

  mkdir -p /tmp/pp && ln -sfn $PWD/kernels /tmp/pp/hdit_kernels
  PYTHONPATH=/tmp/pp:$PWD python benchmarks/na_benchmark.py --out benchmarks/results

For every HDiT shape (kernel 7, bf16) it times forward and forward+backward (jax.vjp, the
cotangent applied) of each implementation (pallas_gpu and mosaic_gpu with their variants, xla
with either forward, the gather reference) and of cuDNN dense attention over the same tokens,
after checking them against the reference, and prints ms, useful
TFLOP/s (4 B heads H W k^2 d / t; x2.5 for forward+backward) and the ratio to the HBM floor:
q, k, v, o read or written once forward (4 tensors), plus q, k, v, o, dO read and dq, dk, dv
written backward (12 in all), at the device copy bandwidth measured here. Results (markdown,
json, log) go to --out, named after the device. With --mosaic-kernels it times each Mosaic GPU
kernel (forward, dq, dk/dv) on its own instead, for every --mosaic-variants config:

  PYTHONPATH=/tmp/pp:$PWD python benchmarks/na_benchmark.py --mosaic-kernels \
      --mosaic-variants "" slots=0 slots=2,block_keys=64 tile_rows=8
"""

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from hdit_kernels import neighborhood_attention as na
from hdit_kernels.neighborhood_attention import mosaic_gpu, mosaic_gpu_backward, pallas_gpu

SHAPES = {  # name: (batch, height, width, heads, head_dim)
    "imagenet256_l0": (32, 64, 64, 6, 64),
    "imagenet256_l1": (32, 32, 32, 12, 64),
    "ffhq1024_l0": (4, 256, 256, 2, 64),
    "ffhq1024_l1": (4, 128, 128, 4, 64),
    "ffhq1024_l2": (4, 64, 64, 6, 64),
}
KERNEL = 7
# PyTorch flex attention on one H100 (na_kernel_notes.md): forward, forward+backward ms.
FLEX_MS = {"imagenet256_l0": (0.84, 3.04), "imagenet256_l1": (0.30, 1.02)}


_SHORT = {"bh": "block_h", "bw": "block_w", "kr": "kv_rows", "kc": "kv_cols", "qr": "q_rows",
          "qc": "q_cols", "w": "num_warps", "wb": "num_warps_bwd", "s": "num_stages",
          "sb": "num_stages_bwd", "fb": "fused_backward"}


def parse_variant(text: str) -> pallas_gpu.Config:
  """'bh=8,bw=8,kr=4,kc=16,qr=2,qc=16,w=4,wb=4,s=3,sb=3,fb=1' -> Config.

  Omitted keys keep their defaults.
  """
  kw = {_SHORT[k]: int(v) for k, v in (item.split("=") for item in text.split(",") if item)}
  if "fused_backward" in kw:
    kw["fused_backward"] = bool(kw["fused_backward"])
  return pallas_gpu.Config(**kw)


def parse_mosaic_variant(text: str) -> mosaic_gpu.Config:
  """'block_keys=128,tile_rows=4,slots=2' -> Config ('' -> defaults)."""
  fields = dict(item.split("=") for item in text.split(",") if item)
  return mosaic_gpu.Config(**{name: int(value) for name, value in fields.items()})


def rel_l2(got, ref) -> float:
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


def random_inputs(key, shape, dtype, count=1):
  keys = jax.random.split(key, 4 * count)
  make = lambda k: jax.random.normal(k, shape, jnp.float32).astype(dtype)
  return [tuple(make(keys[4 * i + j]) for j in range(4)) for i in range(count)]


def check(configs, mosaic_configs, log, dtypes=("float32", "bfloat16")) -> bool:
  """pallas_gpu and mosaic_gpu (each config) and xla vs the gather reference on this GPU:
  forward and grads. Cases a kernel does not support are logged as skipped."""
  cases = [((2, 64, 64, 6, 64), 7, 1), ((2, 32, 32, 12, 64), 7, 1), ((1, 256, 256, 2, 64), 7, 1),
           ((3, 12, 17, 2, 16), 5, 1), ((2, 20, 18, 2, 32), 3, 2), ((1, 9, 9, 1, 8), 9, 1),
           ((3, 16, 40, 2, 64), 7, 1), ((1, 24, 16, 3, 64), 3, 1), ((2, 16, 16, 2, 64), 9, 1),
           ((1, 48, 32, 2, 64), 5, 2), ((1, 64, 64, 2, 64), 11, 1), ((2, 32, 32, 4, 64), 9, 1)]
  ok = True
  tolerances = {"float32": 2e-5, "bfloat16": 2e-2}
  for dtype, tol in ((jnp.dtype(name), tolerances[name]) for name in dtypes):
    for shape, ks, dil in cases:
      inputs = random_inputs(jax.random.key(sum(shape)), shape, dtype)[0]

      def grads(fn, q, k, v, ct):
        out, vjp = jax.vjp(fn, q, k, v)
        return (out,) + vjp(ct.astype(out.dtype))

      def reference(q, k, v):
        f32 = lambda t: t.astype(jnp.float32)
        return na.na2d_reference(f32(q), f32(k), f32(v), ks, dil, 1.0)

      with jax.default_matmul_precision("highest"):
        want = jax.jit(functools.partial(grads, reference))(*inputs)
      impls = ([("xla", None)] + [("pallas_gpu", c) for c in configs]
               + [("mosaic_gpu", c) for c in mosaic_configs] + [(None, None)])
      for name, cfg in impls:
        fn = functools.partial(na.na2d, kernel_size=ks, dilation=dil, scale=1.0,
                               implementation=name, config=cfg)
        try:
          got = jax.jit(functools.partial(grads, fn))(*inputs)
        except NotImplementedError as e:
          log(f"check {jnp.dtype(dtype).name:8s} {str(shape):22s} k{ks} d{dil} {name:10s} "
              f"{cfg_name(cfg)} skipped: {e}")
          continue
        except Exception as e:  # pylint: disable=broad-except
          log(f"check {jnp.dtype(dtype).name:8s} {str(shape):22s} k{ks} d{dil} {name:10s} "
              f"{cfg_name(cfg)} FAILED: {type(e).__name__}: {str(e)[:600]}")
          ok = False
          continue
        errs = [rel_l2(g.astype(jnp.float32), w) for g, w in zip(got, want)]
        bad = not all(e <= tol for e in errs) or any(
            not np.isfinite(np.asarray(g, np.float32)).all() for g in got)
        ok &= not bad
        log(f"check {jnp.dtype(dtype).name:8s} {str(shape):22s} k{ks} d{dil} {name or 'auto':10s} "
            f"{cfg_name(cfg):28s} out/dq/dk/dv rel {' '.join(f'{e:.1e}' for e in errs)}"
            f"{'  FAIL' if bad else ''}")
  return ok


def cfg_name(cfg) -> str:
  if cfg is None:
    return "-"
  if isinstance(cfg, mosaic_gpu.Config):
    diff = [f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
            if getattr(cfg, f.name) != getattr(mosaic_gpu.Config(), f.name)]
    return ",".join(diff) or "default"
  d = pallas_gpu.Config()
  short = {v: k for k, v in _SHORT.items()}
  diff = [f"{short[f.name]}={int(getattr(cfg, f.name))}" for f in dataclasses.fields(cfg)
          if f.name in short and getattr(cfg, f.name) != getattr(d, f.name)]
  return ",".join(diff) or "default"


def time_ms(fn, inputs, min_batch_s=0.02, batches=15) -> float:
  """Median over batches of the mean time per call, calls queued back to back per batch.

  Inputs rotate among several sets so that repeated calls do not run from L2.
  """
  jax.block_until_ready(fn(*inputs[0]))            # compile and warm up
  jax.block_until_ready(fn(*inputs[-1]))
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*inputs[0]))
  per_batch = max(3, int(min_batch_s / max(time.perf_counter() - t0, 1e-6)))
  samples = []
  for _ in range(batches):
    t0 = time.perf_counter()
    for i in range(per_batch):
      out = fn(*inputs[i % len(inputs)])
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - t0) / per_batch * 1e3)
  return statistics.median(samples)


def copy_bandwidth() -> float:
  """Device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
  x = jnp.ones((1 << 29,), jnp.bfloat16)   # 1 GiB
  fn = jax.jit(lambda x: x + jnp.bfloat16(1))
  ms = time_ms(fn, [(x,)], batches=9)
  return 2 * x.nbytes / (ms * 1e-3)


def mosaic_kernel_times(shapes, mosaic_configs, log) -> None:
  """Each Mosaic GPU kernel (forward, dq with D, dk/dv) timed on its own, with its SMEM and
  the largest relative difference of its outputs from the first config's."""
  for shape_name in shapes:
    shape = SHAPES[shape_name]
    sets = random_inputs(jax.random.key(0), shape, jnp.bfloat16, count=3)
    q, k, v, ct = sets[0]
    first = None
    for cfg in mosaic_configs:
      reason = mosaic_gpu.unsupported(shape, jnp.bfloat16, KERNEL, cfg)
      if reason:
        log(f"kernels {shape_name} mosaic_gpu[{cfg_name(cfg)}] skipped: {reason}")
        continue
      geo = mosaic_gpu.geometry(shape, KERNEL, cfg)
      streams = cfg.streams(geo)
      fwd = jax.jit(lambda q, k, v, c=cfg: mosaic_gpu.forward(q, k, v, KERNEL, 1.0, c))
      dq = jax.jit(lambda q, k, v, o, l, do, s=streams["dq"], g=geo:
                   mosaic_gpu_backward.dq_and_delta(q, k, v, o, l, do, g, s, 1.0))
      dkv = jax.jit(lambda q, k, v, do, l, dl, s=streams["dk/dv"], g=geo:
                    mosaic_gpu_backward.dk_dv(q, k, v, do, l, dl, g, s, 1.0))
      out, lse = fwd(q, k, v)
      dq_, delta = dq(q, k, v, out, lse, ct)
      outputs = (out, dq_) + tuple(dkv(q, k, v, ct, lse, delta))
      first = first or outputs
      diff = max(rel_l2(a, b) for a, b in zip(outputs, first))
      times = (time_ms(lambda q, k, v, ct: fwd(q, k, v), sets),
               time_ms(lambda q, k, v, ct: dq(q, k, v, out, lse, ct), sets),
               time_ms(lambda q, k, v, ct: dkv(q, k, v, ct, lse, delta), sets))
      smem = mosaic_gpu.smem_bytes(geo, cfg, shape[-1], 2)
      log(f"kernels {shape_name} mosaic_gpu[{cfg_name(cfg)}] tile {geo.tile_rows}x"
          f"{geo.tile_cols}, halos {tuple(geo.key_halo)} / {tuple(geo.query_halo)}, SMEM KiB "
          f"{' / '.join(f'{b / 1024:.0f}' for b in smem.values())}: forward {times[0]:.3f}, dq "
          f"{times[1]:.3f}, dk/dv {times[2]:.3f}, sum {sum(times):.3f} ms; outputs vs the "
          f"first config {diff:.0e}")


def benchmark(shapes, configs, mosaic_configs, bandwidth, log, baselines=True):
  rows = []
  for shape_name in shapes:
    b, h, w, n, d = SHAPES[shape_name]
    sets = random_inputs(jax.random.key(0), (b, h, w, n, d), jnp.bfloat16, count=3)
    useful = 4 * b * n * h * w * KERNEL ** 2 * d
    unit = b * h * w * n * d * 2   # bytes of one bf16 tensor
    impls = [(f"pallas_gpu[{cfg_name(c)}]",
              lambda q, k, v, c=c: na.na2d(q, k, v, KERNEL, scale=1.0,
                                           implementation="pallas_gpu", config=c))
             for c in configs]
    impls += [(f"mosaic_gpu[{cfg_name(c)}]",
               lambda q, k, v, c=c: na.na2d(q, k, v, KERNEL, scale=1.0,
                                            implementation="mosaic_gpu", config=c))
              for c in mosaic_configs]
    if baselines:
      for method in ("halo", "offsets"):
        impls.append((f"xla ({method})", lambda q, k, v, c=na.xla.Config(forward=method): na.na2d(
            q, k, v, KERNEL, scale=1.0, implementation="xla", config=c)))
      impls.append(("reference (gather)",
                    lambda q, k, v: na.na2d_reference(q, k, v, KERNEL, 1, 1.0)))
      flat = lambda t: t.reshape(b, h * w, n, d)
      impls.append(("cudnn dense", lambda q, k, v: jax.nn.dot_product_attention(
          flat(q), flat(k), flat(v), scale=1.0, implementation="cudnn").reshape(q.shape)))
    for name, fn in impls:
      fwd = jax.jit(fn)
      fwd_bwd = jax.jit(lambda q, k, v, ct, fn=fn: jax.vjp(fn, q, k, v)[1](ct))
      try:
        t_fwd = time_ms(lambda q, k, v, ct: fwd(q, k, v), sets)
        t_fb = time_ms(fwd_bwd, sets)
      except Exception as e:  # pylint: disable=broad-except
        log(f"{shape_name} {name}: failed: {type(e).__name__}: {str(e)[:300]}")
        continue
      row = dict(shape=shape_name, dims=[b, h, w, n, d], impl=name, fwd_ms=t_fwd,
                 fwd_bwd_ms=t_fb, fwd_tflops=useful / t_fwd * 1e-9,
                 fwd_bwd_tflops=2.5 * useful / t_fb * 1e-9,
                 fwd_floor_ms=4 * unit / bandwidth * 1e3,
                 fwd_bwd_floor_ms=12 * unit / bandwidth * 1e3)
      row["fwd_x_floor"] = t_fwd / row["fwd_floor_ms"]
      row["fwd_bwd_x_floor"] = t_fb / row["fwd_bwd_floor_ms"]
      rows.append(row)
      log(f"{shape_name:15s} {name:34s} fwd {t_fwd:8.3f} ms ({row['fwd_tflops']:6.1f} TF/s, "
          f"{row['fwd_x_floor']:5.2f}x floor)  fwd+bwd {t_fb:8.3f} ms "
          f"({row['fwd_bwd_tflops']:6.1f} TF/s, {row['fwd_bwd_x_floor']:5.2f}x floor)")
  return rows


def markdown(rows, device, bandwidth) -> str:
  lines = [f"# Neighborhood attention benchmark ({device})", "",
           f"kernel {KERNEL}, bf16, scale 1.0; device copy bandwidth {bandwidth / 1e12:.2f} TB/s "
           "(read + write); floor = 4 (fwd) or 12 (fwd+bwd) tensors of q's size at that "
           "bandwidth; useful FLOPs 4·B·heads·H·W·k²·d (x2.5 for fwd+bwd); medians of batched "
           "back-to-back calls after warm-up, inputs rotating over 3 sets.", "",
           "| shape | implementation | fwd ms | fwd TFLOP/s | fwd / floor | fwd+bwd ms | "
           "fwd+bwd TFLOP/s | fwd+bwd / floor | flex fwd, fwd+bwd ms |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    flex = FLEX_MS.get(r["shape"])
    lines.append(
        f"| {r['shape']} {tuple(r['dims'])} | {r['impl']} | {r['fwd_ms']:.3f} | "
        f"{r['fwd_tflops']:.1f} | {r['fwd_x_floor']:.2f} | {r['fwd_bwd_ms']:.3f} | "
        f"{r['fwd_bwd_tflops']:.1f} | {r['fwd_bwd_x_floor']:.2f} | "
        f"{'%.2f, %.2f' % flex if flex else '-'} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default=",".join(SHAPES))
  parser.add_argument("--variants", nargs="*", default=[""],
                      help="pallas_gpu configs, e.g. 'bh=8,bw=8,kr=4' ('' = defaults)")
  parser.add_argument("--mosaic-variants", nargs="*", default=[""],
                      help="mosaic_gpu configs to check and time, e.g. 'slots=1,block_keys=128' "
                           "('' = defaults; none given = none)")
  parser.add_argument("--mosaic-kernels", action="store_true",
                      help="only time each mosaic_gpu kernel on its own, per variant")
  parser.add_argument("--no-check", action="store_true")
  parser.add_argument("--check-dtypes", default="float32,bfloat16")
  parser.add_argument("--no-baselines", action="store_true",
                      help="time pallas_gpu and mosaic_gpu only (not xla, the reference, cuDNN)")
  parser.add_argument("--out", default="benchmarks/results")
  parser.add_argument("--tag", default="", help="suffix of the result files")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  log_file = open(os.path.join(args.out, "na_benchmark.log"), "a")

  def log(msg):
    print(msg, flush=True)
    log_file.write(msg + "\n")
    log_file.flush()

  device = jax.devices()[0].device_kind
  log(f"device {device}, jax {jax.__version__}")
  configs = [parse_variant(v) for v in args.variants]
  mosaic_configs = [parse_mosaic_variant(v) for v in args.mosaic_variants]
  if args.mosaic_kernels:
    mosaic_kernel_times(args.shapes.split(","), mosaic_configs, log)
    return
  if not args.no_check and not check(configs, mosaic_configs, log,
                                     args.check_dtypes.split(",")):
    log("CHECK FAILED")
    sys.exit(1)
  bandwidth = copy_bandwidth()
  log(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
  rows = benchmark(args.shapes.split(","), configs, mosaic_configs, bandwidth, log,
                   not args.no_baselines)
  stem = os.path.join(args.out, "na_benchmark_" + device.replace(" ", "_") + args.tag)
  with open(stem + ".json", "w") as f:
    json.dump(dict(device=device, jax=jax.__version__, copy_bandwidth=bandwidth, rows=rows), f,
              indent=1)
  table = markdown(rows, device, bandwidth)
  with open(stem + ".md", "w") as f:
    f.write(table)
  print(table)


if __name__ == "__main__":
  main()
