"""pytorch-fid's FID Inception-v3 (pool3, 2048 features) in Flax NNX, with its exact preprocessing.

The network is `pytorch_fid.inception.InceptionV3` (pytorch-fid 0.3.0) with
`use_fid_inception=True`, `resize_input=True`, `normalize_input=True` and output block 3: the
TF 2015-12-05 Inception graph, whose FID-specific blocks differ from torchvision's (average pools
that exclude padding; a max pool in `Mixed_7c`'s pool branch). Layout is NHWC throughout; module
attribute names are the PyTorch state-dict names, so loading the weight file is a rename
(`conv.weight` [O, I, kh, kw] -> `conv.kernel` [kh, kw, I, O]; `bn.weight/bias/running_mean/
running_var` -> `bn.scale/bias/mean/var`).

Preprocessing: uint8 -> x/255 -> bilinear resize to 299x299 with torch's
`F.interpolate(mode='bilinear', align_corners=False)` (no antialiasing, also when shrinking) ->
2x - 1. `jax.image.resize` antialiases when downsampling, so the resize here is two
interpolation-matrix products built in numpy by torch's source-index rule.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hdit_jax.evaluation.inception_weights import (CONVERT_CODE, CONVERT_COMMAND,
                                                   FID_WEIGHTS_URL, load_state_dict_into,
                                                   read_state_dict)

__all__ = ["CONVERT_CODE", "CONVERT_COMMAND", "FEATURE_DIM", "FID_WEIGHTS_URL", "INPUT_SIZE",
           "FIDInceptionV3", "InceptionFeatures", "bilinear_matrix", "load_inception",
           "preprocess", "resize_bilinear"]

INPUT_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


class Conv2d(nnx.Module):
  """Bias-free 2-D convolution, NHWC input, HWIO `kernel` (zeros until weights are loaded)."""

  def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
    kh, kw = _pair(kernel_size)
    self.kernel = nnx.Param(jnp.zeros((kh, kw, in_channels, out_channels), jnp.float32))
    self.stride = _pair(stride)
    self.padding = tuple((p, p) for p in _pair(padding))

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, self.kernel[...], self.stride, self.padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


class BatchNorm2d(nnx.Module):
  """Inference batch norm over the last axis with running statistics, eps 0.001 (TF's)."""

  def __init__(self, features: int):
    self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((features,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    gain = self.scale[...] * jax.lax.rsqrt(self.var[...] + BN_EPS)
    return (x - self.mean[...]) * gain + self.bias[...]


class BasicConv2d(nnx.Module):
  """conv (no bias) -> batch norm -> ReLU, torchvision's `BasicConv2d`."""

  def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
    self.conv = Conv2d(in_channels, out_channels, kernel_size, stride, padding)
    self.bn = BatchNorm2d(out_channels)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(self.bn(self.conv(x)))


def max_pool(x: jax.Array, stride: int, padding: int = 0) -> jax.Array:
  """3x3 max pool, floor mode; padding counts as -inf, as in torch."""
  pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), pad)


def avg_pool_exclude_pad(x: jax.Array) -> jax.Array:
  """3x3 stride-1 pad-1 average pool with count_include_pad=False (TF's average pool)."""
  pad = ((0, 0), (1, 1), (1, 1), (0, 0))
  window, strides = (1, 3, 3, 1), (1, 1, 1, 1)
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pad)
  ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
  count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, pad)
  return total / count


def _cat(*xs: jax.Array) -> jax.Array:
  return jnp.concatenate(xs, axis=-1)


class FIDInceptionA(nnx.Module):
  """Mixed_5b/c/d: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avgpool (excl. pad) -> 1x1."""

  def __init__(self, in_channels: int, pool_features: int):
    self.branch1x1 = BasicConv2d(in_channels, 64, 1)
    self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
    self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
    self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
    self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

  def __call__(self, x: jax.Array) -> jax.Array:
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return _cat(self.branch1x1(x), b5, b3, self.branch_pool(avg_pool_exclude_pad(x)))


