"""The grain input pipeline: shuffled, sharded per host, deterministic given a seed, resumable.

Every host reads its rows of one global sequence of batches (GlobalBatchSampler), so the data a
run trains on does not depend on how many hosts it runs on; the iterator's state is saved with
every checkpoint. Without augmentation the batches stay uint8 (a quarter of the bytes to copy
to the device; the train step scales them to [-1, 1]); the augmentation pipeline resamples in
float32.
"""

import sys
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


class GlobalBatchSampler:
  """Host h of H reads rows [h b, (h + 1) b) of every global batch of B = H b records.

  The global sequence is that of one unsharded IndexSampler (shuffled per epoch, an rng per
  record), the same for any number of hosts and workers: 2 hosts train on what 1 host would.
  grain's DataLoader, sharded by process, asks host h for its k-th record as index k H + h;
  worker w of W reads the host's records w, w + W, ... and batches them, and the loader takes
  the workers' batches in turn. With a finite number of records (`limit`) the batches past the
  last complete round of W global batches are dropped, on every host alike (a host that read on
  alone would wait for the others forever).
  """

  def __init__(self, inner: grain.samplers.IndexSampler, global_batch: int, hosts: int,
               workers: int, limit: int | None):
    self.inner, self.global_batch, self.hosts = inner, global_batch, hosts
    self.workers, self.limit = max(workers, 1), limit
    self.per_host = global_batch // hosts
    self.num_batches = (None if limit is None else
                        limit // global_batch // self.workers * self.workers)

  def __getitem__(self, index: int) -> grain.RecordMetadata:
    k, host = divmod(index, self.hosts)
    i, worker = divmod(k, self.workers)
    local_batch, row = divmod(i, self.per_host)
    step = local_batch * self.workers + worker
    if self.num_batches is not None and step >= self.num_batches:
      raise IndexError(f"index {index} is past the last complete global batch")
    record = self.inner[step * self.global_batch + host * self.per_host + row]
    return grain.RecordMetadata(index=index, record_key=record.record_key, rng=record.rng)

  def __len__(self) -> int:
    if self.num_batches is None:
      return sys.maxsize   # endless: as grain measures an IndexSampler without epochs
    return self.num_batches * self.global_batch

  def __repr__(self) -> str:   # grain checks it when an iterator's state is restored
    return (f"GlobalBatchSampler({self.inner!r}, global_batch={self.global_batch}, "
            f"hosts={self.hosts}, workers={self.workers}, limit={self.limit})")


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
  global_batch = int(data.batch_size)
  per_host = per_host_batch_size(global_batch)
  records = grain.samplers.IndexSampler(num_records=len(source), shuffle=shuffle,
                                        num_epochs=num_epochs, seed=seed)
  loader = grain.DataLoader(
      data_source=source,
      sampler=GlobalBatchSampler(records, global_batch, jax.process_count(),
                                 int(data.num_workers),
                                 None if num_epochs is None else num_epochs * len(source)),
      shard_options=grain.sharding.ShardByJaxProcess(),
      operations=[_Preprocess(float(data.augment_prob), bool(data.hflip)),
                  grain.transforms.Batch(per_host, drop_remainder=True)],
      worker_count=int(data.num_workers),
      # grain's default read-ahead of 500 records costs a scan of it per record (most of the
      # loader's time for small images; benchmarks/loader_throughput.py measures it).
      read_options=grain.ReadOptions(num_threads=int(data.read_threads),
                                     prefetch_buffer_size=int(data.prefetch_buffer)))
  return loader, int(getattr(source.source, "num_classes", 0))
