"""An image folder -> array_record shards that every training host reads (local or gs://).

The output is a tfds dataset directory: shards `prepared-SPLIT.array_record-0000i-of-0000n`,
`dataset_info.json` (shard lengths), `features.json` and `label.labels.txt` (the class names),
plus `preparation.json` (the input, the preprocessing, the counts and every skipped file).
tfds's format is used, and not bare records, because any tfds or grain reader then opens the
shards with their labels and class names, without TensorFlow and without code from here.

Preparation is resumable: a shard is written under a temporary name and moved into place
whole, and its record (`.parts/SPLIT/shard-0000i.json`) is written after it; a rerun with the
same settings writes only the shards without a record. The metadata comes last, so a
directory with `dataset_info.json` is complete.
"""

import dataclasses
import io
import json
import multiprocessing
import os
import shutil
import tempfile
from typing import Any, Iterator

import numpy as np
from etils import epath
from PIL import Image, UnidentifiedImageError

from hdit_jax.data import sources, transforms

DATASET_NAME = "prepared"
VERSION = "1.0.0"
FILENAME_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
ENCODINGS = ("png", "jpeg")
IMAGES_PER_SHARD = 10_000


class PreparationError(ValueError):
  """Input or output that cannot be prepared; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Settings:
  """What decides the bytes of a prepared split (a rerun must match them to resume)."""
  input: str
  split: str = "train"
  image_size: int = 0          # 0: keep each image's size
  channels: int = 3
  encoding: str = "png"
  jpeg_quality: int = 95
  shards: int = 0              # 0: one per IMAGES_PER_SHARD images

  def check(self) -> None:
    if self.encoding not in ENCODINGS:
      raise PreparationError(f"--encoding must be one of {ENCODINGS}, got {self.encoding!r}")
    if self.channels not in (1, 3):
      raise PreparationError(f"--channels must be 1 or 3, got {self.channels}")
    if self.image_size < 0:
      raise PreparationError(f"--image_size must be positive (or 0: keep each image's size), "
                             f"got {self.image_size}")
    if self.shards < 0:
      raise PreparationError(f"--shards must be positive (or 0: one per {IMAGES_PER_SHARD} "
                             f"images), got {self.shards}")
    if not 1 <= self.jpeg_quality <= 100:
      raise PreparationError(f"--jpeg_quality must be in 1..100, got {self.jpeg_quality}")


def features_of(settings: Settings, class_names: list[str]) -> Any:
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  side = settings.image_size or None
  feature = {"image": tfds.features.Image(shape=(side, side, settings.channels),
                                          encoding_format=settings.encoding)}
  if class_names:
    feature["label"] = tfds.features.ClassLabel(names=class_names)
  return tfds.features.FeaturesDict(feature)


def shard_path(output: epath.Path, split: str, shard: int, num_shards: int) -> epath.Path:
  return output / f"{DATASET_NAME}-{split}.array_record-{shard:05d}-of-{num_shards:05d}"


def _record_path(output: epath.Path, split: str, shard: int) -> epath.Path:
  return output / ".parts" / split / f"shard-{shard:05d}.json"


def _encode(image: np.ndarray, settings: Settings) -> bytes:
  buffer = io.BytesIO()
  pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  if settings.encoding == "jpeg":
    pil.save(buffer, format="JPEG", quality=settings.jpeg_quality)
  else:
    pil.save(buffer, format="PNG")
  return buffer.getvalue()


def _place(local: str, target: epath.Path) -> None:
  """Move a finished local file to `target` whole: a rename, or one upload to gs://."""
  if "://" not in os.fspath(target):
    tmp = f"{os.fspath(target)}.tmp-{os.getpid()}"
    shutil.move(local, tmp)
    os.replace(tmp, os.fspath(target))
  else:
    with open(local, "rb") as src, target.open("wb") as dst:
      shutil.copyfileobj(src, dst, 16 << 20)
    os.remove(local)


