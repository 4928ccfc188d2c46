"""HDiT-85M on FFHQ 1024x1024, the paper's unconditional megapixel model (FID 5.23).

Patch 4, widths 128/256/384/768/1024, two layers per level; neighborhood attention at
256x256, 128x128 and 64x64 tokens, global attention at 32x32 and 16x16; dropout 0.1 in the
middle level; non-leaky augmentation with p = 0.12. 85,079,300 parameters, 206.08 GMACs.

  python -m hdit_jax.main --config=configs/ffhq1024.py --workdir=gs://BUCKET/hdit-ffhq
"""

from hdit_jax.config import base_config, hdit_model


def get_config(arg=None):
  del arg
  c = base_config()
  c.model = hdit_model(
      input_size=(1024, 1024), patch_size=(4, 4), depths=(2, 2, 2, 2, 2),
      widths=(128, 256, 384, 768, 1024),
      attention=("neighborhood",) * 3 + ("global",) * 2, d_heads=(64,) * 5,
      kernel_sizes=(7,) * 5, window_sizes=(8,) * 5, dropout_rate=(0.0, 0.0, 0.0, 0.0, 0.1),
      num_classes=0)
  c.diffusion.sigma_max = 640.0
  c.diffusion.cond_dropout_rate = 0.0
  c.optimizer.update(lr=5e-4, b1=0.9, b2=0.95, weight_decay=1e-2)
  # The augmentation pipeline flips x itself (with a0 in aug_cond), so no separate flip.
  c.data.update(source="folder", name="", image_size=1024, augment_prob=0.12, hflip=False,
                batch_size=256)
  c.sampling.update(sampler="dpmpp_3m_sde", steps=50, eta=1.0, sigma_min=0.01)
  return c
