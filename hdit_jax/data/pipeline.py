"""The grain input pipeline: shuffled, sharded per host, deterministic given a seed, resumable.

Each host reads its own share of the records (ShardByJaxProcess) and batches its part of the
global batch; the iterator's state is saved with every checkpoint. Without augmentation the
batches stay uint8 (a quarter of the bytes to copy to the device; the train step scales them to
[-1, 1]); the augmentation pipeline resamples in float32.
"""

from typing import Any

import grain
import jax
import numpy as np

from hdit_jax.data import augment as augment_lib
from hdit_jax.data import sources, transforms


class _Preprocess(grain.transforms.RandomMap):
  """Decoded uint8 image -> optional x-flip, then with augmentation a float32 image in [-1, 1]
  and its aug_cond; without, the uint8 image as it is."""

  def __init__(self, augment_prob: float, hflip: bool):
    self.augment_prob, self.hflip = augment_prob, hflip

  def random_map(self, element, rng: np.random.Generator):
    image = element["image"]
    if self.hflip and rng.random() < 0.5:
      image = image[:, ::-1]
    kept = {"label": element["label"], "replaced": element["replaced"]}
    if self.augment_prob <= 0:
      return {"image": np.ascontiguousarray(image), **kept}
    image, aug_cond = augment_lib.augment(transforms.to_model_range(image), rng,
                                          self.augment_prob)
    return {"image": np.ascontiguousarray(image, np.float32), "aug_cond": aug_cond, **kept}


def per_host_batch_size(global_batch: int) -> int:
  if global_batch % jax.process_count():
    raise ValueError(f"data.batch_size {global_batch} is not divisible by the "
                     f"{jax.process_count()} hosts")
  return global_batch // jax.process_count()


def make_loader(config: Any, seed: int, *, num_epochs: int | None = None,
                shuffle: bool = True) -> tuple[grain.DataLoader, int]:
  """(DataLoader yielding per-host batches {'image', 'label', 'replaced', 'aug_cond'?},
  num_classes); `replaced` counts the unreadable records each record stands in for."""
  data = config.data
  source = sources.decoded_source(data, config.model)
  loader = grain.DataLoader(
      data_source=source,
      sampler=grain.samplers.IndexSampler(
          num_records=len(source), shard_options=grain.sharding.ShardByJaxProcess(
              drop_remainder=True), shuffle=shuffle, num_epochs=num_epochs, seed=seed),
      operations=[_Preprocess(float(data.augment_prob), bool(data.hflip)),
                  grain.transforms.Batch(per_host_batch_size(int(data.batch_size)),
                                         drop_remainder=True)],
      worker_count=int(data.num_workers),
      # grain's default read-ahead of 500 records costs a scan of it per record (most of the
      # loader's time for small images; benchmarks/loader_throughput.py measures it).
      read_options=grain.ReadOptions(num_threads=int(data.read_threads),
                                     prefetch_buffer_size=int(data.prefetch_buffer)))
  return loader, int(getattr(source.source, "num_classes", 0))
