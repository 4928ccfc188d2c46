"""The default experiment config: every key that a config file may set, with its default.

Config files (`configs/*.py`) start from `base_config()` and change what differs, so that an
unknown key in a file or on the command line (`--config.model.widths=...`) is an error.
"""

import ast
from typing import Iterable

import ml_collections


def hdit_model(**overrides) -> ml_collections.ConfigDict:
  """Model section for an HDiT; defaults are k-diffusion's for image_transformer_v2."""
  model = ml_collections.ConfigDict(dict(
      type="hdit",
      input_size=(256, 256),
      input_channels=3,
      patch_size=(4, 4),
      depths=(2, 2, 16),
      widths=(384, 768, 1536),
      d_ffs=(),                      # empty: 3 x width per level
      attention=("neighborhood", "neighborhood", "global"),
      d_heads=(64, 64, 64),
      kernel_sizes=(7, 7, 7),        # used by neighborhood levels
      window_sizes=(8, 8, 8),        # used by shifted-window levels
      dropout_rate=(0.0, 0.0, 0.0),
      mapping_width=256,
      mapping_depth=2,
      mapping_d_ff=768,
      mapping_dropout_rate=0.0,
      mapping_cond_dim=0,
      num_classes=0,                 # dataset classes; the null class is num_classes
      feed_forward="geglu",          # 'gelu': ablation baseline
      position_embedding="rope",     # 'sincos': additive, ablation baseline
      skip="lerp",                   # 'add' | 'concat': ablation baselines
      dtype="bfloat16",              # compute dtype; parameters stay float32
      param_dtype="float32",
      remat=False,
      attention_implementation="",   # '' picks the best neighborhood-attention kernel
      qk_implementation="",          # q/k norm + RoPE: '' (mosaic_gpu on Hopper, else xla)
  ))
  # Per-level settings that the caller leaves out follow the number of levels it asks for.
  n = len(overrides.get("depths", model.depths))
  defaults = dict(attention=("neighborhood",) * (n - 1) + ("global",), d_heads=(64,) * n,
                  kernel_sizes=(7,) * n, window_sizes=(8,) * n, dropout_rate=(0.0,) * n)
  model.update({k: v for k, v in defaults.items() if k not in overrides})
  model.update(overrides)
  return model


def dit_model(variant: str = "B/4", **overrides) -> ml_collections.ConfigDict:
  """Model section for the pixel-space DiT baseline (adaLN-Zero)."""
  model = ml_collections.ConfigDict(dict(
      type="dit", variant=variant, input_size=(256, 256), input_channels=3, num_classes=0,
      learn_sigma=False, dtype="bfloat16", param_dtype="float32", remat=False))
  model.update(overrides)
  return model


# The paper's ablation ladder (section 5.1, table 1): each rung adds one change to the one
# before; the side variants change one part of the last rung.
ABLATION_LADDER = ("dit_b4", "hourglass", "natten", "geglu", "rope", "soft_min_snr")
ABLATION_SIDE = ("shifted_window", "skip_add", "skip_concat")


