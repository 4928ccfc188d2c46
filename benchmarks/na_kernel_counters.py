"""Hardware counters of the neighborhood-attention GPU kernels, through Nsight Compute.

Two modes. `run` launches each kernel once at one HDiT shape (Mosaic GPU forward, dq, dk/dv,
then Triton's forward and backward), for ncu to profile:

  mkdir -p /tmp/pp && ln -sfn $PWD/kernels /tmp/pp/hdit_kernels
  PYTHONPATH=/tmp/pp:$PWD ncu --clock-control none -k regex:na2d -o na \\
      --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \\
      --section LaunchStats --section Occupancy --section WarpStateStats \\
      --section SchedulerStats --section InstructionStats \\
      python benchmarks/na_kernel_counters.py run --shape imagenet256_l0
  ncu --import na.ncu-rep --page details > na_details.txt

`summary` reads that details page back and writes one row per kernel (time, registers, SMEM,
what limits blocks per SM, occupancy, issue activity, cache and DRAM throughput, spills,
instructions) as a markdown table:

  python benchmarks/na_kernel_counters.py summary na_details.txt --out benchmarks/results/x.md
"""

import argparse
import os
import re
import sys

import jax
import jax.numpy as jnp

from hdit_kernels import neighborhood_attention as na
from hdit_kernels.neighborhood_attention import mosaic_gpu, mosaic_gpu_backward
sys.path.insert(0, os.path.dirname(__file__))
from na_benchmark import KERNEL, SHAPES  # pylint: disable=wrong-import-position

# (column, ncu metric name) as the details page prints them.
METRICS = (("us", "Duration"), ("regs", "Registers Per Thread"),
           ("SMEM KiB", "Dynamic Shared Memory Per Block"),
           ("blocks/SM (regs)", "Block Limit Registers"),
           ("blocks/SM (SMEM)", "Block Limit Shared Mem"),
           ("occupancy %", "Achieved Occupancy"), ("issue busy %", "Issue Slots Busy"),
           ("eligible warps", "Eligible Warps Per Scheduler"),
           ("L2 %", "L2 Cache Throughput"), ("L2 hit %", "L2 Hit Rate"),
           ("DRAM %", "DRAM Throughput"), ("spill requests", "Local Memory Spilling Requests"),
           ("instructions", "Executed Instructions"))


def run(shape_name: str) -> None:
  shape = SHAPES[shape_name]
  q, k, v, ct = (jax.random.normal(key, shape, jnp.float32).astype(jnp.bfloat16)
                 for key in jax.random.split(jax.random.key(0), 4))
  config = mosaic_gpu.Config()
  geo = mosaic_gpu.geometry(shape, KERNEL, config)
  streams = config.streams(geo)
  out, lse = jax.jit(lambda *a: mosaic_gpu.forward(*a, KERNEL, 1.0, config))(q, k, v)
  _, delta = jax.jit(lambda *a: mosaic_gpu_backward.dq_and_delta(*a, geo, streams["dq"], 1.0))(
      q, k, v, out, lse, ct)
  jax.block_until_ready(jax.jit(
      lambda *a: mosaic_gpu_backward.dk_dv(*a, geo, streams["dk/dv"], 1.0))(
          q, k, v, ct, lse, delta))
  triton = lambda q, k, v: na.na2d(q, k, v, KERNEL, scale=1.0, implementation="pallas_gpu")
  _, vjp = jax.vjp(triton, q, k, v)
  jax.block_until_ready(vjp(ct))


_HEADER = re.compile(r"^  (\S+) \(.*?\)x\(.*?\), Context \d+", re.MULTILINE)


def parse_details(text: str) -> list[tuple[str, dict[str, str]]]:
  """(kernel name, {column: value}) per kernel of an `ncu --page details` text."""
  headers = list(_HEADER.finditer(text))
  rows = []
  for header, following in zip(headers, headers[1:] + [None]):
    block = text[header.end():following.start() if following else len(text)]
    values = {}
    for column, metric in METRICS:
      found = re.search(rf"\n\s+{re.escape(metric)}\s+(?:\S+\s+)?([\d,.]+)\s*\n", block)
      values[column] = found.group(1) if found else "-"
    rows.append((header.group(1).removesuffix("_mosaic_gpu_kernel"), values))
  return rows


def markdown(rows) -> str:
  head = "| kernel | " + " | ".join(column for column, _ in METRICS) + " |"
  lines = [head, "|" + "---|" * (len(METRICS) + 1)]
  lines += ["| " + name + " | " + " | ".join(v[c] for c, _ in METRICS) + " |"
            for name, v in rows]
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="mode", required=True)
  run_parser = sub.add_parser("run", help="launch each kernel once (under ncu)")
  run_parser.add_argument("--shape", default="imagenet256_l0")
  summary_parser = sub.add_parser("summary", help="tabulate an ncu details page")
  summary_parser.add_argument("details")
  summary_parser.add_argument("--out")
  summary_parser.add_argument("--title", default="", help="a line written above the table")
  args = parser.parse_args(argv)
  if args.mode == "run":
    run(args.shape)
    return
  with open(args.details) as f:
    rows = parse_details(f.read())
  if not rows:
    sys.exit(f"no kernels found in {args.details}: expected the text of `ncu --page details`")
  table = (f"{args.title}\n\n" if args.title else "") + markdown(rows)
  print(table)
  if args.out:
    with open(args.out, "w") as f:
      f.write(table)


if __name__ == "__main__":
  main()
