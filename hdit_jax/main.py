"""Entry point: python -m hdit_jax.main --config=configs/quickstart.py [--workdir=DIR].

Training is not implemented yet: this builds the configured model, prints its parameter and
FLOP counts, and runs one jitted forward pass of the EDM denoiser on a batch of data.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from hdit_jax import flops
from hdit_jax.data.embedded import load_embedded
from hdit_jax.diffusion.preconditioning import denoise
from hdit_jax.models import build_model

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
flags.DEFINE_string("workdir", None, "Output directory (local or gs://).")


def example_batch(config, batch_size: int) -> tuple[jax.Array, jax.Array | None]:
  """Images in [-1, 1] (NHWC) and labels: the embedded dataset, or noise for other sources."""
  h, w = config.model.input_size
  c = config.model.input_channels
  if config.data.source == "embedded":
    images, labels, _ = load_embedded(config.data.name)
    images = images[:batch_size].astype(np.float32) / 127.5 - 1
    return jnp.asarray(images), jnp.asarray(labels[:batch_size])
  rng = np.random.default_rng(0)
  labels = rng.integers(0, max(config.model.num_classes, 1), batch_size)
  return jnp.asarray(rng.uniform(-1, 1, (batch_size, h, w, c)), jnp.float32), jnp.asarray(labels)


def main(argv):
  del argv
  config = _CONFIG.value
  counts = flops.count(config.model)
  print(flops.format_table(counts))

  model = build_model(config.model, rngs=nnx.Rngs(config.seed))
  images, labels = example_batch(config, min(config.data.batch_size, 8))
  sigma = jnp.full((images.shape[0],), 1.0)
  cond = {"class_cond": labels} if config.model.num_classes else {}

  @nnx.jit
  def forward(model, x, sigma, cond):
    return denoise(model, x, sigma, config.diffusion.sigma_data, **cond)

  start = time.perf_counter()
  out = jax.block_until_ready(forward(model, images, sigma, cond))
  print(f"\nforward pass on {jax.devices()[0].platform}: batch {tuple(images.shape)} -> "
        f"{tuple(out.shape)} in {time.perf_counter() - start:.2f} s (with compilation)")


if __name__ == "__main__":
  app.run(main)