def ablation_model(variant: str, dit: ml_collections.ConfigDict, **hourglass):
  """(model section, loss weighting) of one ablation variant.

  `dit` is the first rung's model; `hourglass` the fields of the second rung (two levels,
  shifted windows then global attention, a GELU feed-forward with explicit d_ffs, additive
  sin-cos positions, lerp skips), which the later rungs change one at a time.
  """
  variants = ABLATION_LADDER + ABLATION_SIDE
  if variant not in variants:
    raise ValueError(f"unknown ablation variant {variant!r}; expected one of {variants}")
  if variant == "dit_b4":
    return dit, "snr"
  rung = ABLATION_LADDER.index(variant) if variant in ABLATION_LADDER else len(ABLATION_LADDER)
  fields = dict(hourglass, attention=("shifted-window", "global"), feed_forward="gelu",
                position_embedding="sincos", skip="lerp")
  if rung >= ABLATION_LADDER.index("natten"):
    fields["attention"] = ("neighborhood", "global")
  if rung >= ABLATION_LADDER.index("geglu"):
    fields.update(feed_forward="geglu", d_ffs=())
  if rung >= ABLATION_LADDER.index("rope"):
    fields["position_embedding"] = "rope"
  weighting = "soft-min-snr" if rung >= ABLATION_LADDER.index("soft_min_snr") else "snr"
  if variant == "shifted_window":
    fields["attention"] = ("shifted-window", "global")
  elif variant in ("skip_add", "skip_concat"):
    fields["skip"] = variant.removeprefix("skip_")
  return hdit_model(**fields), weighting


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = hdit_model()

  # EDM preconditioning, loss and training noise levels (k-diffusion's Denoiser).
  c.diffusion = ml_collections.ConfigDict(dict(
      sigma_data=0.5,
      sigma_min=0.01,
      sigma_max=160.0,
      loss_weighting="soft-min-snr",   # karras | soft-min-snr | snr
      loss_scales=1,                   # > 1: DCT-weighted multi-scale loss
      sigma_density=ml_collections.ConfigDict(dict(
          type="cosine-interpolated",  # lognormal | loglogistic | loguniform | v-diffusion | ...
          loc=-1.2, scale=1.2,         # lognormal / loglogistic
          min_value=1e-3, max_value=1e3,
          noise_d_low=32, noise_d_high=0,  # 0: the image size
      )),
      cond_dropout_rate=0.1,           # labels replaced by the null class (for guidance)
  ))

  c.optimizer = ml_collections.ConfigDict(dict(
      lr=5e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=1e-2,
      mapping_lr_scale=1 / 3,          # mapping network and AdaRMSNorm modulations
      grad_clip=1.0, warmup_steps=0))
  c.ema = ml_collections.ConfigDict(dict(power=0.75, max_value=0.9999))

  c.data = ml_collections.ConfigDict(dict(
      source="tfds",                   # tfds | prepared | folder | embedded | synthetic
      name="imagenet2012",             # tfds name, prepared or folder path, or embedded name
      split="train",
      data_dir="",                     # tfds data_dir ('' : the tfds default)
      image_size=256,
      fit="crop",                      # crop: resize and centre-crop | pad: centre, black border
      augment_prob=0.0,                # non-leaky augmentation (9-dim aug_cond)
      hflip=False,
      batch_size=256,                  # global batch
      num_workers=8,                   # grain worker processes per host
      read_threads=8,                  # threads reading records, per worker
      prefetch_buffer=128,             # records read ahead, per worker
  ))

  c.training = ml_collections.ConfigDict(dict(
      num_steps=1_000_000, grad_accum_steps=1, log_every=100, checkpoint_every=10_000,
      keep_checkpoints=3, keep_every=100_000, sample_every=10_000, num_sample_images=64,
      peak_tflops=0.0,                 # 0: from the device kind (for MFU)
      # Steps with non-finite gradients are skipped (parameters unchanged) and counted; more
      # than this many in a row at a log step stop the run (0: any skipped step does).
      max_consecutive_nonfinite=10,
      checkpoint_ocdbt=True,           # orbax's OCDBT format (off for the GCS emulator)
      # A failed request to GCS is retried this often (back-off 1 s .. 32 s) before the save
      # fails; a failed save is logged and counted, and training goes on unless more than
      # this many in a row failed (0: stop at the first). A failed last save always stops it.
      checkpoint_retries=10,
      max_consecutive_checkpoint_failures=2,
      # On several hosts: how long one waits for the others' word on a save's start or a
      # restore before it stops the job (they are stuck in orbax's barriers, which never end).
      checkpoint_host_timeout=300.0,
      profile_steps=(0, 0)))           # (first step, number of steps) to trace; 0 steps: off

  c.sampling = ml_collections.ConfigDict(dict(
      sampler="dpmpp_3m_sde", steps=50, eta=1.0, rho=7.0, guidance_scale=1.0,
      guidance_interval=(),            # (sigma_lo, sigma_hi): guide only inside; () everywhere
      sigma_min=0.01, sigma_max=0.0,   # 0: diffusion.sigma_max
      batch_size=0))                   # images per sampling call over all devices (0: 64)

  # Sample quality, from the EMA weights, every `every` steps and at the last step. Its own
  # sampler settings, fixed so that numbers compare across runs.
  c.evaluation = ml_collections.ConfigDict(dict(
      metric="",                       # '' off | 'fid' (Inception: fid, kid, ...) | 'digits'
      every=0,                         # steps between evaluations (0: only the last step)
      num_samples=50_000,
      seed=1,
      sampler="dpmpp_2m", steps=50, eta=1.0, guidance_scale=1.0, guidance_interval=(),
      batch_size=0,                    # images per sampling call (0: sampling.batch_size)
      inception_weights="",            # pytorch-fid's pt_inception-2015-12-05-6726825d.pth
      reference="",                    # stats / features / image npz or image folder; '': data
      reference_images=50_000,         # images of the training data when reference is ''
      kid=True,
      precision_recall=False))

  # Mesh axes; one of them -1 takes the devices that remain. dcn_data > 1: multislice.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, dcn_data=1))
  # Logical axis names of the parameters -> mesh axes (FSDP over `fsdp`, Megatron-style
  # splits over `tensor`); the batch is split over (data, fsdp).
  c.sharding_rules = (("embed", "fsdp"), ("mlp", "tensor"), ("qkv", "tensor"),
                      ("heads", "tensor"), ("mapping", None), ("classes", None))
  return c


def apply_overrides(config: ml_collections.ConfigDict, items: Iterable[str]):
  """Set `section.key=value` items: each value is read as a Python literal (`True`, `2e-4`,
  `(1, 2)`), or kept as a string where it is none. An unknown key, or a value of another type
  than the field's, is a ValueError naming the item."""
  for item in items:
    key, sep, text = item.partition("=")
    if not sep:
      raise ValueError(f"override {item!r}: expected section.key=value")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
      if not isinstance(node, ml_collections.ConfigDict) or name not in node:
        raise ValueError(f"override {item!r}: the config has no section {name!r}")
      node = node[name]
    if not isinstance(node, ml_collections.ConfigDict):
      raise ValueError(f"override {item!r}: {'.'.join(parents)} is a value, not a section")
    if leaf not in node:
      raise ValueError(f"override {item!r}: the config has no key {key!r}")
    try:
      node[leaf] = value
    except TypeError as e:   # ConfigDict keeps each field's type
      raise ValueError(f"override {item!r}: {e}") from None
  return config
