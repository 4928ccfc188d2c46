"""Sample quality of a model under `config.evaluation`, during training or from a checkpoint.

Samples are drawn over the given mesh (the training mesh: every device of every host, from the
sharded EMA weights) and scored as they come, so 50,000 images never sit in memory at once:
- `fid`: Inception-v3 pool3 features (pytorch-fid's network and preprocessing), then FID, KID and
  optionally precision/recall against the reference (`evaluation.reference`, or the training
  data, whose features are computed once and kept in the workdir);
- `digits`: the digit classifier's Fréchet distance and class accuracy (`digits.py`), for the
  embedded MNIST.
"""

import dataclasses
import os
from typing import Any, Iterable, Iterator, Sequence

import jax
import numpy as np
import tqdm
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from PIL import Image

from hdit_jax.data import sources
from hdit_jax.evaluation import digits, inputs, metrics
from hdit_jax.evaluation.inception import InceptionFeatures, load_inception
from hdit_jax.sampling.batches import sample_batches
from hdit_jax.sampling.generate import SamplerSettings

REFERENCE_FILE = "eval_reference_features.npz"


def evaluation_settings(config: Any) -> SamplerSettings:
  """The sampler settings of `config.evaluation` (a ValueError names a bad one)."""
  e = config.evaluation
  try:
    settings = SamplerSettings.from_config(config, sampler=e.sampler, steps=int(e.steps),
                                           eta=float(e.eta),
                                           guidance_scale=float(e.guidance_scale))
    interval = tuple(float(v) for v in e.guidance_interval) or None
    return dataclasses.replace(settings, guidance_interval=interval)
  except ValueError as err:
    raise ValueError(f"evaluation: {err}") from err


def host_share_features(extract: InceptionFeatures, images: np.ndarray) -> np.ndarray:
  """Features of a batch that every host holds: each host computes its share, all get all."""
  hosts, index = jax.process_count(), jax.process_index()
  if hosts == 1 or len(images) % hosts:
    return extract(images)
  share = len(images) // hosts
  local = extract(images[index * share:(index + 1) * share])
  return np.asarray(multihost_utils.process_allgather(local, tiled=False)).reshape(
      (len(images), -1))


def features_of(extract: InceptionFeatures, batches: Iterable[np.ndarray],
                total: int | None = None) -> np.ndarray:
  """Features [N, 2048] of uint8 batches, with a progress bar over `total` images (host 0)."""
  bar = tqdm.tqdm(total=total, desc="Inception features", unit="img", dynamic_ncols=True,
                  disable=jax.process_index() != 0)
  with bar:
    out = []
    for images in batches:
      out.append(host_share_features(extract, images))
      bar.update(len(images))
  return np.concatenate(out)


def digit_images(images: np.ndarray) -> np.ndarray:
  """Any uint8 [N, H, W, C] digits -> [N, 28, 28, 1]: RGB to grey; a small border (digits padded
  to 32x32, say) is cropped from the centre, larger images are area-resized."""
  if images.shape[-1] == 3:
    images = np.round(images.astype(np.float32).mean(-1, keepdims=True)).astype(np.uint8)
  h, w = images.shape[1:3]
  if (h, w) == (28, 28):
    return images
  if 28 <= h <= 40 and 28 <= w <= 40:
    top, left = (h - 28) // 2, (w - 28) // 2
    return images[:, top:top + 28, left:left + 28]
  return np.stack([np.asarray(Image.fromarray(im[..., 0]).resize((28, 28), Image.Resampling.BOX))
                   for im in images])[..., None]


class Evaluator:
  """evaluator(model) -> {metric name: value} for `config.evaluation` (every host calls it)."""

  def __init__(self, config: Any, workdir: str, mesh: Mesh | None = None,
               batch_axes: Sequence[str] | None = None):
    self.config, self.workdir = config, workdir
    self.mesh, self.batch_axes = mesh, batch_axes
    e = config.evaluation
    self.metric, self.num_samples = e.metric, int(e.num_samples)
    self.settings = evaluation_settings(config)
    self.conditional = bool(config.model.get("num_classes", 0))
    if self.metric == "digits":
      self._classifier = digits.load_or_train(workdir)
    elif self.metric == "fid":
      self._inception = InceptionFeatures(load_inception(e.inception_weights))
      self._reference = self._load_reference()
    else:
      raise ValueError(f"evaluation.metric must be 'fid' or 'digits', got {self.metric!r}")

  def _samples(self, model: nnx.Module) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    e = self.config.evaluation
    return sample_batches(model, self.config, self.num_samples, int(e.seed),
                          batch_size=int(e.batch_size), mesh=self.mesh,
                          batch_axes=self.batch_axes, settings=self.settings)

  def __call__(self, model: nnx.Module) -> dict[str, float]:
    if self.metric == "digits":
      images, labels = zip(*self._samples(model))
      images = digit_images(np.concatenate(images))
      return digits.digit_metrics(self._classifier, images,
                                  np.concatenate(labels) if self.conditional else None)
    features = features_of(self._inception, (images for images, _ in self._samples(model)),
                           self.num_samples)
    return self._inception_metrics(features)

  def _inception_metrics(self, features: np.ndarray) -> dict[str, float]:
    e, reference = self.config.evaluation, self._reference
    if reference.features is None:
      mu, sigma = metrics.statistics(features)
      return {"fid": metrics.frechet_distance(reference.mu, reference.sigma, mu, sigma)}
    return metrics.all_metrics(reference.features, features, kid=bool(e.kid),
                               precision_recall=bool(e.precision_recall))

  def _load_reference(self) -> inputs.FeatureSet:
    """evaluation.reference, or the training data's features (computed once, kept)."""
    e = self.config.evaluation
    if e.reference:
      found = inputs.read_set(e.reference)
      if isinstance(found, inputs.ImageSet):
        feats = features_of(self._inception, found.batches(self._batch_size()),
                            found.num_images)
        found = inputs.FeatureSet(e.reference, features=feats)
      return found
    cached = os.path.join(self.workdir, REFERENCE_FILE)
    if epath.Path(cached).exists():
      return inputs.read_set(cached)
    feats = features_of(self._inception, self._data_batches(int(e.reference_images)),
                        int(e.reference_images))
    if jax.process_index() == 0:
      inputs.save_features(cached, feats)
    logging.info("reference: Inception features of %d training images, kept in %s", len(feats),
                 cached)
    return inputs.FeatureSet(cached, features=feats)

  def _batch_size(self) -> int:
    size = int(self.config.evaluation.batch_size or self.config.sampling.batch_size or 64)
    return -(-size // jax.process_count()) * jax.process_count()

  def _data_batches(self, count: int) -> Iterator[np.ndarray]:
    """`count` training images (a fixed random subset), fitted to size as for training."""
    source = sources.decoded_source(self.config.data, self.config.model)
    order = np.random.default_rng(0).permutation(len(source))[:count]
    batch = self._batch_size()
    for start in range(0, len(order), batch):
      yield np.stack([source[int(i)]["image"] for i in order[start:start + batch]])
