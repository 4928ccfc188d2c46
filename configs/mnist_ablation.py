"""The paper's ablation ladder (section 5.1, table 1) at digit scale: one variant per rung.

  --config=configs/mnist_ablation.py:VARIANT   with VARIANT one of
  dit_b4          DiT "B/2" shrunk: 12 layers of width 128 (4 heads) on 16x16 patches
  hourglass       + hourglass: 2 levels (2 layers of width 64 on 16x16 tokens with shifted
                    windows 8x8, then 11 of width 128 on 8x8 with global attention),
                    GELU feed-forward (4x), additive sin-cos positions, snr weighting
  natten          + neighborhood attention (7x7) in place of shifted windows
  geglu           + GEGLU feed-forward (d_ff 3x width)
  rope            + axial RoPE in place of additive positions
  soft_min_snr    + soft-min-snr loss weighting (the final HDiT recipe)
  shifted_window  side variant: the final recipe with shifted windows in place of NA
  skip_add        side variant: the final recipe with additive skips in place of lerp
  skip_concat     side variant: the final recipe with concatenated skips + linear

The shapes follow configs/imagenet128_ablation.py at a sixth of the width and a quarter of the
side: the 5,000 embedded MNIST digits padded to 32x32 (1 channel, 10 classes), patch 2, so the
token grids are 16x16 and 8x8 as the paper's 32x32 and 16x16 are at 128x128 with patch 4.
Every rung shares one optimizer recipe (the paper's, with a higher learning rate for the small
widths) and trains on the same images; `benchmarks/ablation.py` trains and scores them all.
"""

from hdit_jax.config import ablation_model, base_config, dit_model


def get_config(arg=None):
  c = base_config()
  c.model, c.diffusion.loss_weighting = ablation_model(
      arg or "soft_min_snr",
      dit_model(depth=12, width=128, num_heads=4, patch_size=2, input_size=(32, 32),
                input_channels=1, num_classes=10),
      input_size=(32, 32), input_channels=1, patch_size=(2, 2), depths=(2, 11),
      widths=(64, 128), d_ffs=(256, 512), d_heads=(32, 32), kernel_sizes=(7, 7),
      window_sizes=(8, 8), dropout_rate=(0.0, 0.0), mapping_width=128, mapping_depth=1,
      mapping_d_ff=384, num_classes=10)
  # sigma_data: the standard deviation of the padded digits in [-1, 1].
  c.diffusion.update(sigma_data=0.55, sigma_min=0.01, sigma_max=80.0)
  c.optimizer.update(lr=1e-3, b1=0.9, b2=0.95, weight_decay=1e-2, warmup_steps=200)
  c.data.update(source="embedded", name="mnist", image_size=32, fit="pad", batch_size=64,
                num_workers=0)
  c.training.update(num_steps=2500, log_every=50, checkpoint_every=2500, sample_every=2500,
                    num_sample_images=50)
  c.sampling.update(sampler="dpmpp_2m", steps=25, sigma_min=0.01, guidance_scale=1.0)
  c.evaluation.update(metric="digits", num_samples=2000, sampler="dpmpp_2m", steps=25,
                      guidance_scale=1.0)
  return c
