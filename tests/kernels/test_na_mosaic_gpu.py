"""The Mosaic GPU neighborhood-attention kernels' tiling, checked on the host.

Mosaic GPU kernels do not run on CPU (test_na_lowering.py lowers them for CUDA;
benchmarks/na_benchmark.py checks them on the GPU). What can go wrong without a GPU is the
bookkeeping: the tile shapes, the clamped halos (the smallest that hold every window), their
tile-aligned columns and NATTEN's mask on halo-relative tokens. These tests replay the kernels'
tiling with the kernels' own Geometry and masks: every (query, key) pair of the map must be
computed exactly once by the forward / dq tiles and once by the dk/dv tiles, step by step, and
the forward's stepwise online softmax over the halo must reproduce the reference.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_l2
from hdit_kernels import neighborhood_attention as na
from hdit_kernels.neighborhood_attention import mosaic_gpu, mosaic_gpu_halos as halos
from hdit_kernels.neighborhood_attention import mosaic_gpu_tiles as tiles

# (height, width, kernel_size): HDiT's levels, non-square maps, the smallest map, k = 1 ... 13.
GEOMETRIES = [(64, 64, 7), (16, 40, 7), (40, 16, 7), (24, 16, 3), (16, 16, 9), (32, 48, 5),
              (16, 16, 1), (48, 24, 4), (256, 32, 7), (32, 32, 7), (64, 64, 9), (24, 24, 9),
              (64, 64, 13)]
# Each map with each tile shape that tiles it.
TILED = [(h, w, k, r) for h, w, k in GEOMETRIES for r in halos.TILE_ROWS
         if halos.shape_reason(h, w, r) is None]


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


def halo_inside(origin, halo, geo):
  """Inside the map, its first column on a TMA tile boundary (a multiple of 8), a multiple
  of 64 tokens."""
  r, c = (int(x) for x in origin)
  return (0 <= r and r + halo.rows <= geo.height and 0 <= c and c + halo.cols <= geo.width
          and c % 8 == 0 and halo.tokens % 64 == 0)


def programs(geo, kind):
  """Yields (tile origin, tile tokens, halo origin, halo tokens) of each program: query tiles
  and their key halos (kind 'key'), key tiles and their query halos ('query')."""
  halo = geo.key_halo if kind == "key" else geo.query_halo
  origin_of = geo.key_halo_origin if kind == "key" else geo.query_halo_origin
  for tile in range(geo.num_tiles):
    r0, c0 = (int(x) for x in geo.tile_origin(tile))
    origin = tuple(int(x) for x in origin_of(r0, c0))
    assert halo_inside(origin, halo, geo), (tile, origin)
    yield ((r0, c0), tile_tokens(r0, c0, geo.tile_rows, geo.tile_cols, geo.width), origin,
           tile_tokens(*origin, halo.rows, halo.cols, geo.width))


def query_tile_pairs(geo):
  """Yields (query tokens, key tokens, mask) of each forward / dq program."""
  qt, kt = np.arange(64)[:, None], np.arange(geo.key_halo.tokens)[None, :]
  for tile_origin, tile, origin, halo in programs(geo, "key"):
    mask = np.asarray(tiles.token_mask(qt, kt, geo, tile_origin, geo.tile_cols, origin,
                                       geo.key_halo.cols))
    yield tile, halo, mask


def key_tile_pairs(geo):
  """Yields (query tokens, key tokens, mask (keys, queries)) of each dk/dv program."""
  kt, qt = np.arange(64)[:, None], np.arange(geo.query_halo.tokens)[None, :]
  for tile_origin, tile, origin, halo in programs(geo, "query"):
    mask = np.asarray(tiles.token_mask(qt, kt, geo, origin, geo.query_halo.cols, tile_origin,
                                       geo.tile_cols))
    yield halo, tile, mask


@pytest.mark.parametrize("height, width, kernel_size, tile_rows", TILED)
def test_every_pair_is_computed_once_by_each_kernel(height, width, kernel_size, tile_rows):
  geo = halos.Geometry(height, width, kernel_size, tile_rows)
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


@pytest.mark.parametrize("height, width, kernel_size, tile_rows, block", [
    (64, 64, 7, 4, 192), (64, 64, 7, 8, 128), (16, 40, 7, 8, 64), (24, 16, 3, 4, 128),
    (16, 16, 9, 8, 256), (32, 32, 7, 4, 256), (64, 64, 9, 4, 192)])
def test_window_mask_blocks_match_the_window_rule(monkeypatch, height, width, kernel_size,
                                                  tile_rows, block):
  """The in-kernel window_mask, step by step as the kernels call it, for both orientations."""
  monkeypatch.setattr(tiles, "_vector_iota", lambda n, layout: jnp.arange(n, dtype=jnp.int32))
  geo = halos.Geometry(height, width, kernel_size, tile_rows)
  want = map_attends(geo)
  for (tile_origin, tile, k_origin, key_halo), (_, _, q_origin, query_halo) in zip(
      programs(geo, "key"), programs(geo, "query")):
    for start, size in halos.blocks(geo.key_halo.tokens, block):
      fwd = tiles.window_mask((64, size), geo, 0, tile_origin, geo.tile_cols, 0, k_origin,
                              geo.key_halo.cols, start)
      np.testing.assert_array_equal(np.asarray(fwd),
                                    want[np.ix_(tile, key_halo[start:start + size])])
    for start, size in halos.blocks(geo.query_halo.tokens, block):
      dkv = tiles.window_mask((64, size), geo, 1, q_origin, geo.query_halo.cols, start,
                              tile_origin, geo.tile_cols, 0)
      np.testing.assert_array_equal(np.asarray(dkv),
                                    want[np.ix_(query_halo[start:start + size], tile)].T)


@pytest.mark.parametrize("height, width, kernel_size, tile_rows", TILED)
def test_halos_are_the_smallest_that_hold_every_window(height, width, kernel_size, tile_rows):
  """One row or one group of 8 columns less (at a multiple of 64 tokens) misses some window."""
  geo = halos.Geometry(height, width, kernel_size, tile_rows)
  assert geo.covers() is None
  for kind in ("key", "query"):
    (row_lo, row_hi), (col_lo, col_hi) = geo.needs(kind)
    halo = geo.key_halo if kind == "key" else geo.query_halo
    rows_needed = (row_hi - row_lo).max()
    cols_needed = (col_hi - col_lo // 8 * 8).max()
    assert halo.rows >= rows_needed and halo.cols >= cols_needed and halo.tokens % 64 == 0
    for rows in range(rows_needed, height + 1):
      for cols in range(-(-cols_needed // 8) * 8, width + 1, 8):
        if rows * cols % 64 == 0:
          assert rows * cols >= halo.tokens, (kind, rows, cols, halo)


class _SmallKeyHalo(halos.Geometry):
  @property
  def key_halo(self):
    return halos.Halo(8, 16)


class _SmallQueryHalo(halos.Geometry):
  @property
  def query_halo(self):
    return halos.Halo(10, 32)   # 11 rows are needed next to the borders


class _ShiftedKeyHalo(halos.Geometry):
  def key_halo_origin(self, r0, c0):
    row, col = super().key_halo_origin(r0, c0)
    return row, col + 1   # no longer on an 8-token boundary


def test_covers_names_a_halo_that_misses_a_window():
  assert "key halo (8 x 16)" in _SmallKeyHalo(64, 64, 7, 4).covers()
  assert "query halo (10 x 32) of the tiles at row 4 misses rows" in _SmallQueryHalo(
      64, 64, 7, 4).covers()
  assert "key halo (10 x 32) of the tiles at column 0 misses columns" in _ShiftedKeyHalo(
      64, 64, 7, 4).covers()


class _FakeRef:
  """Stands for a GMEM or SMEM ref in the copy helpers: indexing and reshaping return it."""

  @property
  def at(self):
    return self

  def __getitem__(self, index):
    return self

  def reshape(self, *shape):
    return self


@pytest.mark.parametrize("halo, block, slots", [((12, 32), 128, 2), ((10, 32), 192, 0),
                                                 ((16, 24), 64, 0), ((24, 48), 192, 2)])
def test_barriers_expect_the_copies_issued_on_them(monkeypatch, halo, block, slots):
  """As the kernels load a group: a TMA copy per halo row (plus the dk/dv kernel's statistics)
  and per tile row, each one arrival."""
  arrivals = {}
  monkeypatch.setattr(tiles.plgpu, "copy_gmem_to_smem",
                      lambda src, dst, barrier: arrivals.update({barrier: arrivals.get(
                          barrier, 0) + 1}))
  halo = halos.Halo(*halo)
  stream = halos.Stream(halo, halos.blocks(halo.tokens, block), slots)
  ref = _FakeRef()
  for extra, barriers in ((0, stream.barriers()), (1, stream.barriers(extra_arrivals=1))):
    for group, barrier in enumerate(barriers):
      token = f"{extra}-{group}"
      tiles.copy_group_in(ref, 0, (0, 0), 0, ref, token, stream, group)
      if extra:
        tiles.copy_group_stats_in(ref, 0, (0, 0), 0, ref, token, stream, group)
      assert arrivals.pop(token) == barrier.num_arrivals
  for geo in (halos.Geometry(64, 64, 7, 4), halos.Geometry(64, 64, 7, 8)):
    tiles.copy_tile_in(ref, 0, 0, 0, 0, ref, "tile", geo)
    assert arrivals.pop("tile") == geo.tile_rows   # the kernels' tile barriers


def test_tile_shape_is_chosen_by_halo_tokens():
  """4 x 16 tiles where the map allows: 2 x 320 + 384 halo tokens at k = 7 against 3 x 384."""
  geo = halos.Geometry.choose(64, 64, 7)
  assert (geo.tile_rows, geo.key_halo, geo.query_halo) == (4, (10, 32), (12, 32))
  assert halos.Geometry.choose(16, 40, 7).tile_rows == 8   # 40 is no multiple of 16
  assert halos.Geometry.choose(64, 64, 13).tile_rows == 8   # a tie (1728 tokens): 8 x 8
  assert halos.Geometry.choose(64, 64, 7, tile_rows=8).key_halo == (16, 24)
  with pytest.raises(ValueError, match="width 40 is not a multiple of the tile's 16"):
    halos.Geometry.choose(16, 40, 7, tile_rows=4)


def test_dilation_groups_of_every_size_are_checked():
  """47 rows with dilation 3 give groups of 16, 16 and 15 rows: the 15 must be refused."""
  q = jnp.zeros((1, 47, 48, 1, 64), jnp.bfloat16)
  with pytest.raises(NotImplementedError, match="dilation group 15 x 16"):
    na.na2d(q, q, q, 3, 3, implementation="mosaic_gpu")


@pytest.mark.parametrize("height, width, kernel_size, tile_rows, block", [
    (16, 40, 7, 8, 64), (16, 40, 7, 8, 192), (64, 32, 7, 4, 192), (64, 32, 7, 4, 128),
    (24, 16, 3, 4, 64), (24, 16, 3, 8, 256), (16, 16, 9, 8, 128), (32, 32, 9, 4, 0)])
def test_blockwise_online_softmax_matches_reference(height, width, kernel_size, tile_rows,
                                                    block):
  """The forward's arithmetic in numpy: base-2 online softmax over the steps of its halo."""
  config = mosaic_gpu.Config(block_keys=block, tile_rows=tile_rows)
  shape = (1, height, width, 1, 64)
  assert mosaic_gpu.unsupported(shape, jnp.bfloat16, kernel_size, config) is None
  geo = mosaic_gpu.geometry(shape, kernel_size, config)
  assert geo.tile_rows == tile_rows
  kq, kk, kv = jax.random.split(jax.random.key(block + tile_rows), 3)
  q, k, v = (np.asarray(jax.random.normal(key, shape), np.float64) for key in (kq, kk, kv))
  flat = lambda t: t.reshape(height * width, -1)
  scale = 0.3
  out = np.zeros((height * width, 64))
  lse = np.zeros(height * width)
  for queries, keys, mask in query_tile_pairs(geo):
    m, l, acc = np.full(64, -np.inf), np.zeros(64), np.zeros((64, 64))
    for start, size in config.stream(geo.key_halo, "forward").steps:
      cols = slice(start, start + size)
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
    # 40-column halos have no step of whole rows to stream (lcm(64, 40) = 320 > 256).
    ((1, 128, 40, 2, 64), jnp.bfloat16, 21, None,
     "kernel_size 21: the forward kernel with its 32 x 40 key halo needs 329 KiB"),
    ((1, 20, 64, 2, 64), jnp.bfloat16, 7, None, "height 20 must be a multiple of 8"),
    ((1, 64, 8, 2, 64), jnp.bfloat16, 7, None, "width 8 must be a multiple of 8 and >= 16"),
    ((1, 64, 40, 2, 64), jnp.bfloat16, 7, mosaic_gpu.Config(tile_rows=4), "width 40 is not"),
    ((1, 64, 64, 2, 64), jnp.bfloat16, 7, mosaic_gpu.Config(tile_rows=2), "tile_rows 2"),
    ((1, 64, 64, 2, 64), jnp.bfloat16, 7, mosaic_gpu.Config(block_keys=320), "block_keys 320"),
    ((1, 64, 64, 2, 64), jnp.bfloat16, 7, mosaic_gpu.Config(block_keys=32), "block_keys 32"),
    ((1, 64, 64, 2, 64), jnp.bfloat16, 7, mosaic_gpu.Config(interpret=True), "interpret"),
    ((1, 48, 24, 2, 64), jnp.bfloat16, 4, mosaic_gpu.Config(block_keys=128, slots=1),
     "slots 1 need steps of whole rows of the 16 x 24 halo"),
    ((1, 64, 64, 2, 64), jnp.bfloat16, 7, mosaic_gpu.Config(slots=-1), "slots -1"),
])
def test_unsupported_names_the_reason(shape, dtype, kernel_size, config, reason):
  assert reason in mosaic_gpu.unsupported(shape, dtype, kernel_size, config)


