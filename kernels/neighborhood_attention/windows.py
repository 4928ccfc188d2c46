"""NATTEN's window rule: which keys each query position attends to, per spatial axis."""

import jax.numpy as jnp
import numpy as np


def check_window(length: int, kernel_size: int, dilation: int, axis_name: str = "axis") -> None:
  """Raises ValueError where NATTEN would refuse the case."""
  if kernel_size < 1:
    raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
  if dilation < 1:
    raise ValueError(f"dilation must be >= 1, got {dilation}")
  if kernel_size * dilation > length:
    raise ValueError(
        f"neighborhood attention needs kernel_size * dilation <= map size on every axis; "
        f"{axis_name} has length {length} < {kernel_size} * {dilation}")


def window_starts(length: int, kernel_size: int, dilation: int = 1) -> np.ndarray:
  """Absolute index of the first key of each query's window, shape (length,), int32.

  Positions split into `dilation` groups by i mod dilation; inside a group of L_g positions the
  window starts at clamp(i // dilation - kernel_size // 2, 0, L_g - kernel_size), so it is centred
  in the interior and shifted inward at the borders (never padded). The keys of query i are
  start[i] + a * dilation for a in [0, kernel_size).
  """
  check_window(length, kernel_size, dilation)
  i = np.arange(length)
  group, sub = i % dilation, i // dilation
  group_len = -(-(length - group) // dilation)  # ceil((L - g) / d)
  start = np.clip(sub - kernel_size // 2, 0, group_len - kernel_size)
  return (start * dilation + group).astype(np.int32)


def window_indices(length: int, kernel_size: int, dilation: int = 1) -> np.ndarray:
  """Key indices of every query's window, shape (length, kernel_size), int32."""
  starts = window_starts(length, kernel_size, dilation)
  return starts[:, None] + dilation * np.arange(kernel_size, dtype=np.int32)[None, :]


def window_start(pos, length: int, kernel_size: int):
  """Traceable window start (dilation 1) of query position(s) `pos`: centred, shifted inward at
  the borders."""
  return jnp.clip(pos - kernel_size // 2, 0, length - kernel_size)


def attending_range(x0, x1, length: int, kernel_size: int):
  """[lo, hi) of the queries whose window (one axis) meets keys [x0, x1], x0 <= x1 < length.

  Closed forms of NATTEN's inverse neighborhood: start(i) = clip(i - k//2, 0, L - k) is
  non-decreasing, so the queries form the range from the first i with start(i) + k - 1 >= x0 to
  the last i with start(i) <= x1.
  """
  ks = kernel_size
  lo = jnp.where(x0 - ks + 1 <= 0, 0, x0 - ks + 1 + ks // 2)
  hi = jnp.where(x1 >= length - ks, length - 1, x1 + ks // 2) + 1
  return lo, hi
