"""The paper's ImageNet-128 ablation ladder (section 5.1, table 1), one variant per row.

  --config=configs/imagenet128_ablation.py:VARIANT   with VARIANT one of
  dit_b4          DiT-B/4 in pixel space (adaLN-Zero), 106.4 GMACs
  hourglass       + hourglass: 2 levels (shifted windows 8x8, then global), GELU FFN,
                    additive sin-cos positions, snr weighting
  natten          + neighborhood attention (7x7) in place of shifted windows
  geglu           + GEGLU feed-forward (d_ff 3x width)
  rope            + axial RoPE in place of additive positions
  soft_min_snr    + soft-min-snr loss weighting: HDiT-B/4, 31.4 GMACs (the final recipe)
  shifted_window  side variant: the final recipe with shifted windows in place of NA
  skip_add        side variant: the final recipe with additive skips in place of lerp
  skip_concat     side variant: the final recipe with concatenated skips + linear

All rows: ImageNet 128x128, patch 4, mapping network width 768 and depth 1, AdamW 5e-4
(0.9, 0.95), weight decay 1e-2, EMA power 0.75, class dropout 0.1.
"""

from hdit_jax.config import ablation_model, base_config, dit_model, hdit_model


def get_config(arg=None):
  c = base_config()
  c.model, c.diffusion.loss_weighting = ablation_model(
      arg or "soft_min_snr", dit_model("B/4", input_size=(128, 128), num_classes=1000),
      input_size=(128, 128), patch_size=(4, 4), depths=(2, 11), widths=(384, 768),
      d_ffs=(1536, 3072), d_heads=(64, 64), kernel_sizes=(7, 7), window_sizes=(8, 8),
      dropout_rate=(0.0, 0.0), mapping_width=768, mapping_depth=1, mapping_d_ff=2304,
      num_classes=1000)
  c.diffusion.sigma_max = 160.0
  c.optimizer.update(lr=5e-4, b1=0.9, b2=0.95, weight_decay=1e-2)
  c.data.update(source="tfds", name="imagenet2012", image_size=128, batch_size=256)
  return c