@pytest.mark.parametrize("shape, kernel_size", [((1, 64, 64, 6, 64), 7), ((2, 16, 40, 2, 64), 7),
                                                ((1, 24, 16, 3, 64), 3), ((1, 16, 16, 1, 64), 9),
                                                ((1, 64, 64, 2, 64), 13),
                                                ((1, 128, 128, 1, 64), 19)])
def test_supported_cases(shape, kernel_size):
  for dtype in (jnp.bfloat16, jnp.float16):
    assert mosaic_gpu.unsupported(shape, dtype, kernel_size, None) is None


def test_shared_memory_counts_tiles_halos_and_statistics():
  """ImageNet level 0: 4 x 16 tiles, 320-key halos resident, 384-query halos streamed through
  two 128-token buffers (resident, 115 KiB would leave room for one dk/dv program per SM)."""
  geo = halos.Geometry.choose(64, 64, 7)
  kib = 1024   # every buffer takes whole KiB
  assert mosaic_gpu.smem_bytes(geo, mosaic_gpu.Config(), 64, 2) == {
      "forward": 64 * 128 + 2 * 320 * 128 + kib,
      "dq": 3 * 64 * 128 + 2 * 320 * 128 + 2 * kib,
      "dk/dv": 2 * 64 * 128 + 2 * 256 * 128 + 2 * kib}
  resident = mosaic_gpu.Config(slots=0)
  assert mosaic_gpu.smem_bytes(geo, resident, 64, 2)["dk/dv"] == (
      2 * 64 * 128 + 2 * 384 * 128 + 2 * 2 * kib) > mosaic_gpu.TWO_PER_SM_BYTES   # 1.5 -> 2


