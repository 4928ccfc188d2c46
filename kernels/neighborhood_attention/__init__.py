"""2-D neighborhood attention: one op, several implementations."""

from hdit_kernels.neighborhood_attention import mosaic_gpu, pallas_gpu, pallas_tpu, xla
from hdit_kernels.neighborhood_attention.api import IMPLEMENTATIONS, default_implementation, na2d
from hdit_kernels.neighborhood_attention.reference import na2d_reference
from hdit_kernels.neighborhood_attention.windows import window_indices, window_starts

__all__ = ["IMPLEMENTATIONS", "default_implementation", "mosaic_gpu", "na2d", "na2d_reference",
           "pallas_gpu", "pallas_tpu", "window_indices", "window_starts", "xla"]
