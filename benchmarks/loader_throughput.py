"""The input pipeline alone, and with the train step: images/s per host.

  PYTHONPATH=$PWD python benchmarks/loader_throughput.py --out benchmarks/results [--quick]
      [--with_step]

Sources: the embedded digits (28x28), an image folder of JPEGs at ImageNet's typical size
(500x375, resized and centre-cropped to 256 on load), the same images prepared once at 256
(`hdit_jax.prepare_data`: PNG in array_record), and 1024x1024 JPEGs prepared at 1024. The images
are smooth random fields (upsampled noise), so that JPEG and PNG sizes are photo-like. Each
source is read through `make_loader` (the training pipeline: decode, fit, flip, batch) with
several worker counts and read-ahead settings, timed after the first batch (worker start-up
excluded). `--with_step` then trains through the real loop (`trainer.train`) from the
embedded digits (quickstart model) and from the prepared 256 set (the 557M model) and reads
images/s from its metrics. Writes loader_throughput_<device>.json and .md.
"""

import argparse
import importlib.util
import io
import json
import os
import pathlib
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).parent.parent


def load_config(name: str):
  spec = importlib.util.spec_from_file_location("cfg", ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def photo_like(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
  image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
  noise = rng.integers(-12, 13, (height, width, 3))
  return np.clip(np.asarray(image, np.int32) + noise, 0, 255).astype(np.uint8)


def write_folder(root: pathlib.Path, count: int, height: int, width: int, classes: int = 10):
  rng = np.random.default_rng(0)
  for i in range(count):
    folder = root / f"class{i % classes:02d}"
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(photo_like(rng, height, width)).save(buffer, format="JPEG", quality=90)
    (folder / f"{i:06d}.jpg").write_bytes(buffer.getvalue())


def time_loader(config, batches: int) -> float:
  """images/s of make_loader over `batches` batches after the first."""
  from hdit_jax.data.pipeline import make_loader  # pylint: disable=import-outside-toplevel
  loader, _ = make_loader(config, seed=0)
  iterator = iter(loader)
  next(iterator)
  start = time.perf_counter()
  count = sum(len(next(iterator)["label"]) for _ in range(batches))
  return count / (time.perf_counter() - start)


def source_config(source: str, name: str, size: int, batch: int):
  config = load_config("quickstart")
  config.data.update(source=source, name=name, image_size=size, batch_size=batch,
                     augment_prob=0.0, hflip=True)
  config.model.input_channels = 1 if source == "embedded" else 3
  return config


def loader_table(sources: list[tuple[str, str, str, int, int]], settings, batches: int):
  rows = []
  for label, source, name, size, batch in sources:
    for workers, threads, buffer in settings:
      config = source_config(source, name, size, batch)
      config.data.update(num_workers=workers, read_threads=threads, prefetch_buffer=buffer)
      rate = time_loader(config, batches)
      row = {"source": label, "image_size": size, "batch": batch, "workers": workers,
             "read_threads": threads, "prefetch_buffer": buffer, "images_per_s": rate}
      print(json.dumps(row), flush=True)
      rows.append(row)
  return rows


def train_rate(config, workdir: str, steps: int) -> dict:
  """images/s that the training loop logs (the median of its log intervals after the first)."""
  from hdit_jax.training import trainer  # pylint: disable=import-outside-toplevel
  config.training.update(num_steps=steps, log_every=max(steps // 6, 1), checkpoint_every=10**9,
                         sample_every=0, keep_every=0)
  config.evaluation.metric = ""
  trainer.train(config, workdir)
  logged = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  rates = [m["images_per_second"] for m in logged[1:]] or [logged[-1]["images_per_second"]]
  return {"images_per_s": float(np.median(rates)), "steps": steps}


def main():
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.FLAGS.mark_as_parsed()   # grain's worker processes read absl flags
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default="benchmarks/results")
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--with_step", action="store_true")
  parser.add_argument("--workers", default="0,4,8")
  args = parser.parse_args()
  import jax  # pylint: disable=import-outside-toplevel
  from hdit_jax.data import prepare  # pylint: disable=import-outside-toplevel

  tmp = pathlib.Path(tempfile.mkdtemp())
  count, big = (64, 8) if args.quick else (2048, 256)
  write_folder(tmp / "jpeg500", count, 375, 500)
  write_folder(tmp / "jpeg1024", big, 1024, 1024)
  processes = os.cpu_count() or 1
  prepare.prepare(prepare.Settings(input=str(tmp / "jpeg500"), image_size=256),
                  str(tmp / "prepared256"), processes=processes)
  prepare.prepare(prepare.Settings(input=str(tmp / "jpeg1024"), image_size=1024, shards=4),
                  str(tmp / "prepared1024"), processes=processes)
  sources = [("embedded digits", "embedded", "mnist", 28, 64),
             ("JPEG folder 500x375 -> 256", "folder", str(tmp / "jpeg500"), 256, 64),
             ("prepared 256 (PNG)", "prepared", str(tmp / "prepared256"), 256, 64),
             ("prepared 1024 (PNG)", "prepared", str(tmp / "prepared1024"), 1024, 16)]
  workers = [int(w) for w in args.workers.split(",")]
  settings = [(w, 8, 128) for w in workers] + [(0, 16, 500), (0, 1, 64)]
  batches = 3 if args.quick else 20
  result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "host_cpus": os.cpu_count(), "batches": batches,
            "loader": loader_table(sources, settings, batches)}
  if args.with_step:
    quick = load_config("quickstart")
    quick.data.update(num_workers=0, batch_size=64)
    result["with_step"] = {"quickstart, embedded digits, batch 64":
                           train_rate(quick, str(tmp / "run_quick"), 30 if args.quick else 300)}
    if not args.quick:
      big_model = load_config("imagenet256")
      big_model.data.update(source="prepared", name=str(tmp / "prepared256"), batch_size=64,
                            num_workers=8)
      big_model.model.num_classes = 1000
      result["with_step"]["imagenet256 (557M), prepared 256, batch 64, 8 workers"] = train_rate(
          big_model, str(tmp / "run_557m"), 60)
    print(json.dumps(result["with_step"]), flush=True)
  name = result["device"].replace(" ", "_")
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, f"loader_throughput_{name}.json"), "w") as f:
    json.dump(result, f, indent=1)
  text = markdown(result)
  with open(os.path.join(args.out, f"loader_throughput_{name}.md"), "w") as f:
    f.write(text)
  print(text)


def markdown(result: dict) -> str:
  lines = [f"# Input pipeline: {result['device']} host ({result['host_cpus']} CPUs), "
           f"jax {result['jax']}", "",
           f"`make_loader` alone, images/s per host over {result['batches']} batches after the "
           "first:", "",
           "| source | size | batch | workers | read threads | read-ahead | images/s |",
           "|---|---|---|---|---|---|---|"]
  for r in result["loader"]:
    lines.append(f"| {r['source']} | {r['image_size']} | {r['batch']} | {r['workers']} | "
                 f"{r['read_threads']} | {r['prefetch_buffer']} | {r['images_per_s']:.0f} |")
  if "with_step" in result:
    lines += ["", "Loader + train step (the training loop's logged images/s):", "",
              "| run | steps | images/s |", "|---|---|---|"]
    for name, r in result["with_step"].items():
      lines.append(f"| {name} | {r['steps']} | {r['images_per_s']:.0f} |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
