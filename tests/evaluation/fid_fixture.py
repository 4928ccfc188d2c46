"""The FID Inception fixture (folder from HDIT_FID_FIXTURES, see its README) and its weights,
rebuilt by the published rule and written as safetensors, for tests that need the network."""

import json
import os
import pathlib

import numpy as np
import pytest
from safetensors import numpy as st_numpy

DEFAULT_FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures" / "fid_inception"


@pytest.fixture(scope="session")
def fixture():
  """(the fixture's JSON, its tensors)."""
  root = pathlib.Path(os.environ.get("HDIT_FID_FIXTURES", DEFAULT_FIXTURES))
  if not root.is_dir():
    raise FileNotFoundError(f"fixture folder not found: {root} (HDIT_FID_FIXTURES)")
  with open(root / "fid_fixture.json") as f:
    meta = json.load(f)
  return meta, st_numpy.load_file(str(root / "fid_fixture.safetensors"))


def rebuild_weights(meta) -> dict[str, np.ndarray]:
  """The README's rule: one generator for the whole `fill` list, drawn in order."""
  rng = np.random.default_rng(meta["seed"])
  out = {}
  for entry in meta["fill"]:
    z = rng.standard_normal(entry["shape"])
    if entry["abs"]:
      z = np.abs(z)
    out[entry["key"]] = np.float32(entry["offset"] + entry["scale"] * z)
  return out


@pytest.fixture(scope="session")
def state_dict(fixture):
  return rebuild_weights(fixture[0])


@pytest.fixture(scope="session")
def weights_path(state_dict, tmp_path_factory):
  path = tmp_path_factory.mktemp("fid_weights") / "inception.safetensors"
  st_numpy.save_file(state_dict, str(path))
  return path