def test_default_streams_keep_two_programs_per_sm():
  geo = halos.Geometry.choose(64, 64, 7)
  streams = mosaic_gpu.Config().streams(geo)
  assert [(streams[k].steps, streams[k].slots) for k in mosaic_gpu.KERNELS] == [
      (((0, 192), (192, 128)), 0), (((0, 192), (192, 128)), 0),
      (((0, 128), (128, 128), (256, 128)), 2)]
  for shape, ks in (((1, 64, 64, 1, 64), 7), ((1, 16, 40, 1, 64), 7), ((1, 64, 64, 1, 64), 11),
                    ((1, 256, 32, 1, 64), 7), ((1, 24, 24, 1, 64), 9), ((1, 128, 128, 1, 64), 19)):
    geo = mosaic_gpu.geometry(shape, ks)
    used = mosaic_gpu.smem_bytes(geo, mosaic_gpu.Config(), 64, 2)
    resident = mosaic_gpu.smem_bytes(geo, mosaic_gpu.Config(slots=0), 64, 2)
    for kernel, stream in mosaic_gpu.Config().streams(geo).items():
      if stream.slots:   # streamed only where a resident halo leaves one program per SM
        assert resident[kernel] > mosaic_gpu.TWO_PER_SM_BYTES, (shape, kernel)
        assert used[kernel] < resident[kernel] and stream.whole_rows, (shape, kernel)
      else:
        assert used[kernel] == resident[kernel]
  # 24-column halos cannot be cut into 128-token steps of whole rows: they stay resident.
  narrow = mosaic_gpu.Config().stream(halos.Halo(16, 24), "dk/dv")
  assert narrow.slots == 0 and narrow.steps == ((0, 192), (192, 192))


