"""Every Pallas kernel (forward and backward) lowers at HDiT's real shapes, from the CPU.

jax.export runs the Pallas -> Mosaic (TPU), Pallas -> Triton (CUDA) and Pallas -> Mosaic GPU
(CUDA) lowerings: this catches bad block shapes and unsupported primitives, not what only the
device compiler sees (VMEM size, layouts, register pressure). Batch 1 stands for the real
batches: it changes only the grid.
"""

import jax
import jax.numpy as jnp
import pytest

from hdit_kernels import dense_attention
from hdit_kernels import neighborhood_attention as na

# (batch, height, width, heads, head_dim) of HDiT's neighborhood-attention levels, kernel 7.
HDIT_NA_SHAPES = {
    "imagenet256_l0": (1, 64, 64, 6, 64),
    "imagenet256_l1": (1, 32, 32, 12, 64),
    "ffhq1024_l0": (1, 256, 256, 2, 64),
    "ffhq1024_l1": (1, 128, 128, 4, 64),
    "ffhq1024_l2": (1, 64, 64, 6, 64),
}
# (batch, tokens, heads, head_dim) of the global levels: ImageNet-256 16x16, FFHQ 32x32 and 16x16.
HDIT_GLOBAL_SHAPES = {"imagenet256_l2": (1, 256, 24, 64), "ffhq1024_l3": (1, 1024, 8, 64),
                      "ffhq1024_l4": (1, 256, 16, 64)}
DTYPES = [jnp.bfloat16, jnp.float32]
_TRITON_CALL = "__gpu$xla.gpu.triton"
_MOSAIC_GPU_CALL = "mosaic_gpu_v2"


def fwd_bwd(attention):
  """(q, k, v, ct) -> (out, dq, dk, dv): the forward kernel and every backward kernel."""

  def f(q, k, v, ct):
    out, vjp = jax.vjp(attention, q, k, v)
    return (out,) + vjp(ct)

  return f


def export(fn, shape, dtype, platform, **kw):
  spec = jax.ShapeDtypeStruct(shape, dtype)
  return jax.export.export(jax.jit(fn), platforms=[platform], **kw)(spec, spec, spec, spec)


@pytest.mark.tpu_lowering
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("level", HDIT_NA_SHAPES)
def test_na_pallas_tpu_lowers(level, dtype):
  shape = HDIT_NA_SHAPES[level]
  assert na.pallas_tpu.unsupported(shape, dtype, 7, None) is None   # no silent fallback
  exported = export(fwd_bwd(lambda q, k, v: na.na2d(q, k, v, 7, scale=1.0,
                                                     implementation="pallas_tpu")),
                    shape, dtype, "tpu")
  assert exported.mlir_module().count("tpu_custom_call") == 3   # forward, dq, dk/dv


@pytest.mark.gpu_lowering
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("level", HDIT_NA_SHAPES)
def test_na_pallas_gpu_lowers(level, dtype):
  shape = HDIT_NA_SHAPES[level]
  assert na.pallas_gpu.unsupported(shape, dtype, 7, None) is None
  exported = export(fwd_bwd(lambda q, k, v: na.na2d(q, k, v, 7, scale=1.0,
                                                     implementation="pallas_gpu")),
                    shape, dtype, "cuda",
                    disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(_TRITON_CALL)])
  # Triton kernels are serialised into the module: forward, then the fused backward.
  assert exported.mlir_module().count(f"@{_TRITON_CALL}(") == 2


@pytest.mark.gpu_lowering
@pytest.mark.parametrize("dtype", DTYPES)
def test_na_pallas_gpu_unfused_backward_lowers(dtype):
  config = na.pallas_gpu.Config(fused_backward=False)
  exported = export(fwd_bwd(lambda q, k, v: na.na2d(q, k, v, 7, scale=1.0,
                                                     implementation="pallas_gpu",
                                                     config=config)),
                    HDIT_NA_SHAPES["imagenet256_l0"], dtype, "cuda",
                    disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(_TRITON_CALL)])
  assert exported.mlir_module().count(f"@{_TRITON_CALL}(") == 3


def mosaic_gpu_calls(shape, kernel_size, dilation=1, config=None):
  exported = export(fwd_bwd(lambda q, k, v: na.na2d(q, k, v, kernel_size, dilation, scale=1.0,
                                                     implementation="mosaic_gpu",
                                                     config=config)),
                    shape, jnp.bfloat16, "cuda")
  return exported.mlir_module().count(f"@{_MOSAIC_GPU_CALL}(")


@pytest.mark.gpu_lowering
@pytest.mark.parametrize("level", HDIT_NA_SHAPES)
def test_na_mosaic_gpu_lowers(level):
  shape = HDIT_NA_SHAPES[level]
  assert na.mosaic_gpu.unsupported(shape, jnp.bfloat16, 7, None) is None
  assert mosaic_gpu_calls(shape, 7) == 3   # forward, dq (with D), dk/dv


@pytest.mark.gpu_lowering
@pytest.mark.parametrize("shape, kernel_size, dilation, block_keys, slots, tile_rows", [
    ((2, 16, 40, 2, 64), 7, 1, 192, 0, 0),   # non-square, 8 x 8 tiles (40 = 2.5 x 16)
    ((1, 64, 64, 2, 64), 7, 1, 0, None, 8),  # 8 x 8 tiles where 4 x 16 would be chosen
    ((1, 24, 16, 3, 64), 3, 1, 64, 0, 4),    # small window, 64-key steps
    ((1, 16, 16, 1, 64), 9, 1, 128, 0, 0),   # a window of 9 on the smallest map
    ((1, 64, 64, 1, 64), 11, 1, 0, None, 0),  # large halos, streamed: 14 x 32 / 18 x 32
    ((1, 128, 128, 1, 64), 19, 1, 0, None, 0),  # 24 x 48 keys in 192-token steps (4 rows)
    ((1, 48, 24, 1, 64), 4, 1, 64, 0, 0),    # steps that cut halo rows: one load group
    ((1, 64, 64, 2, 64), 7, 1, 192, 1, 0),   # every halo through one buffer
    ((3, 48, 32, 2, 64), 5, 2, 128, 0, 0),   # dilation: two 24 x 16 groups per axis
])
def test_na_mosaic_gpu_lowers_edge_cases(shape, kernel_size, dilation, block_keys, slots,
                                         tile_rows):
  config = na.mosaic_gpu.Config(block_keys=block_keys, slots=slots, tile_rows=tile_rows)
  assert mosaic_gpu_calls(shape, kernel_size, dilation, config) == 3


@pytest.mark.tpu_lowering
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("level", HDIT_GLOBAL_SHAPES)
def test_dense_pallas_tpu_flash_lowers(level, dtype):
  shape = HDIT_GLOBAL_SHAPES[level]
  exported = export(fwd_bwd(lambda q, k, v: dense_attention.dot_product_attention(
      q, k, v, scale=1.0, implementation="pallas_tpu")), shape, dtype, "tpu")
  assert exported.mlir_module().count("tpu_custom_call") >= 3   # forward, dk/dv, dq