class InceptionB(nnx.Module):
  """Mixed_6a (grid reduction): 3x3/2 | 1x1 -> 3x3 -> 3x3/2 | maxpool 3/2."""

  def __init__(self, in_channels: int):
    self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
    self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return _cat(self.branch3x3(x), b3, max_pool(x, 2))


class FIDInceptionC(nnx.Module):
  """Mixed_6b..e: factorised 7x7 branches (c7 channels inside) | avgpool (excl. pad) -> 1x1."""

  def __init__(self, in_channels: int, channels_7x7: int):
    c7 = channels_7x7
    self.branch1x1 = BasicConv2d(in_channels, 192, 1)
    self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
    self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
    self.branch_pool = BasicConv2d(in_channels, 192, 1)

  def __call__(self, x: jax.Array) -> jax.Array:
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                  self.branch7x7dbl_4, self.branch7x7dbl_5):
      bd = layer(bd)
    return _cat(self.branch1x1(x), b7, bd, self.branch_pool(avg_pool_exclude_pad(x)))


class InceptionD(nnx.Module):
  """Mixed_7a (grid reduction): 1x1 -> 3x3/2 | 1x1 -> 1x7 -> 7x1 -> 3x3/2 | maxpool 3/2."""

  def __init__(self, in_channels: int):
    self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
    self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
    self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
    self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return _cat(b3, b7, max_pool(x, 2))


class FIDInceptionE(nnx.Module):
  """Mixed_7b (`pool='avg'`, FIDInceptionE_1) and Mixed_7c (`pool='max'`, FIDInceptionE_2).

  1x1 | 1x1 -> [1x3, 3x1] | 1x1 -> 3x3 -> [1x3, 3x1] | pool 3x3/1 pad 1 -> 1x1. The TF graph
  has a max pool in Mixed_7c, which pytorch-fid reproduces.
  """

  def __init__(self, in_channels: int, pool: str):
    if pool not in ("avg", "max"):
      raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
    self.pool = pool
    self.branch1x1 = BasicConv2d(in_channels, 320, 1)
    self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
    self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
    self.branch_pool = BasicConv2d(in_channels, 192, 1)

  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.branch3x3_1(x)
    b3 = _cat(self.branch3x3_2a(b3), self.branch3x3_2b(b3))
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = _cat(self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd))
    pooled = max_pool(x, 1, padding=1) if self.pool == "max" else avg_pool_exclude_pad(x)
    return _cat(self.branch1x1(x), b3, bd, self.branch_pool(pooled))


class FIDInceptionV3(nnx.Module):
  """The FID Inception-v3 up to pool3. x: [N, H, W, 3] float in [-1, 1] -> [N, 2048].

  Parameters start as zeros/ones; load real ones with `load_inception`.
  """

  def __init__(self):
    # block 0
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
    # block 1
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
    # block 2
    self.Mixed_5b = FIDInceptionA(192, pool_features=32)
    self.Mixed_5c = FIDInceptionA(256, pool_features=64)
    self.Mixed_5d = FIDInceptionA(288, pool_features=64)
    self.Mixed_6a = InceptionB(288)
    self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    # block 3
    self.Mixed_7a = InceptionD(768)
    self.Mixed_7b = FIDInceptionE(1280, pool="avg")
    self.Mixed_7c = FIDInceptionE(2048, pool="max")

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = max_pool(x, 2)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = max_pool(x, 2)
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                  self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                  self.Mixed_7c):
      x = block(x)
    return jnp.mean(x, axis=(1, 2))


def load_inception(path: str) -> FIDInceptionV3:
  """The FID Inception with pytorch-fid's weights from `path` (`.pth` state dict or safetensors).

  Raises FileNotFoundError (with where to get the file) if it is absent, ValueError if its keys or
  shapes do not match the network.
  """
  state_dict = read_state_dict(path)  # first: a missing file fails before any work
  model = FIDInceptionV3()
  load_state_dict_into(model, state_dict)
  return model