@pytest.mark.parametrize("tokens, block, want", [
    (384, 0, ((0, 192), (192, 192))), (320, 0, ((0, 192), (192, 128))),
    (256, 0, ((0, 128), (128, 128))), (192, 0, ((0, 192),)),
    (576, 0, ((0, 192), (192, 192), (384, 192))), (384, 256, ((0, 256), (256, 128))),
    (320, 64, tuple((i, 64) for i in range(0, 320, 64)))])
def test_steps_cover_the_halo_in_multiples_of_64(tokens, block, want):
  steps = mosaic_gpu.Config(block_keys=block, slots=0).stream(halos.Halo(tokens // 32, 32),
                                                              "forward").steps
  assert steps == want
  assert all(size % 64 == 0 and size <= 256 for _, size in steps)
  assert sum(size for _, size in steps) == tokens


@pytest.mark.parametrize("halo, block, slots", [
    ((12, 32), 128, 2), ((12, 32), 128, 1), ((10, 32), 192, 0), ((10, 32), 64, 3),
    ((16, 24), 192, 1), ((16, 24), 64, 0), ((18, 32), 128, 2), ((16, 16), 128, 2)])
def test_stream_schedule_gives_every_step_its_own_tokens(halo, block, slots):
  """Replays a kernel's loads: preload, then refill after each step, as the kernels issue them;
  every step must read exactly its halo tokens from a buffer no later load has overwritten."""
  halo = halos.Halo(*halo)
  stream = halos.Stream(halo, halos.blocks(halo.tokens, block), slots)
  assert slots == 0 or stream.whole_rows
  buffer = np.full(stream.buffer_tokens, -1)
  landed = set()

  def load(group):
    first, rows = stream.groups[group]
    for i in range(rows):   # one TMA copy per halo row, as copy_group_in
      row = first + i
      offset = stream.offset(group) + i * halo.cols
      buffer[offset:offset + halo.cols] = np.arange(row * halo.cols, (row + 1) * halo.cols)
    landed.add(group)

  for group in range(stream.preloaded()):
    load(group)
  waits = []
  for i, (start, size) in enumerate(stream.steps):
    if stream.starts_group(i):   # where the kernels wait on the group's barriers
      waits.append(stream.group_of(i))
    assert waits and waits[-1] == stream.group_of(i) and stream.group_of(i) in landed
    first, tokens = stream.location(i)
    np.testing.assert_array_equal(buffer[first:first + tokens], np.arange(start, start + size))
    if (refill := stream.refill_after(i)) is not None:
      load(refill)
  assert landed == set(range(len(stream.groups)))
  assert waits == list(range(len(stream.groups)))   # every barrier waited once, in order
  assert stream.buffer_tokens == (slots * max(s for _, s in stream.steps) if slots
                                  else halo.tokens)


def test_stream_refuses_slots_over_steps_that_cut_rows():
  with pytest.raises(ValueError, match="slots 1 need steps of whole rows of the 16 x 24 halo"):
    halos.Stream(halos.Halo(16, 24), halos.blocks(384, 128), slots=1)
  with pytest.raises(ValueError, match="slots -1"):
    halos.Stream(halos.Halo(12, 32), halos.blocks(384, 128), slots=-1)
