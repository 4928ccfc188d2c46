"""2-D neighborhood attention: one op, several implementations."""

from hdit_kernels.neighborhood_attention.api import IMPLEMENTATIONS, na2d
from hdit_kernels.neighborhood_attention.reference import na2d_reference
from hdit_kernels.neighborhood_attention.windows import window_indices, window_starts

__all__ = ["IMPLEMENTATIONS", "na2d", "na2d_reference", "window_indices", "window_starts"]
