"""Many images in batches over every device of every host, delivered to each host as uint8."""

from typing import Any, Iterator, Sequence

import jax
import numpy as np
import tqdm
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from hdit_jax.sampling import generate as generate_lib
from hdit_jax.sampling.grid import to_uint8


def default_batch_size(config: Any, shards: int) -> int:
  """config.sampling.batch_size (0: 64) rounded up to a multiple of the batch shards."""
  size = int(config.sampling.get("batch_size", 0) or 64)
  return -(-max(size, shards) // shards) * shards


def draw_labels(config: Any, num_images: int, seed: int,
                labels: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
  """The label of every image of a run: `labels` repeated to num_images, or drawn per image
  (zeros for an unconditional model)."""
  num_classes = int(config.model.get("num_classes", 0))
  if not num_classes:
    if labels is not None and len(labels):
      raise ValueError("labels were given, but the model is unconditional")
    return np.zeros(num_images, np.int32)
  if labels is not None and len(labels):
    labels = np.resize(np.asarray(labels, np.int32), num_images)
    if labels.min() < 0 or labels.max() > num_classes:
      raise ValueError(f"labels must be in [0, {num_classes}] ({num_classes}: the null class)")
    return labels
  return generate_lib.random_labels(jax.random.key(seed), num_classes, 0, num_images)


def sample_batches(model: nnx.Module, config: Any, num_images: int, seed: int, *,
                   labels: Sequence[int] | np.ndarray | None = None, batch_size: int = 0,
                   image_size: tuple[int, int] | None = None, mesh: Mesh | None = None,
                   batch_axes: Sequence[str] | None = None,
                   settings: generate_lib.SamplerSettings | None = None,
                   progress: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields (images uint8 [b, H, W, C], labels int32 [b]) for images 0 .. num_images - 1 of the
  run `seed`, on every host, in order. Every host must iterate (the batches span all hosts)."""
  if num_images < 1:
    raise ValueError(f"num_images must be at least 1, got {num_images}")
  if batch_size < 0:
    raise ValueError(f"batch_size must be at least 1 (or 0: the default), got {batch_size}")
  mesh = mesh or generate_lib.default_mesh()
  shards = generate_lib.batch_shards(mesh, batch_axes)
  batch_size = default_batch_size(config, shards) if not batch_size else (
      -(-batch_size // shards) * shards)
  settings = settings or generate_lib.SamplerSettings.from_config(config)
  all_labels = draw_labels(config, num_images, seed, labels)
  conditional = bool(config.model.get("num_classes", 0))
  key = jax.random.key(seed)
  bar = tqdm.tqdm(total=num_images, desc="sampling", unit="img", dynamic_ncols=True,
                  disable=not progress or jax.process_index() != 0)
  with bar:
    for start in range(0, num_images, batch_size):
      count = min(batch_size, num_images - start)
      batch_labels = all_labels[start:start + count]
      # A short last batch is drawn full size (the extra images are dropped): one compiled
      # sampler serves the whole run.
      padded = np.pad(batch_labels, (0, batch_size - count))
      images = generate_lib.generate(
          model, config, key, batch_size, padded if conditional else None, start=start,
          image_size=image_size, mesh=mesh, batch_axes=batch_axes, settings=settings)
      images = multihost_utils.process_allgather(images, tiled=True)[:count]
      bar.update(count)
      yield to_uint8(np.asarray(images)), batch_labels


def sample_images(model: nnx.Module, config: Any, num_images: int, seed: int,
                  **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
  """All images of `sample_batches` at once: (uint8 [N, H, W, C], labels [N])."""
  images, labels = zip(*sample_batches(model, config, num_images, seed, **kwargs))
  return np.concatenate(images), np.concatenate(labels)
