"""The Mosaic GPU neighborhood-attention kernels' tiling, checked on the host.

Mosaic GPU kernels do not run on CPU (test_na_lowering.py lowers them for CUDA;
benchmarks/na_benchmark.py checks them on the GPU). What can go wrong without a GPU is the
bookkeeping: the clamped 16 x 24 halos (16 x 16 on maps 16 wide), their tile-aligned columns and
NATTEN's mask on halo-relative tokens. These tests replay the kernels' tiling with the kernels'
own Geometry and masks: every (query, key) pair of the map must be computed exactly once by the
forward / dq tiles and once by the dk/dv tiles, block by block, and the forward's blockwise
online softmax over the halo must reproduce the reference.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_l2
from hdit_kernels import neighborhood_attention as na
from hdit_kernels.neighborhood_attention import mosaic_gpu, mosaic_gpu_tiles as tiles

T = tiles.TILE
# (height, width, kernel_size): HDiT's levels, non-square maps, the smallest map, k = 1 ... 9.
GEOMETRIES = [(64, 64, 7), (16, 40, 7), (40, 16, 7), (24, 16, 3), (16, 16, 9), (32, 48, 5),
              (16, 16, 1), (48, 24, 4), (256, 32, 7)]


def attends(length, kernel_size):
  starts = na.window_starts(length, kernel_size)
  j = np.arange(length)
  return (j[None, :] >= starts[:, None]) & (j[None, :] < starts[:, None] + kernel_size)


def map_attends(geo):
  """(H*W, H*W) bool: query token sees key token, straight from window_starts."""
  rows, cols = attends(geo.height, geo.kernel_size), attends(geo.width, geo.kernel_size)
  return np.einsum("ac,bd->abcd", rows, cols).reshape(geo.height * geo.width, -1).astype(bool)


def tile_tokens(r0, c0, rows, cols, width):
  """Map-flat indices of the rows x cols block at (r0, c0), row-major."""
  r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
  return ((r0 + r) * width + c0 + c).reshape(-1)


def halo_inside(origin, geo):
  """Inside the map, its first column on a TMA tile boundary (a multiple of 8)."""
  r, c = (int(x) for x in origin)
  return (0 <= r and r + geo.halo_rows <= geo.height and 0 <= c
          and c + geo.halo_cols <= geo.width and c % T == 0)


def query_tile_pairs(geo):
  """Yields (query tokens, key tokens, mask) of each forward / dq program."""
  qt, kt = np.arange(T * T)[:, None], np.arange(geo.halo_tokens)[None, :]
  for tile in range(geo.num_tiles):
    r0, c0 = (int(x) for x in geo.tile_origin(tile))
    origin = geo.key_halo_origin(r0, c0)
    assert halo_inside(origin, geo), (tile, origin)
    mask = np.asarray(tiles.token_mask(qt, kt, geo, (r0, c0), T, origin, geo.halo_cols))
    yield (tile_tokens(r0, c0, T, T, geo.width),
           tile_tokens(*(int(x) for x in origin), geo.halo_rows, geo.halo_cols, geo.width), mask)


def key_tile_pairs(geo):
  """Yields (query tokens, key tokens, mask (keys, queries)) of each dk/dv program."""
  kt, qt = np.arange(T * T)[:, None], np.arange(geo.halo_tokens)[None, :]
  for tile in range(geo.num_tiles):
    r0, c0 = (int(x) for x in geo.tile_origin(tile))
    origin = geo.query_halo_origin(r0, c0)
    assert halo_inside(origin, geo), (tile, origin)
    mask = np.asarray(tiles.token_mask(qt, kt, geo, origin, geo.halo_cols, (r0, c0), T))
    yield (tile_tokens(*(int(x) for x in origin), geo.halo_rows, geo.halo_cols, geo.width),
           tile_tokens(r0, c0, T, T, geo.width), mask)


@pytest.mark.parametrize("height, width, kernel_size", GEOMETRIES)
def test_every_pair_is_computed_once_by_each_kernel(height, width, kernel_size):
  geo = tiles.Geometry(height, width, kernel_size)
  assert geo.covers() is None
  want = map_attends(geo)
  fwd = np.zeros(want.shape, np.int32)
  for queries, keys, mask in query_tile_pairs(geo):
    np.add.at(fwd, (queries[:, None], keys[None, :]), mask)
  np.testing.assert_array_equal(fwd, want)
  bwd = np.zeros(want.shape, np.int32)
  for queries, keys, mask in key_tile_pairs(geo):
    np.add.at(bwd, (queries[None, :], keys[:, None]), mask)
  np.testing.assert_array_equal(bwd, want)


@pytest.mark.parametrize("height, width, kernel_size, block",
                         [(64, 64, 7, 192), (16, 40, 7, 64), (24, 16, 3, 128), (16, 16, 9, 256)])
def test_window_mask_blocks_match_the_window_rule(monkeypatch, height, width, kernel_size, block):
  """The in-kernel window_mask, block by block as the kernels call it, for both orientations."""
  monkeypatch.setattr(tiles, "_vector_iota", lambda n, layout: jnp.arange(n, dtype=jnp.int32))
  geo = tiles.Geometry(height, width, kernel_size)
  want = map_attends(geo)
  shape = (T * T, block)
  for tile in range(geo.num_tiles):
    r0, c0 = (int(x) for x in geo.tile_origin(tile))
    tile_tok = tile_tokens(r0, c0, T, T, geo.width)
    k_origin, q_origin = geo.key_halo_origin(r0, c0), geo.query_halo_origin(r0, c0)
    key_halo = tile_tokens(*(int(x) for x in k_origin), geo.halo_rows, geo.halo_cols, geo.width)
    query_halo = tile_tokens(*(int(x) for x in q_origin), geo.halo_rows, geo.halo_cols,
                             geo.width)
    for i in range(geo.halo_tokens // block):
      part = slice(i * block, (i + 1) * block)
      fwd = tiles.window_mask(shape, geo, 0, (r0, c0), T, 0, k_origin, geo.halo_cols, i * block)
      np.testing.assert_array_equal(np.asarray(fwd), want[np.ix_(tile_tok, key_halo[part])])
      dkv = tiles.window_mask(shape, geo, 1, q_origin, geo.halo_cols, i * block, (r0, c0), T, 0)
      np.testing.assert_array_equal(np.asarray(dkv), want[np.ix_(query_halo[part], tile_tok)].T)


@pytest.mark.parametrize("height, width, kernel_size", [(64, 64, 9), (24, 24, 9), (40, 16, 9),
                                                        (64, 64, 11)])
def test_covers_refuses_windows_the_halo_cannot_hold(height, width, kernel_size):
  assert "misses rows" in tiles.Geometry(height, width, kernel_size).covers()


def test_dilation_groups_of_every_size_are_checked():
  """47 rows with dilation 3 give groups of 16, 16 and 15 rows: the 15 must be refused."""
  q = jnp.zeros((1, 47, 48, 1, 64), jnp.bfloat16)
  with pytest.raises(NotImplementedError, match="dilation group 15 x 16"):
    na.na2d(q, q, q, 3, 3, implementation="mosaic_gpu")


@pytest.mark.parametrize("height, width, kernel_size, block", [
    (16, 40, 7, 64), (16, 40, 7, 128), (16, 40, 7, 192),     # 16 x 24 halos
    (24, 16, 3, 64), (24, 16, 3, 256), (16, 16, 9, 128)])    # 16 x 16 halos (maps 16 wide)
def test_blockwise_online_softmax_matches_reference(height, width, kernel_size, block):
  """The forward's arithmetic in numpy: base-2 online softmax over blocks of `block` keys."""
  geo = tiles.Geometry(height, width, kernel_size)
  assert mosaic_gpu.unsupported((1, height, width, 1, 64), jnp.bfloat16, kernel_size,
                                mosaic_gpu.Config(block_keys=block)) is None
  kq, kk, kv = jax.random.split(jax.random.key(block), 3)
  shape = (1, height, width, 1, 64)
  q, k, v = (np.asarray(jax.random.normal(key, shape), np.float64) for key in (kq, kk, kv))
  flat = lambda t: t.reshape(height * width, -1)
  scale = 0.3
  out = np.zeros((height * width, 64))
  lse = np.zeros(height * width)
  for queries, keys, mask in query_tile_pairs(geo):
    m, l, acc = np.full(T * T, -np.inf), np.zeros(T * T), np.zeros((T * T, 64))
    for i in range(geo.halo_tokens // block):
      cols = slice(i * block, (i + 1) * block)
      s = flat(q)[queries] @ flat(k)[keys[cols]].T * (scale * tiles.LOG2E)
      s = np.where(mask[:, cols], s, tiles.MASK_VALUE)
      m_new = np.maximum(m, s.max(1))
      p = np.exp2(s - m_new[:, None])
      alpha = np.exp2(m - m_new)
      l = l * alpha + p.sum(1)
      acc = acc * alpha[:, None] + p @ flat(v)[keys[cols]]
      m = m_new
    out[queries], lse[queries] = acc / l[:, None], m + np.log2(l)
  want = na.na2d_reference(*(jnp.asarray(t, jnp.float32) for t in (q, k, v)), kernel_size, 1,
                           scale)
  assert rel_l2(out.reshape(shape), want) <= 1e-5
  logits = flat(q) @ flat(k).T * scale
  want_lse = np.log(np.where(map_attends(geo), np.exp(logits), 0).sum(1)) * tiles.LOG2E
  np.testing.assert_allclose(lse, want_lse, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape, dtype, kernel_size, config, reason", [
    ((1, 64, 64, 2, 64), jnp.float32, 7, None, "dtype float32"),
    ((1, 64, 64, 2, 32), jnp.bfloat16, 7, None, "head_dim 32"),
    ((1, 64, 64, 2, 128), jnp.bfloat16, 7, None, "head_dim 128"),
    ((1, 64, 64, 2, 64), jnp.bfloat16, 11, None, "kernel_size 11"),
    ((1, 20, 64, 2, 64), jnp.bfloat16, 7, None, "height 20 must be a multiple of 8"),
    ((1, 64, 8, 2, 64), jnp.bfloat16, 7, None, "width 8 must be a multiple of 8 and >= 16"),
    ((1, 64, 64, 2, 64), jnp.bfloat16, 7, mosaic_gpu.Config(block_keys=256), "block_keys 256"),
    ((1, 64, 16, 2, 64), jnp.bfloat16, 7, mosaic_gpu.Config(block_keys=192), "block_keys 192"),
    ((1, 64, 64, 2, 64), jnp.bfloat16, 7, mosaic_gpu.Config(block_keys=32), "block_keys 32"),
    ((1, 64, 64, 2, 64), jnp.bfloat16, 7, mosaic_gpu.Config(interpret=True), "interpret"),
])
def test_unsupported_names_the_reason(shape, dtype, kernel_size, config, reason):
  assert reason in mosaic_gpu.unsupported(shape, dtype, kernel_size, config)


@pytest.mark.parametrize("shape, kernel_size", [((1, 64, 64, 6, 64), 7), ((2, 16, 40, 2, 64), 7),
                                                ((1, 24, 16, 3, 64), 3), ((1, 16, 16, 1, 64), 9)])
def test_supported_cases(shape, kernel_size):
  for dtype in (jnp.bfloat16, jnp.float16):
    assert mosaic_gpu.unsupported(shape, dtype, kernel_size, None) is None


def test_default_block_divides_the_halo():
  wide, narrow = tiles.Geometry(64, 64, 7), tiles.Geometry(64, 16, 7)
  assert (wide.halo_tokens, narrow.halo_tokens) == (384, 256)
  assert mosaic_gpu.Config().block(wide) == 192 and mosaic_gpu.Config().block(narrow) == 128
  assert mosaic_gpu.Config(block_keys=64).block(wide) == 64
