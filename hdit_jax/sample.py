"""Sample from a weight file: an `arr_0` npz of the images and labels, a grid, optional PNGs.

  # hdit-jax weights (training's EMA export or `convert import`): σ_data, σ_max and the sampler
  # defaults come from the file
  python -m hdit_jax.sample --weights=ema_00100000.safetensors --num_images=64 --out=samples
  # a k-diffusion checkpoint directly (its config supplies σ_data)
  python -m hdit_jax.sample --kdiffusion=model.safetensors --sampler=dpmpp_3m_sde --steps=50 \\
      --guidance_scale=1.4 --labels=207,360,387 --out=samples

The batch is split over every device of every host. `--image_size=H,W` samples at another
resolution than the trained one where the level structure divides it: HDiT's RoPE positions are
relative to the grid and neighborhood attention is local, so this works, but quality away from
the training resolution is not guaranteed (global levels see more or fewer tokens than in
training).
"""

import os

import jax
from absl import app, flags

from hdit_jax import cli
from hdit_jax.diffusion.samplers import SAMPLERS
from hdit_jax.sampling import batches, files, model_file
from hdit_jax.sampling.generate import SamplerSettings

_WEIGHTS = flags.DEFINE_string("weights", None, "An hdit-jax weight file.")
_KDIFF = flags.DEFINE_string("kdiffusion", None, "A k-diffusion checkpoint (safetensors).")
_KDIFF_CONFIG = flags.DEFINE_string("kdiffusion_config", None, "Its JSON config, if separate.")
_ALLOW_PICKLE = flags.DEFINE_bool("allow_pickle", False, "Allow a pickled .pth checkpoint.")
_OUT = flags.DEFINE_string("out", "samples", "Output directory (local or gs://).")
_NAME = flags.DEFINE_string("name", "samples", "Output names: NAME.npz, NAME.png, NAME/.")
_NUM = flags.DEFINE_integer("num_images", 16, "Number of images.")
_PNGS = flags.DEFINE_bool("pngs", False, "Also write one PNG per image (OUT/NAME/000000.png).")
_LABELS = flags.DEFINE_list("labels", [], "Class labels, repeated to num_images; default random.")
_SAMPLER = flags.DEFINE_enum("sampler", None, sorted(SAMPLERS), "Sampler (default: the file's).")
_STEPS = flags.DEFINE_integer("steps", None, "Sampling steps (default: the file's).")
_SIGMA_MIN = flags.DEFINE_float("sigma_min", None, "Smallest noise level (default: the file's).")
_SIGMA_MAX = flags.DEFINE_float("sigma_max", None, "Largest noise level (default: the file's).")
_RHO = flags.DEFINE_float("rho", None, "Karras schedule rho.")
_ETA = flags.DEFINE_float("eta", None, "Ancestral / SDE noise (eta).")
_SIGMA_DATA = flags.DEFINE_float("sigma_data", None, "σ_data (default: the file's).")
_GUIDANCE = flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance scale.")
_INTERVAL = flags.DEFINE_list("guidance_interval", None, "sigma_lo,sigma_hi: guide only inside.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed: image i depends on the seed and i alone.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Images per sampling call (default 64), "
                               "rounded up to a multiple of the devices.")
_SIZE = flags.DEFINE_list("image_size", [], "H,W to sample at (default: the trained size).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype.")


def _numbers(flag: flags.FlagHolder, kind: type, what: str) -> list:
  """A list flag's values as `kind`s, or a usage error naming the flag and what it takes."""
  try:
    return [kind(v) for v in flag.value]
  except ValueError:
    raise app.UsageError(f"--{flag.name} takes {what}, got {','.join(flag.value)!r}") from None


def _check_out(out: str) -> None:
  """--out must be a directory, or a path where one can be made: checked before the model is
  loaded (a file in the way was otherwise found only when the npz was opened, as a traceback)."""
  if "://" in out:
    return
  existing = cli.existing_ancestor(out)
  if not os.path.isdir(existing):
    raise app.UsageError(f"--out={out}: {existing} is a file, not a directory; give a directory "
                         "(it is made if missing)")


