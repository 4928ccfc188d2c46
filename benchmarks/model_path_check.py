"""The HDiT model path on this backend: default attention kernels, float32 parity, bf16 grads.

  PYTHONPATH=/tmp/pp:$PWD python benchmarks/model_path_check.py

1. Loads the k-diffusion fixture HDiT (two neighborhood levels, k = 7, one global level) with
   attention_implementation None, checks its output against the fixture (float32, highest
   matmul precision) and that the compiled forward holds the backend's NA kernel (Triton custom
   calls on GPU).
2. The same weights in a bfloat16 model: jit(grad) of a loss through it, gradients finite and
   not all zero.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import numpy as st_numpy

from hdit_jax import convert
from hdit_jax.diffusion.preconditioning import edm_scalings

FIXTURES = "tests/fixtures/kdiff_hdit/"


def main() -> int:
  backend = jax.default_backend()
  io = st_numpy.load_file(FIXTURES + "hdit_io.safetensors")
  cond = {"aug_cond": io["input.aug_cond"]} if "input.aug_cond" in io else {}
  if "input.class_cond" in io:
    cond["class_cond"] = io["input.class_cond"].astype(np.int32)
  model, _ = convert.model_from_kdiffusion(FIXTURES + "hdit_weights.safetensors")
  sigma = io["input.sigma"]
  _, _, c_in = edm_scalings(sigma, 0.5)
  x = np.transpose(io["input.x"], (0, 2, 3, 1)) * c_in[:, None, None, None]
  want = np.transpose(io["inner_output"], (0, 2, 3, 1))

  graphdef, state = nnx.split(model)

  def forward(state, x):
    return nnx.merge(graphdef, state)(x, sigma, **cond)

  with jax.default_matmul_precision("highest"):
    fwd = jax.jit(forward)
    got = np.asarray(fwd(state, x), np.float64)
    hlo = fwd.lower(state, x).as_text()
  rel = np.linalg.norm(got - want) / np.linalg.norm(want)
  kernels = hlo.count("__gpu$xla.gpu.triton") + hlo.count("tpu_custom_call")
  print(f"backend {backend}: float32 inner output rel L2 {rel:.2e}, NA kernel calls in the "
        f"compiled forward: {kernels}")
  ok = rel <= 1e-5 and (kernels > 0 or backend == "cpu")

  bf16_model, _ = convert.model_from_kdiffusion(FIXTURES + "hdit_weights.safetensors",
                                                dtype="bfloat16")
  graphdef, state = nnx.split(bf16_model)

  def loss(state, x):
    out = nnx.merge(graphdef, state)(x, sigma, **cond)
    return jnp.mean(jnp.square(out.astype(jnp.float32)))

  value, grads = jax.jit(jax.value_and_grad(loss))(state, jnp.asarray(x, jnp.bfloat16))
  leaves = [np.asarray(g, np.float32) for g in jax.tree.leaves(grads)]
  finite = all(np.isfinite(g).all() for g in leaves)
  norm = float(np.sqrt(sum(np.sum(np.square(g)) for g in leaves)))
  print(f"bfloat16 jit(grad): loss {float(value):.4f}, gradient norm {norm:.3e}, "
        f"finite: {finite}")
  return 0 if ok and finite and norm > 0 and np.isfinite(float(value)) else 1


if __name__ == "__main__":
  sys.exit(main())
