"""Sample from a weight file: a PNG grid and an .npz of the images (and their labels).

  # hdit-jax weights (from training's EMA export or `convert import`)
  python -m hdit_jax.sample --weights=ema_00100000.safetensors --num_images=64 --out=samples
  # a k-diffusion checkpoint directly (its config supplies sigma_data)
  python -m hdit_jax.sample --kdiffusion=model.safetensors --sampler=dpmpp_3m_sde --steps=50 \
      --guidance_scale=1.4 --labels=207,360,387 --out=samples

The batch is split over all local devices. `--image_size=H,W` samples at another resolution
than the trained one where the level structure divides it: HDiT's RoPE positions are relative
to the grid and neighborhood attention is local, so this works, but quality away from the
training resolution is not guaranteed (global levels see more or fewer tokens than in training).
"""

import os

import jax
import numpy as np
from absl import app, flags

from hdit_jax import convert
from hdit_jax.config import base_config
from hdit_jax.diffusion.samplers import SAMPLERS
from hdit_jax.sampling import cli

_WEIGHTS = flags.DEFINE_string("weights", None, "An hdit-jax weight file.")
_KDIFF = flags.DEFINE_string("kdiffusion", None, "A k-diffusion checkpoint (safetensors).")
_KDIFF_CONFIG = flags.DEFINE_string("kdiffusion_config", None, "Its JSON config, if separate.")
_ALLOW_PICKLE = flags.DEFINE_bool("allow_pickle", False, "Allow a pickled .pth checkpoint.")
_OUT = flags.DEFINE_string("out", "samples", "Output directory (local or gs://).")
_NAME = flags.DEFINE_string("name", "samples", "Output file names (NAME.png, NAME.npz).")
_NUM = flags.DEFINE_integer("num_images", 16, "Number of images.")
_LABELS = flags.DEFINE_list("labels", [], "Class labels, repeated to num_images; default random.")
_SAMPLER = flags.DEFINE_enum("sampler", "dpmpp_3m_sde", sorted(SAMPLERS), "Sampler.")
_STEPS = flags.DEFINE_integer("steps", 50, "Sampling steps (Karras schedule).")
_SIGMA_MIN = flags.DEFINE_float("sigma_min", 0.01, "Smallest noise level.")
_SIGMA_MAX = flags.DEFINE_float("sigma_max", 160.0, "Largest noise level.")
_RHO = flags.DEFINE_float("rho", 7.0, "Karras schedule rho.")
_ETA = flags.DEFINE_float("eta", 1.0, "Ancestral / SDE noise (eta).")
_SIGMA_DATA = flags.DEFINE_float("sigma_data", 0.5, "sigma_data (for --weights).")
_GUIDANCE = flags.DEFINE_float("guidance_scale", 1.0, "Classifier-free guidance scale.")
_INTERVAL = flags.DEFINE_list("guidance_interval", [], "sigma_lo,sigma_hi: guide only inside.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Images per device batch round (0: auto).")
_SIZE = flags.DEFINE_list("image_size", [], "H,W to sample at (default: the trained size).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")


def main(argv):
  del argv
  if bool(_WEIGHTS.value) == bool(_KDIFF.value):
    raise app.UsageError("give exactly one of --weights and --kdiffusion")
  sigma_data = _SIGMA_DATA.value
  if _WEIGHTS.value:
    model, model_cfg = convert.load_weights(_WEIGHTS.value, dtype=_DTYPE.value)
  else:
    kdiff_config, _ = convert.read_kdiffusion_checkpoint(
        _KDIFF.value, _KDIFF_CONFIG.value, allow_pickle=_ALLOW_PICKLE.value)
    sigma_data = float(kdiff_config["model"].get("sigma_data", 1.0))
    model, model_cfg = convert.model_from_kdiffusion(
        _KDIFF.value, _KDIFF_CONFIG.value, allow_pickle=_ALLOW_PICKLE.value, dtype=_DTYPE.value)
  config = base_config()
  config.model = model_cfg
  config.diffusion.update(sigma_data=sigma_data, sigma_max=_SIGMA_MAX.value)
  config.sampling.update(sampler=_SAMPLER.value, steps=_STEPS.value, eta=_ETA.value,
                         rho=_RHO.value, guidance_scale=_GUIDANCE.value,
                         guidance_interval=tuple(float(v) for v in _INTERVAL.value),
                         sigma_min=_SIGMA_MIN.value, sigma_max=_SIGMA_MAX.value)
  num_classes = int(model_cfg.get("num_classes", 0))
  labels = None
  if _LABELS.value:
    if not num_classes:
      raise app.UsageError("--labels given, but the model is unconditional")
    labels = np.resize(np.asarray([int(v) for v in _LABELS.value], np.int32), _NUM.value)
    if labels.min() < 0 or labels.max() > num_classes:
      raise app.UsageError(f"labels must be in [0, {num_classes}] ({num_classes} = null class)")
  image_size = tuple(int(v) for v in _SIZE.value) or None
  if image_size:
    from hdit_jax.models.spec import hdit_spec_from_config  # pylint: disable=import-outside-toplevel
    if model_cfg.get("type", "hdit") == "hdit":
      hdit_spec_from_config(model_cfg).token_grids(*image_size)   # a clear error if it can't
  images, labels = cli.sample_images(model, config, _NUM.value, _SEED.value,
                                     batch_size=_BATCH.value or None, labels=labels,
                                     image_size=image_size)
  if jax.process_index() == 0:
    cli.write_outputs(images, labels, _OUT.value, _NAME.value)
    print(f"wrote {os.path.join(_OUT.value, _NAME.value)}.png and .npz")


if __name__ == "__main__":
  app.run(main)
