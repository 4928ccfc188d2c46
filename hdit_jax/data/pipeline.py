"""The grain input pipeline: shuffled, sharded per host, deterministic given a seed, resumable.

Each host reads its own share of the records (ShardByJaxProcess) and batches its part of the
global batch; the iterator's state is saved with every checkpoint.
"""

from typing import Any

import grain
import jax
import numpy as np

from hdit_jax.data import augment as augment_lib
from hdit_jax.data import sources, transforms


class _Preprocess(grain.transforms.RandomMap):
  """Decoded uint8 image -> float image in [-1, 1], optional x-flip and augmentation."""

  def __init__(self, augment_prob: float, hflip: bool, with_aug_cond: bool):
    self.augment_prob, self.hflip, self.with_aug_cond = augment_prob, hflip, with_aug_cond

  def random_map(self, element, rng: np.random.Generator):
    image = transforms.to_model_range(element["image"])
    if self.hflip and rng.random() < 0.5:
      image = image[:, ::-1]
    image, aug_cond = augment_lib.augment(image, rng, self.augment_prob)
    out = {"image": np.ascontiguousarray(image, np.float32), "label": element["label"]}
    if self.with_aug_cond:
      out["aug_cond"] = aug_cond
    return out


def per_host_batch_size(global_batch: int) -> int:
  if global_batch % jax.process_count():
    raise ValueError(f"data.batch_size {global_batch} is not divisible by the "
                     f"{jax.process_count()} hosts")
  return global_batch // jax.process_count()


def make_loader(config: Any, seed: int, *, num_epochs: int | None = None,
                shuffle: bool = True) -> tuple[grain.DataLoader, int]:
  """(DataLoader yielding per-host batches {'image', 'label', 'aug_cond'?}, num_classes)."""
  data = config.data
  source = sources.decoded_source(data, config.model)
  loader = grain.DataLoader(
      data_source=source,
      sampler=grain.samplers.IndexSampler(
          num_records=len(source), shard_options=grain.sharding.ShardByJaxProcess(
              drop_remainder=True), shuffle=shuffle, num_epochs=num_epochs, seed=seed),
      operations=[_Preprocess(float(data.augment_prob), bool(data.hflip),
                              float(data.augment_prob) > 0),
                  grain.transforms.Batch(per_host_batch_size(int(data.batch_size)),
                                         drop_remainder=True)],
      worker_count=int(data.num_workers))
  return loader, int(getattr(source.source, "num_classes", 0))