def _settings(config) -> SamplerSettings:
  interval = None
  if _INTERVAL.value is not None:
    interval = tuple(_numbers(_INTERVAL, float, "two noise levels: sigma_lo,sigma_hi"))
    if len(interval) != 2:
      raise app.UsageError("--guidance_interval takes two noise levels: sigma_lo,sigma_hi")
  overrides = dict(sampler=_SAMPLER.value, steps=_STEPS.value, sigma_min=_SIGMA_MIN.value,
                   sigma_max=_SIGMA_MAX.value, rho=_RHO.value, eta=_ETA.value,
                   sigma_data=_SIGMA_DATA.value, guidance_scale=_GUIDANCE.value,
                   guidance_interval=interval)
  try:
    return SamplerSettings.from_config(config, **overrides)
  except ValueError as e:
    raise app.UsageError(str(e)) from e


def main(argv):
  """The command; a missing or unusable input file or value ends it in one line (exit 2)."""
  try:
    _main(argv)
  except (FileNotFoundError, ValueError, app.UsageError) as e:   # one line, not the whole help
    cli.exit_with_error(str(e))


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {' '.join(argv[1:])!r}: every input is a flag "
                         "(--weights=FILE ...)")
  if bool(_WEIGHTS.value) == bool(_KDIFF.value):
    raise app.UsageError("give exactly one of --weights and --kdiffusion")
  if _NUM.value < 1:
    raise app.UsageError(f"--num_images must be at least 1, got {_NUM.value}")
  if _BATCH.value is not None and _BATCH.value < 1:
    raise app.UsageError(f"--batch_size must be at least 1, got {_BATCH.value} (leave it out "
                         "for the default, 64)")
  labels = _numbers(_LABELS, int, "class numbers separated by commas, e.g. 207,360") or None
  image_size = tuple(_numbers(_SIZE, int, "the height and width in pixels: H,W")) or None
  if image_size and len(image_size) != 2:
    raise app.UsageError(f"--image_size takes the height and width in pixels: H,W, got "
                         f"{','.join(_SIZE.value)!r}")
  _check_out(_OUT.value)
  model, config = model_file.load_model_file(
      weights_path=_WEIGHTS.value, kdiffusion=_KDIFF.value,
      kdiffusion_config=_KDIFF_CONFIG.value, allow_pickle=_ALLOW_PICKLE.value,
      dtype=_DTYPE.value)
  settings = _settings(config)
  if jax.process_index() == 0:
    print(f"sampling with {settings}")
  conditional = bool(config.model.get("num_classes", 0))
  if settings.guidance_scale != 1.0 and not conditional:
    raise app.UsageError(f"--guidance_scale {settings.guidance_scale}: the model is "
                         "unconditional, guidance needs a class-conditional model")
  if image_size:
    from hdit_jax.models.spec import hdit_spec_from_config  # pylint: disable=import-outside-toplevel
    if config.model.get("type", "hdit") == "hdit":
      hdit_spec_from_config(config.model).token_grids(*image_size)   # a clear error if it can't
  shape = tuple(image_size or config.model.input_size) + (int(config.model.input_channels),)
  stream = batches.sample_batches(model, config, _NUM.value, _SEED.value, labels=labels,
                                  batch_size=_BATCH.value or 0, image_size=image_size,
                                  settings=settings)
  for _ in files.write_samples(stream, _NUM.value, shape, _OUT.value, _NAME.value,
                               conditional=conditional, pngs=_PNGS.value,
                               write=jax.process_index() == 0):
    pass
  if jax.process_index() == 0:
    target = os.path.join(_OUT.value, _NAME.value)
    print(f"wrote {_NUM.value} images: {target}.npz (arr_0 images, arr_1 labels), grid "
          f"{target}.png{' and PNGs in ' + target + '/' if _PNGS.value else ''}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
