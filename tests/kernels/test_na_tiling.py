"""Tile plans, inverse neighborhoods and dilation groups: the bookkeeping under every kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hdit_kernels.neighborhood_attention import dilation, pallas_common, tiling
from hdit_kernels.neighborhood_attention import windows


def attends(length, kernel_size):
  """attends[i, j]: query i sees key j on one axis (dilation 1)."""
  starts = windows.window_starts(length, kernel_size)
  j = np.arange(length)
  return (j[None, :] >= starts[:, None]) & (j[None, :] < starts[:, None] + kernel_size)


@pytest.mark.parametrize("align, multiple", [(1, 1), (8, 1), (16, 1), (16, 8)])
@pytest.mark.parametrize("tile", [1, 4, 8, 16])
def test_axis_plan_halos_cover_every_window(tile, align, multiple):
  for length in range(2, 40):
    for kernel_size in range(2, length + 1):
      plan = tiling.axis_plan(length, kernel_size, tile, align, multiple)
      if plan.q_span < length:
        assert plan.q_span % multiple == 0 or plan.q_span + multiple > length
      seen = attends(length, kernel_size)
      assert plan.kv_span <= length and plan.q_span <= length
      for t in range(plan.num_tiles):
        members = np.arange(t * plan.tile, min((t + 1) * plan.tile, length))
        keys = np.flatnonzero(seen[members].any(axis=0))         # keys of the query tile
        queries = np.flatnonzero(seen[:, members].any(axis=1))   # queries of the key tile
        kv0, q0 = plan.kv_starts[t], plan.q_starts[t]
        for start, span in ((kv0, plan.kv_span), (q0, plan.q_span)):
          assert 0 <= start and start + span <= length and start % align == 0
        assert kv0 <= keys.min() and keys.max() < kv0 + plan.kv_span
        assert q0 <= queries.min() and queries.max() < q0 + plan.q_span


def test_gpu_inverse_neighborhood_closed_form():
  for length in range(2, 20):
    for kernel_size in range(2, length + 1):
      seen = attends(length, kernel_size)
      x0, x1 = np.meshgrid(np.arange(length), np.arange(length), indexing="ij")
      x0, x1 = x0[x0 <= x1], x1[x0 <= x1]
      lo, hi = windows.attending_range(jnp.asarray(x0), jnp.asarray(x1), length, kernel_size)
      for a, b, l, h in zip(x0, x1, np.asarray(lo), np.asarray(hi)):
        queries = np.flatnonzero(seen[:, a:b + 1].any(axis=1))
        assert (queries.min(), queries.max() + 1) == (l, h), (length, kernel_size, a, b)


def test_divmod_small_matches_integer_division():
  x = jnp.arange(1 << 16, dtype=jnp.int32)
  for m in (3, 7, 8, 14, 22, 48, 100):
    q, r = pallas_common.divmod_small(x, m)
    np.testing.assert_array_equal(np.asarray(q), np.arange(1 << 16) // m)
    np.testing.assert_array_equal(np.asarray(r), np.arange(1 << 16) % m)


@pytest.mark.parametrize("shape, dil", [((2, 13, 10, 3, 4), 2), ((1, 16, 16, 1, 2), 4),
                                        ((1, 17, 11, 2, 2), 3), ((3, 9, 9, 1, 1), 1)])
def test_dilation_groups_round_trip(shape, dil):
  x = jax.random.normal(jax.random.key(0), shape)
  seen = []

  def identity(q, k, v):
    seen.append(q.shape)
    return q

  np.testing.assert_array_equal(np.asarray(dilation.dilated(identity, x, x, x, dil)),
                                np.asarray(x))
  # Every sub-map is one equal-sized dilation group per batch entry: at most 4 shapes.
  assert len(seen) <= 4
  assert sum(s[0] * s[1] * s[2] for s in seen) == shape[0] * shape[1] * shape[2]


def test_dilation_group_sees_only_its_own_positions():
  """Group (g_h, g_w) of the split holds exactly the positions i = g (mod dilation)."""
  h, w, dil = 11, 7, 3
  pos = jnp.stack(jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij"), -1)
  pos = pos.astype(jnp.float32)[None, :, :, None, :]     # (1, H, W, 1, 2)

  def check(q, k, v):
    rows, cols = np.asarray(q[..., 0, 0]), np.asarray(q[..., 0, 1])
    assert (np.ptp(rows % dil, axis=(1, 2)) == 0).all()
    assert (np.ptp(cols % dil, axis=(1, 2)) == 0).all()
    assert (np.diff(rows, axis=1) == dil).all() and (np.diff(cols, axis=2) == dil).all()
    return q

  dilation.dilated(check, pos, pos, pos, dil)
