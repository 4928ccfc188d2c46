"""benchmarks/na_kernel_counters.py: the ncu details page read back into one row per kernel."""

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).parent.parent


def _counters():
  path = ROOT / "benchmarks" / "na_kernel_counters.py"
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _block(name: str, duration: str, registers: str, spills: str | None) -> str:
  lines = [f"  {name} (32, 6, 64)x(128, 1, 1), Context 1, Stream 14, Device 0, CC 9.0",
           "    Section: GPU Speed Of Light Throughput",
           f"    Duration                         us       {duration}",
           "    L2 Cache Throughput               %        75.41",
           "    Section: Launch Statistics",
           f"    Registers Per Thread             register/thread             {registers}",
           "    Block Limit Shared Mem                block            2"]
  if spills is not None:
    lines.append(f"    Local Memory Spilling Requests                        {spills}")
  return "\n".join(lines) + "\n\n"


def test_details_page_gives_each_kernels_own_values():
  counters = _counters()
  text = ("==PROF== Connected to process 1\n"
          + _block("na2d_fwd_mgpu_mosaic_gpu_kernel", "259.46", "168", "0")
          + _block("na2d_dkv_mgpu_mosaic_gpu_kernel", "410.94", "255", "1,671,168")
          + _block("na2d_fwd_gpu", "245.41", "119", None))
  rows = counters.parse_details(text)
  assert [name for name, _ in rows] == ["na2d_fwd_mgpu", "na2d_dkv_mgpu", "na2d_fwd_gpu"]
  fwd, dkv, triton = (values for _, values in rows)
  assert (fwd["us"], fwd["regs"], fwd["spill requests"]) == ("259.46", "168", "0")
  assert (dkv["us"], dkv["regs"], dkv["spill requests"]) == ("410.94", "255", "1,671,168")
  assert triton["spill requests"] == "-"   # a metric a block lacks is not taken from the next
  assert fwd["L2 %"] == "75.41" and fwd["blocks/SM (SMEM)"] == "2"
  table = counters.markdown(rows)
  assert table.count("\n") == 2 + len(rows) and "| na2d_dkv_mgpu | 410.94 | 255 |" in table


def test_text_without_kernels_gives_no_rows():
  assert _counters().parse_details("# a README\n  some text (not a kernel)\n") == []
