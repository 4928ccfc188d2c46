"""Prepare an image folder as array_record shards for training (local or gs://).

  python -m hdit_jax.prepare_data --input=/data/imagenet/train --output=gs://BUCKET/imagenet256 \\
      --image_size=256 --processes=32

The input is ImageNet's train layout (one folder per class), FFHQ's flat folder (unlabelled),
or any such tree. With --image_size each image is resized (shorter side) and centre-cropped
once here, so that training hosts never decode full-size JPEGs. Train from the result with
`--config.data.source=prepared --config.data.name=OUTPUT`. Unreadable images are skipped and
listed in OUTPUT/preparation.json; an interrupted run resumes where it stopped when rerun.
"""

import sys

from absl import app, flags
from tqdm import tqdm

from hdit_jax.data import prepare

_INPUT = flags.DEFINE_string("input", None, "Image folder (local or gs://).")
_OUTPUT = flags.DEFINE_string("output", None, "Output dataset directory (local or gs://).")
_SPLIT = flags.DEFINE_string("split", "train", "Split name of this input.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 0, "Resize and centre-crop to this square "
                                   "size (0: keep every image's size).")
_CHANNELS = flags.DEFINE_integer("channels", 3, "3: RGB, 1: grayscale.")
_ENCODING = flags.DEFINE_enum("encoding", "png", list(prepare.ENCODINGS),
                              "How images are stored: png (lossless) or jpeg.")
_JPEG_QUALITY = flags.DEFINE_integer("jpeg_quality", 95, "JPEG quality with --encoding=jpeg.")
_SHARDS = flags.DEFINE_integer("shards", 0, "Number of shards (0: one per "
                               f"{prepare.IMAGES_PER_SHARD} images).")
_PROCESSES = flags.DEFINE_integer("processes", 1, "Shards written in parallel.")


def main(argv: list[str]) -> None:
  if len(argv) > 1 or not _INPUT.value or not _OUTPUT.value:
    print("error: usage: python -m hdit_jax.prepare_data --input=IMAGE_FOLDER --output=DIR "
          "[--image_size=N] ... (--help for all flags)"
          + (f"; unexpected arguments: {' '.join(argv[1:])}" if len(argv) > 1 else ""),
          file=sys.stderr)
    sys.exit(2)
  settings = prepare.Settings(
      input=_INPUT.value, split=_SPLIT.value, image_size=_IMAGE_SIZE.value,
      channels=_CHANNELS.value, encoding=_ENCODING.value, jpeg_quality=_JPEG_QUALITY.value,
      shards=_SHARDS.value)
  bars = []   # made at the first progress: after the input and output are checked

  def progress(records):
    if not bars:
      bars.append(tqdm(unit="img", desc=f"preparing {settings.split}", file=sys.stderr))
    bars[0].update(sum(r["count"] + len(r["skipped"]) for r in records))

  try:
    summary = prepare.prepare(settings, _OUTPUT.value, processes=_PROCESSES.value,
                              progress=progress)
  except prepare.PreparationError as e:
    for bar in bars:
      bar.close()
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  for bar in bars:
    bar.close()
  for path, reason in summary["skipped"][:10]:
    print(f"skipped {path}: {reason}", file=sys.stderr)
  if summary["num_skipped"] > 10:
    print(f"... and {summary['num_skipped'] - 10} more", file=sys.stderr)
  print(f"prepared {summary['num_images']} images of {summary['num_files']} "
        f"({summary['num_skipped']} unreadable, skipped) into {summary['num_shards']} "
        f"shard{'s' if summary['num_shards'] > 1 else ''}: "
        f"{_OUTPUT.value} (split {settings.split!r}); train with "
        f"--config.data.source=prepared --config.data.name={_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