def write_shard(task: tuple[Settings, list[str], list[tuple[str, int]], str, int, int]
                ) -> dict[str, Any]:
  """Decode, fit, encode and write one shard's images; returns its record."""
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  settings, class_names, files, output, shard, num_shards = task
  output_path = epath.Path(output)
  features = features_of(settings, class_names)
  count, skipped = 0, []
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, "shard")
    writer = array_record_module.ArrayRecordWriter(local, "group_size:1")
    for path, label in files:
      try:
        image = sources.decode_image(path, settings.channels)
        if settings.image_size:
          image = transforms.resize_center_crop(image, settings.image_size)
      except UnidentifiedImageError:
        skipped.append([path, "not an image that Pillow can read"])
        continue
      except Exception as e:  # pylint: disable=broad-except
        skipped.append([path, f"{type(e).__name__}: {e}"])
        continue
      example = {"image": _encode(image, settings)}
      if class_names:
        example["label"] = label
      writer.write(features.serialize_example(example))
      count += 1
    writer.close()
    num_bytes = os.path.getsize(local)
    _place(local, shard_path(output_path, settings.split, shard, num_shards))
  record = {"shard": shard, "count": count, "num_bytes": num_bytes, "skipped": skipped}
  record_path = _record_path(output_path, settings.split, shard)
  record_path.parent.mkdir(parents=True, exist_ok=True)
  record_path.write_text(json.dumps(record))
  return record


def _settings_record(settings: Settings, class_names: list[str], num_files: int,
                     num_shards: int) -> dict[str, Any]:
  return {**dataclasses.asdict(settings), "class_names": class_names, "num_files": num_files,
          "num_shards": num_shards}


def _done(output: epath.Path, split: str, shard: int, num_shards: int) -> dict[str, Any] | None:
  """A shard's record, if the shard is there as recorded (else it is written again)."""
  record_path = _record_path(output, split, shard)
  if not record_path.exists():
    return None
  record = json.loads(record_path.read_text())
  written = shard_path(output, split, shard, num_shards)
  if not written.exists() or written.stat().length != record["num_bytes"]:
    return None
  return record


def _local_path(path: str) -> str:
  """Local paths absolute and normalised (so that `raw`, `./raw/` and `/abs/raw` are one input);
  URLs as given."""
  return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def _check_output(output: str, settings: Settings) -> epath.Path:
  out = epath.Path(output)
  if out.exists() and not out.is_dir():
    raise PreparationError(f"--output={output} is a file: give a directory")
  if "://" not in output and "://" not in settings.input and (
      output == settings.input or output.startswith(settings.input.rstrip("/") + "/")):
    raise PreparationError(f"--output={output} is inside --input={settings.input}: it would be "
                           "read as images (or a class) next time; put it elsewhere")
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise PreparationError(f"cannot create --output={output}: {e}") from None
  return out


def _check_resumable(output: epath.Path, expected: dict[str, Any]) -> None:
  parts = output / ".parts"
  for other in (parts.iterdir() if parts.exists() else ()):
    found = other / "settings.json"
    if other.name != expected["split"] and found.exists() and (
        json.loads(found.read_text())["class_names"] != expected["class_names"]):
      raise PreparationError(
          f"{output} holds a split {other.name!r} with other classes than this input's "
          f"{len(expected['class_names'])} ({expected['input']}); a dataset's splits "
          "share their classes: prepare this one into another --output")
  path = parts / expected["split"] / "settings.json"
  if path.exists():
    found = json.loads(path.read_text())
    changed = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
    if changed:
      raise PreparationError(
          f"{output} holds a split {expected['split']!r} prepared from other input or with "
          f"other settings (differing: {', '.join(changed)}); rerun with the same flags to "
          "resume, or choose another --output")
  else:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(expected))


