"""FID, KID and precision/recall between two image sets, and Inception features of one.

  python -m hdit_jax.evaluate fid --inception_weights=pt_inception-2015-12-05-6726825d.pth \\
      --samples=samples/samples.npz --reference=imagenet256_stats.npz --json
  python -m hdit_jax.evaluate features --inception_weights=W --images=DIR_OR_NPZ --out=F.npz \\
      [--save_stats=S.npz]

A set is an image npz (`arr_0`, uint8 NHWC), a folder of images, a features npz (`features`) or
a statistics npz (`mu`, `sigma`). KID and precision/recall need features on both sides; with a
statistics file only FID is computed. Images are preprocessed exactly as pytorch-fid does (uint8
-> /255 -> bilinear resize to 299 without antialiasing -> 2x - 1) and run on every local device.
"""

import json
import sys

import jax
from absl import app, flags

from hdit_jax import cli
from hdit_jax.evaluation import inputs, metrics
from hdit_jax.evaluation.evaluator import features_of
from hdit_jax.evaluation.inception import InceptionFeatures, load_inception

_WEIGHTS = flags.DEFINE_string("inception_weights", None, "pytorch-fid's Inception weights: "
                               "pt_inception-2015-12-05-6726825d.pth or its safetensors form.")
_SAMPLES = flags.DEFINE_string("samples", None, "fid: the generated set.")
_REFERENCE = flags.DEFINE_string("reference", None, "fid: the reference (real) set.")
_IMAGES = flags.DEFINE_string("images", None, "features: the image set.")
_OUT = flags.DEFINE_string("out", None, "features: where to write the features npz.")
_SAVE_STATS = flags.DEFINE_string("save_stats", None, "Write the statistics (mu, sigma) of the "
                                  "reference (fid) or of the images (features) to this npz.")
_BATCH = flags.DEFINE_integer("batch_size", 100, "Images per Inception call.")
_KID = flags.DEFINE_bool("kid", True, "fid: also compute KID (needs features of both sets).")
_PR = flags.DEFINE_bool("precision_recall", False, "fid: also compute precision and recall "
                        "(k = 3; needs features of both sets).")
_JSON = flags.DEFINE_bool("json", False, "fid: print one JSON object instead of a table.")


class _Features:
  """Inception features of sets, with the network loaded on first use."""

  def __init__(self, weights: str | None):
    self._weights, self._extract = weights, None

  def of(self, path: str) -> inputs.FeatureSet:
    found = inputs.read_set(path)
    if isinstance(found, inputs.FeatureSet):
      return found
    if self._extract is None:
      if not self._weights:
        raise app.UsageError(f"{path} holds images: --inception_weights is needed")
      self._extract = InceptionFeatures(load_inception(self._weights))
    print(f"Inception features of {found.num_images} images in {path}", file=sys.stderr)
    return inputs.FeatureSet(path, features=features_of(
        self._extract, found.batches(_BATCH.value), found.num_images))


def _statistics(found: inputs.FeatureSet):
  if found.features is None:
    return found.mu, found.sigma
  return metrics.statistics(found.features)


def _fid(features: _Features) -> None:
  if not _SAMPLES.value or not _REFERENCE.value:
    raise app.UsageError("fid needs --samples and --reference")
  reference, samples = features.of(_REFERENCE.value), features.of(_SAMPLES.value)
  if _SAVE_STATS.value and jax.process_index() == 0:
    mu, sigma = _statistics(reference)
    inputs.save_statistics(_SAVE_STATS.value, mu, sigma,
                           0 if reference.features is None else len(reference.features))
  if reference.features is not None and samples.features is not None:
    result = metrics.all_metrics(reference.features, samples.features, kid=_KID.value,
                                 precision_recall=_PR.value)
  else:
    if _PR.value:
      print("precision/recall skipped: a statistics file has no features", file=sys.stderr)
    result = {"fid": metrics.frechet_distance(*_statistics(reference), *_statistics(samples))}
  if _JSON.value:
    print(json.dumps(result))
  else:
    for name, value in result.items():
      print(f"{name:>10s}  {value:.6g}")


def _features(features: _Features) -> None:
  if not _IMAGES.value or not (_OUT.value or _SAVE_STATS.value):
    raise app.UsageError("features needs --images and --out (and/or --save_stats)")
  found = features.of(_IMAGES.value)
  if jax.process_index() != 0:
    return
  if _OUT.value:
    if found.features is None:
      raise app.UsageError(f"{_IMAGES.value} holds statistics, not features or images")
    inputs.save_features(_OUT.value, found.features)
    print(f"wrote {_OUT.value}: features {found.features.shape}")
  if _SAVE_STATS.value:
    mu, sigma = _statistics(found)
    inputs.save_statistics(_SAVE_STATS.value, mu, sigma,
                           0 if found.features is None else len(found.features))
    print(f"wrote {_SAVE_STATS.value}: mu {mu.shape}, sigma {sigma.shape}")


SUBCOMMANDS = {"fid": _fid, "features": _features}


def _subcommand(args: list[str]):
  valid = " or ".join(SUBCOMMANDS)
  if not args:
    raise app.UsageError(f"give a subcommand, {valid}: python -m hdit_jax.evaluate "
                         "fid|features --inception_weights=W ...")
  if args[0] not in SUBCOMMANDS:
    raise app.UsageError(f"unknown subcommand {args[0]!r}: use {valid}")
  if len(args) > 1:
    raise app.UsageError(f"unexpected arguments after {args[0]}: {' '.join(args[1:])!r} "
                         "(the sets are flags: --samples=..., --reference=..., --images=...)")
  return SUBCOMMANDS[args[0]]


def main(argv):
  try:
    _subcommand(argv[1:])(_Features(_WEIGHTS.value))
  except (FileNotFoundError, ValueError, app.UsageError) as e:   # one line, not the whole help
    cli.exit_with_error(str(e))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
