"""The forward's memory-bound operations against XLA's floor for the same bytes.

  PYTHONPATH=$PWD python benchmarks/fusion_floor.py --out benchmarks/results \\
      [--config imagenet256] [--level 0] [--batch 128]
  (--quick: a small CPU smoke run)

At one level of a config's model (its token grid, width, heads and feed-forward width; batch 128
is a guided sampling step of 64 images), each operation the model runs between its matmuls, as
the model computes it, is timed next to a floor: an operation that reads and writes the same
tensors with one multiply per element (what XLA's fusion of the cheapest arithmetic over those
bytes takes), a product of its inputs so that its backward, like the operation's, reads them
again. The ratio says how much any rewrite of the operation could gain while XLA fuses
it as one kernel between two matmuls; the TB/s column says how far that floor is from the
device's bandwidth. Forward and forward + backward (the VJP of the operation) are timed.

* `cos-sim + RoPE`: q, k and v out of the fused projection's [B, H, W, 3, heads, d_head]
  output, q and k normalised per head (cosine similarity) and rotated (axial RoPE); the floor
  squares q and k and copies v. `RoPE without concatenate` is a variant (a rotation written as
  x * c + swap(x) * s with full-width cos/sin factors), kept as the measured alternative.
  `cos-sim + RoPE, one kernel` is hdit_kernels.qk_norm_rope's Mosaic GPU kernels (on a GPU; in
  Pallas's GPU interpreter with --quick).
* `GEGLU`: value * GELU(gate) out of the up projection's [..., 2, d_ff]; floor value * gate.
* `AdaRMSNorm`: RMSNorm with a per-sample gain; floor x * x.
* `elementwise x + 1`: a 1 GiB bfloat16 array (XLA's plain elementwise rate).

Times are the mean of back-to-back calls (dispatch overlapped). Writes
fusion_floor_<config>_l<level>_b<batch>_<device>.json and .md.
"""

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from hdit_jax.models import attention, layers, positions
from hdit_jax.models.spec import hdit_spec_from_config
from hdit_kernels import qk_norm_rope
sys.path.insert(0, os.path.dirname(__file__))
from train_throughput import load_config  # pylint: disable=wrong-import-position

F32, BF16 = jnp.float32, jnp.bfloat16


def mean_ms(fn, *args, calls: int) -> float:
  """Mean time of `calls` back-to-back calls of the jitted fn, after one to compile."""
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(calls):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / calls * 1e3


def vjp_of(fn):
  def forward_backward(x, cotangent):
    _, vjp = jax.vjp(fn, x)
    return vjp(cotangent)[0]
  return forward_backward


def max_relative_error(fn, reference, x, cotangent) -> float:
  """The largest relative L2 error of fn's outputs and x's gradient against reference's."""
  errors = []
  for got, want in ((jax.jit(fn)(x), jax.jit(reference)(x)),
                    ((jax.jit(vjp_of(fn))(x, cotangent),), (jax.jit(vjp_of(reference))(x, cotangent),))):
    for g, r in zip(got, want):
      g, r = g.astype(F32), r.astype(F32)
      errors.append(float(jnp.linalg.norm(g - r) / jnp.linalg.norm(r)))
  return max(errors)