def _write_metadata(output: epath.Path, settings: Settings, class_names: list[str],
                    records: list[dict[str, Any]]) -> None:
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  splits = []
  for split_dir in sorted((output / ".parts").iterdir()):   # every finished split of `output`
    split_settings = json.loads((split_dir / "settings.json").read_text())
    if split_dir.name == settings.split:
      lengths = [r["count"] for r in records]
    else:
      found = [json.loads(p.read_text()) for p in sorted(split_dir.glob("shard-*.json"))]
      if len(found) != split_settings["num_shards"]:
        continue   # another split still being prepared: its own finish writes it in
      if split_settings["class_names"] != class_names:
        raise PreparationError(f"split {split_dir.name!r} in {output} has other classes than "
                               f"{settings.split!r}; prepare them into separate outputs")
      lengths = [r["count"] for r in found]
    splits.append(tfds.core.SplitInfo(
        name=split_dir.name, shard_lengths=lengths, num_bytes=0,
        filename_template=tfds.core.ShardedFileTemplate(
            data_dir=os.fspath(output), template=FILENAME_TEMPLATE, dataset_name=DATASET_NAME,
            split=split_dir.name, filetype_suffix="array_record")))
  # check_data=False: tfds's check reads the shards through tf.data, which needs TensorFlow.
  tfds.folder_dataset.write_metadata(
      data_dir=os.fspath(output), features=features_of(settings, class_names),
      split_infos=splits, filename_template=FILENAME_TEMPLATE, check_data=False,
      version=VERSION, description=f"Images of {settings.input}, by hdit_jax.prepare_data")


def _update_preparation(output: epath.Path, settings: Settings, class_names: list[str],
                        num_files: int, records: list[dict[str, Any]]) -> dict[str, Any]:
  path = output / sources.PREPARATION_FILE
  summary = json.loads(path.read_text()) if path.exists() else {"splits": {}}
  skipped = [s for r in records for s in r["skipped"]]
  summary["splits"][settings.split] = {
      **dataclasses.asdict(settings), "num_files": num_files,
      "num_images": sum(r["count"] for r in records), "num_shards": len(records),
      "num_skipped": len(skipped), "skipped": skipped}
  summary["class_names"] = class_names
  path.write_text(json.dumps(summary, indent=1))
  return summary["splits"][settings.split]


def prepare(settings: Settings, output: str, processes: int = 1,
            progress: Any = None) -> dict[str, Any]:
  """Prepare `settings.input` into `output`; returns the split's summary (counts, skipped).

  `progress(done_records)` is called as shards finish. Raises PreparationError for input or
  output that cannot be used.
  """
  settings.check()
  settings = dataclasses.replace(settings, input=_local_path(settings.input))
  output = _local_path(output)
  try:
    files, class_names = sources.list_image_folder(settings.input)
  except (FileNotFoundError, ValueError) as e:
    raise PreparationError(str(e)) from None
  num_shards = settings.shards or max(1, -(-len(files) // IMAGES_PER_SHARD))
  if num_shards > len(files):
    raise PreparationError(f"--shards={num_shards} is more than the {len(files)} image files "
                           f"found: use at most {len(files)} (or 0: automatic)")
  out = _check_output(output, settings)
  _check_resumable(out, _settings_record(settings, class_names, len(files), num_shards))
  done = {s: r for s in range(num_shards)
          if (r := _done(out, settings.split, s, num_shards)) is not None}
  # Shard s holds every num_shards-th file from s: classes spread over all shards.
  tasks = [(settings, class_names, files[s::num_shards], output, s, num_shards)
           for s in range(num_shards) if s not in done]
  if progress:
    progress(list(done.values()))
  for record in _map(write_shard, tasks, processes):
    done[record["shard"]] = record
    if progress:
      progress([record])
  records = [done[s] for s in range(num_shards)]
  _write_metadata(out, settings, class_names, records)
  return _update_preparation(out, settings, class_names, len(files), records)


def _map(function, tasks: list, processes: int) -> Iterator:
  if processes <= 1 or len(tasks) <= 1:
    yield from map(function, tasks)
    return
  # spawn: forked children would share gcsfs's event loop thread with the parent.
  with multiprocessing.get_context("spawn").Pool(min(processes, len(tasks))) as pool:
    yield from pool.imap_unordered(function, tasks)
