"""Which JAX operations an op kind of the compiled train step comes from.

  python benchmarks/hlo_census.py --case=imagenet256 --batch=64 --op=concatenate

Compiles the training loop's own jitted step (as `train_throughput` does, synthetic data) and
reads the optimised HLO: every instruction of kind `--op` (inside fusions too), with its shape,
the fusion that holds it and the JAX source that XLA's metadata names (op_name, file:line).
A profile (`profile_step.py`) says how long a kernel family takes; this says where its
instructions come from. Writes benchmarks/results/hlo_<op>_<case>_<device>.md and the HLO text.

  python benchmarks/hlo_census.py --bandwidth=benchmarks/results/profile_imagenet256_NVIDIA_H200

joins a profile's kernels (`<stem>.json`) with the HLO it was written with (`profile_step.py
--hlo`, `<stem>.hlo.txt.gz`): each fusion's bytes in and out (its operands and results, an upper
bound where it reads part of an operand) over its measured time, the bandwidth it reached.
Writes `<stem>_bandwidth.md`.
"""

import argparse
import collections
import gzip
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?(%?[\w.\-]+)\s*=\s*(\S+)\s+(\w[\w\-]*)\(")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?(%?[\w.\-]+)\s.*\{\s*$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_SOURCE = re.compile(r'source_file="([^"]*)"\s+source_line=(\d+)')


def census(hlo_text: str, op: str) -> list[dict]:
  """Every `op` instruction: its computation, shape, op_name and source."""
  found, computation = [], ""
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header and "=" not in line.split("{")[0]:
      computation = header.group(1)
      continue
    match = _INSTRUCTION.match(line)
    if not match or match.group(3) != op:
      continue
    op_name = _OP_NAME.search(line)
    source = _SOURCE.search(line)
    found.append(dict(
        computation=computation, shape=match.group(2),
        op_name=op_name.group(1) if op_name else "",
        source=f"{os.path.basename(source.group(1))}:{source.group(2)}" if source else ""))
  return found


_BYTES = dict(pred=1, s8=1, u8=1, bf16=2, f16=2, s32=4, u32=4, f32=4, s64=8, f64=8)
_FUSION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+) = .*? fusion\(.*calls=%([\w.\-]+)")
_SIGNATURE = re.compile(r"^%([\w.\-]+) \((.*?)\) -> (.*?) \{\s*$", re.M)


def shape_bytes(shapes: str) -> int:
  """The bytes of every array shape (`bf16[64,256]`) written in `shapes`."""
  total = 0
  for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", shapes):
    count = 1
    for d in filter(None, dims.split(",")):
      count *= int(d)
    total += count * _BYTES.get(dtype, 0)
  return total


def fusion_traffic(hlo_text: str) -> dict[str, int]:
  """Bytes in + out of every fusion, by its kernel's name (`loop_add_fusion.8` runs as
  `loop_add_fusion_8`): the called computation's parameters and results."""
  signatures = {m.group(1): m.group(2) + " " + m.group(3) for m in _SIGNATURE.finditer(hlo_text)}
  traffic = {}
  for line in hlo_text.splitlines():
    match = _FUSION.match(line)
    if match and match.group(2) in signatures:
      traffic[match.group(1).replace(".", "_")] = shape_bytes(signatures[match.group(2)])
  return traffic


def bandwidth_report(stem: str) -> str:
  """The profile's fusion kernels with the bandwidth each reached (see the module's text)."""
  with open(f"{stem}.json") as f:
    profile = json.load(f)
  with gzip.open(f"{stem}.hlo.txt.gz", "rt") as f:
    traffic = fusion_traffic(f.read())
  lines = [f"# Bandwidth of the fusions: {profile['case']}, batch {profile['batch']}, "
           f"{profile['device']}, jax {profile['jax']}", "",
           f"Device busy {profile['device_busy_ms_per_step']:.1f} ms per step. Bytes are each "
           "fusion's operands and results (an upper bound where it reads part of an operand).",
           "", "| kernel | ms/step | calls/step | MB per call | TB/s |", "|---|---|---|---|---|"]
  for kernel in profile["kernels"]:
    moved = traffic.get(kernel["name"])
    if kernel["kind"] not in ("fusion", "concatenate") or not moved:
      continue
    seconds = kernel["ms_per_step"] / kernel["calls_per_step"] / 1e3
    lines.append(f"| `{kernel['name']}` | {kernel['ms_per_step']:.2f} | "
                 f"{kernel['calls_per_step']:.0f} | {moved / 1e6:.0f} | "
                 f"{moved / seconds / 1e12:.2f} |")
  return "\n".join(lines) + "\n"


def _short(op_name: str) -> str:
  """The op_name without the jit/transpose wrappers' repetition, for grouping."""
  parts = [p for p in op_name.split("/") if p and not p.startswith("jit(")]
  return "/".join(parts[-4:])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--case", default="imagenet256")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--op", default="concatenate")
  parser.add_argument("--out", default="benchmarks/results")
  parser.add_argument("--bandwidth", metavar="STEM",
                      help="report the bandwidth of a profile's fusions (no compilation)")
  args = parser.parse_args()
  if args.bandwidth:
    text = bandwidth_report(args.bandwidth)
    with open(f"{args.bandwidth}_bandwidth.md", "w") as f:
      f.write(text)
    print(text)
    return

  import jax  # pylint: disable=import-outside-toplevel
  from train_throughput import prepare_case  # pylint: disable=import-outside-toplevel

  _, step, state, batch, key = prepare_case(args.case, args.batch)
  hlo = step.lower(state, batch, key).compile().as_text()
  device = jax.devices()[0].device_kind.replace(" ", "_")
  os.makedirs(args.out, exist_ok=True)
  stem = os.path.join(args.out, f"hlo_{args.op}_{args.case}_{device}")
  with gzip.open(f"{stem}.hlo.txt.gz", "wt") as f:
    f.write(hlo)
  rows = census(hlo, args.op)
  groups = collections.Counter((r["shape"], _short(r["op_name"]), r["source"]) for r in rows)
  lines = [f"# `{args.op}` in the compiled train step: {args.case}, batch {args.batch}, "
           f"{jax.device_count()}x {jax.devices()[0].device_kind}, jax {jax.__version__}", "",
           f"{len(rows)} instructions in {len({r['computation'] for r in rows})} computations.",
           "", "| count | shape | op_name (last parts) | source |", "|---|---|---|---|"]
  for (shape, name, source), count in groups.most_common():
    lines.append(f"| {count} | `{shape}` | `{name}` | {source} |")
  text = "\n".join(lines) + "\n"
  with open(f"{stem}.md", "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