def level_shape(config_name: str, level: int):
  config = load_config(config_name)
  spec = hdit_spec_from_config(config.model)
  lv = spec.levels[level]
  h, w = (s // p // 2 ** level for s, p in zip(config.model.input_size, spec.patch_size))
  return h, w, lv.width, lv.width // lv.attention.d_head, lv.attention.d_head, lv.d_ff


def rope_without_concatenate(x, theta):
  """apply_rope as x * c + swap(x) * s: c = (cos, cos, 1..), s = (-sin, sin, 0..), swap
  exchanging the two rotated halves."""
  r, d = theta.shape[-1], x.shape[-1]
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  one = jnp.ones(theta.shape[:-1] + (d - 2 * r,), F32)
  c = jnp.concatenate([cos, cos, one], -1)
  s = jnp.concatenate([-sin, sin, 0 * one], -1)
  x32 = x.astype(F32)
  swapped = jnp.flip(x32.reshape(x.shape[:-1] + (d // (2 * r), 2, r)), -2).reshape(x.shape)
  return (x32 * c + swapped * s).astype(x.dtype)


def cases(batch: int, h: int, w: int, width: int, heads: int, d_head: int, d_ff: int,
          big_elements: int = 2 ** 29, qk_kernel: str | None = None):
  """(name, fn, input, cotangent, bytes read + written) of each operation and floor.
  qk_kernel: 'gpu' or 'interpret' adds the one-kernel q/k preparation, run so."""
  keys = jax.random.split(jax.random.key(0), 6)
  normal = lambda key, shape: jax.random.normal(key, shape, F32).astype(BF16)
  scale = jnp.full((heads,), 10.0, F32)
  theta = positions.rope_angles(positions.make_axial_pos(h, w), positions.rope_freqs(d_head, heads))
  qkv = normal(keys[0], (batch, h, w, 3, heads, d_head))
  qkv_ct = tuple(normal(keys[1], (batch, h, w, heads, d_head)) for _ in range(3))

  def split(qkv):
    return qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]

  def cos_sim_rope(qkv, rope=positions.apply_rope):
    q, k, v = split(qkv)
    q, k = attention.scale_for_cosine_sim(q, k, scale)
    return rope(q, theta), rope(k, theta), v

  def one_kernel(qkv):
    return qk_norm_rope.qk_norm_rope(qkv, jnp.sqrt(scale), jnp.cos(theta), jnp.sin(theta),
                                     implementation="mosaic_gpu",
                                     interpret=qk_kernel == "interpret")

  def qkv_floor(qkv):
    q, k, v = split(qkv)
    return q * q, k * k, v

  up = normal(keys[2], (batch, h, w, 2, d_ff))
  up_ct = normal(keys[3], (batch, h, w, d_ff))
  x = normal(keys[4], (batch, h, w, width))
  gain = 1 + 0.1 * jax.random.normal(keys[5], (batch, 1, 1, width), F32)
  big = jnp.zeros((big_elements,), BF16)
  two = 2 * qkv.size   # bytes of qkv in bfloat16
  kernel_rows = [("cos-sim + RoPE, one kernel", one_kernel, qkv, qkv_ct, 2 * two)] \
      if qk_kernel and qk_norm_rope.unsupported(qkv.shape, qkv.dtype) is None else []
  return [
      ("cos-sim + RoPE", cos_sim_rope, qkv, qkv_ct, 2 * two),
      ("RoPE without concatenate", lambda t: cos_sim_rope(t, rope_without_concatenate), qkv,
       qkv_ct, 2 * two),
      *kernel_rows,
      ("floor: q * q, k * k, v", qkv_floor, qkv, qkv_ct, 2 * two),
      ("GEGLU", layers.geglu, up, up_ct, 3 * up.size),
      ("floor: value * gate", lambda t: t[..., 0, :] * t[..., 1, :], up, up_ct, 3 * up.size),
      ("AdaRMSNorm", lambda t: layers.rms_norm(t, gain, 1e-6), x, x, 4 * x.size),
      ("floor: x * x", lambda t: t * t, x, x, 4 * x.size),
      (f"elementwise x + 1 ({2 * big.size / 2 ** 30:g} GiB)", lambda t: t + 1, big, big,
       4 * big.size),
  ]


def measure(config_name: str, level: int, batch: int, calls: int, shape=None,
            big_elements: int = 2 ** 29, qk_kernel: str | None = None) -> dict:
  h, w, width, heads, d_head, d_ff = shape or level_shape(config_name, level)
  rows, fns = [], {}
  for name, fn, x, cotangent, nbytes in cases(batch, h, w, width, heads, d_head, d_ff,
                                              big_elements, qk_kernel):
    fns[name], extra = fn, {}
    try:
      if name.endswith("one kernel"):   # checked against the model's computation first
        error = max_relative_error(fn, fns["cos-sim + RoPE"], x, cotangent)
        if error > 2e-2:
          raise ValueError(f"relative error {error:.3g} against cos-sim + RoPE")
        extra["max_rel_error"] = error
      forward = mean_ms(fn, x, calls=calls)
      both = mean_ms(vjp_of(fn), x, cotangent, calls=calls)
    except Exception as e:  # pylint: disable=broad-except
      if not name.endswith("one kernel"):
        raise
      # A kernel that fails on this device is reported in its row; the rest is still timed.
      rows.append({"op": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
      print(json.dumps(rows[-1]), flush=True)
      continue
    rows.append({"op": name, "forward_ms": forward, "forward_backward_ms": both,
                 "forward_bytes": nbytes, "forward_tb_s": nbytes / forward / 1e9, **extra})
    print(json.dumps(rows[-1]), flush=True)
  device = jax.devices()[0]
  return {"device": device.device_kind, "jax": jax.__version__, "config": config_name,
          "level": level, "batch": batch, "shape": {"h": h, "w": w, "width": width,
                                                     "heads": heads, "d_head": d_head,
                                                     "d_ff": d_ff}, "rows": rows}


def markdown(r: dict) -> str:
  s = r["shape"]
  lines = [f"# Memory-bound operations against their floors: {r['config']} level {r['level']}, "
           f"{r['device']}, jax {r['jax']}", "",
           f"Batch {r['batch']}, {s['h']}x{s['w']} tokens, width {s['width']} ({s['heads']} "
           f"heads x {s['d_head']}), d_ff {s['d_ff']}; bfloat16. Mean of back-to-back calls. "
           "Floor: the same reads and writes with one multiply per element.", "",
           "| operation | forward ms | x floor | GB moved (forward) | TB/s | forward + backward ms "
           "| x floor |", "|---|---|---|---|---|---|---|"]
  floor = None
  for row in reversed(r["rows"]):   # each operation's floor follows it
    row["_floor"] = floor
    if row["op"].startswith("floor"):
      floor = row
    elif row["op"].startswith("elementwise"):
      floor = None
  for row in r["rows"]:
    f = row.pop("_floor")
    if "error" in row:
      lines.append(f"| {row['op']} | failed: {row['error']} | | | | | |")
      continue
    ratio = lambda key: f"{row[key] / f[key]:.2f}" if f and not row["op"].startswith("floor") \
        else ""
    lines.append(f"| {row['op']} | {row['forward_ms']:.3f} | {ratio('forward_ms')} | "
                 f"{row['forward_bytes'] / 1e9:.2f} | {row['forward_tb_s']:.2f} | "
                 f"{row['forward_backward_ms']:.3f} | {ratio('forward_backward_ms')} |")
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default="benchmarks/results")
  parser.add_argument("--config", default="imagenet256")
  parser.add_argument("--level", type=int, default=0)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--calls", type=int, default=20)
  parser.add_argument("--quick", action="store_true", help="CPU smoke run (small shapes)")
  args = parser.parse_args()
  if args.quick:
    result = measure("quick", 0, 2, 2, shape=(8, 8, 128, 2, 64, 384), big_elements=2 ** 20,
                     qk_kernel="interpret")
  else:
    result = measure(args.config, args.level, args.batch, args.calls,
                     qk_kernel="gpu" if jax.default_backend() == "gpu" else None)
  text = markdown(result)
  print(text)
  name = (f"fusion_floor_{result['config']}_l{result['level']}_b{result['batch']}_"
          f"{result['device'].replace(' ', '_')}")
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, name + ".json"), "w") as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(args.out, name + ".md"), "w") as f:
    f.write(text)


if __name__ == "__main__":
  main()
