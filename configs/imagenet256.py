"""HDiT-557M on ImageNet 256x256, the paper's class-conditional model (FID 3.21 with guidance).

Patch 4, levels 64x64 (NA k7, width 384, 2+2 layers), 32x32 (NA k7, 768, 2+2),
16x16 (global, 1536, 16 layers); 557,416,522 parameters, 197.6 GMACs per forward.

  python -m hdit_jax.main --config=configs/imagenet256.py --workdir=gs://BUCKET/hdit-557m
"""

from hdit_jax.config import base_config, hdit_model


def get_config(arg=None):
  del arg
  c = base_config()
  c.model = hdit_model(
      input_size=(256, 256), patch_size=(4, 4), depths=(2, 2, 16), widths=(384, 768, 1536),
      attention=("neighborhood", "neighborhood", "global"), dropout_rate=(0.0, 0.0, 0.0),
      num_classes=1000)
  c.diffusion.sigma_max = 160.0
  c.diffusion.loss_weighting = "soft-min-snr"
  c.diffusion.cond_dropout_rate = 0.1
  c.optimizer.update(lr=5e-4, b1=0.9, b2=0.95, weight_decay=1e-2)
  c.ema.update(power=0.75, max_value=0.9999)
  c.data.update(source="tfds", name="imagenet2012", image_size=256, augment_prob=0.0,
                hflip=False, batch_size=256)
  c.sampling.update(sampler="dpmpp_3m_sde", steps=50, eta=1.0, sigma_min=0.01)
  return c