@functools.lru_cache(maxsize=None)
def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] float32 matrix of torch's bilinear resize (align_corners=False, no antialias).

  Source index src = max((dst + 0.5) * in / out - 0.5, 0); weights 1 - frac and frac on
  floor(src) and min(floor(src) + 1, in - 1).
  """
  # float64 index arithmetic; torch's float32 differs by ~1 ulp, far below the FID tolerance.
  src = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)
  i0 = np.floor(src).astype(np.int64)
  i1 = np.minimum(i0 + 1, in_size - 1)
  frac = src - i0
  m = np.zeros((out_size, in_size))
  rows = np.arange(out_size)
  np.add.at(m, (rows, i0), 1 - frac)
  np.add.at(m, (rows, i1), frac)  # i1 == i0 on the last row: weights still sum to 1
  m = m.astype(np.float32)
  m.flags.writeable = False  # cached: shared between callers
  return m


def resize_bilinear(x: jax.Array, out_h: int, out_w: int) -> jax.Array:
  """[N, H, W, C] float -> [N, out_h, out_w, C] by torch's bilinear rule (separable)."""
  mh = jnp.asarray(bilinear_matrix(x.shape[1], out_h))
  mw = jnp.asarray(bilinear_matrix(x.shape[2], out_w))
  # The resize is cheap: keep it exact whatever matmul precision the caller chose.
  hi = jax.lax.Precision.HIGHEST
  x = jnp.einsum("oh,nhwc->nowc", mh, x, precision=hi)
  return jnp.einsum("pw,nowc->nopc", mw, x, precision=hi)


def preprocess(images: jax.Array) -> jax.Array:
  """uint8 [N, H, W, C] (C = 1 or 3) -> [N, 299, 299, 3] float32 in [-1, 1], as pytorch-fid."""
  if images.shape[-1] == 1:
    images = jnp.repeat(images, 3, axis=-1)
  x = images.astype(jnp.float32) / 255.0
  x = resize_bilinear(x, INPUT_SIZE, INPUT_SIZE)
  return 2.0 * x - 1.0


class InceptionFeatures:
  """pool3 features of uint8 images, data-parallel over `devices` (default: all local devices).

  The preprocessing + network is jitted once per input shape; batches are padded to a multiple
  of the device count and the padding dropped. Compute is float32 at `precision` ('highest' by
  default: full float32 convolutions, so features match pytorch-fid's on any hardware; None
  leaves it to the caller's `jax.default_matmul_precision`, e.g. TF32 on GPUs).
  """

  def __init__(self, model: FIDInceptionV3, devices=None, precision: str | None = "highest"):
    self.precision = precision
    devices = list(devices or jax.local_devices())
    self.mesh = Mesh(np.array(devices), ("batch",))
    self._batch = NamedSharding(self.mesh, P("batch"))
    graphdef, state = nnx.split(model)
    self._state = jax.device_put(state, NamedSharding(self.mesh, P()))  # replicated

    # The weights are an argument, not a closure, so that they are not baked into the program.
    @jax.jit
    def forward(state, images):
      return nnx.merge(graphdef, state)(preprocess(images))

    self._forward = forward

  @property
  def num_devices(self) -> int:
    return self.mesh.devices.size

  def __call__(self, images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, C] (C = 1 or 3) -> [N, 2048] float32."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
      raise ValueError(f"expected uint8 [N, H, W, 1 or 3] images, got {images.dtype} "
                       f"{images.shape}")
    if images.shape[-1] == 1:  # here, so grey and RGB batches share one compiled program
      images = np.repeat(images, 3, axis=-1)
    n = images.shape[0]
    if n == 0:
      return np.zeros((0, FEATURE_DIM), np.float32)
    pad = -n % self.num_devices
    if pad:
      images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], np.uint8)])
    images = jax.device_put(images, self._batch)
    if self.precision is None:
      out = self._forward(self._state, images)
    else:
      with jax.default_matmul_precision(self.precision):
        out = self._forward(self._state, images)
    return np.asarray(out, np.float32)[:n]
