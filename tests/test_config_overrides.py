"""`apply_overrides`: the `section.key=value` changes that the benchmark harnesses take."""

import importlib.util
import pathlib

import pytest

from hdit_jax.config import apply_overrides, base_config

ROOT = pathlib.Path(__file__).parent.parent


def test_values_are_read_as_literals_and_set_in_their_section():
  config = apply_overrides(base_config(), [
      "model.remat=True", "model.depths=(1, 2, 3)", "optimizer.lr=2e-4",
      "model.attention_implementation=mosaic_gpu", "sampling.steps=7"])
  assert config.model.remat is True
  assert tuple(config.model.depths) == (1, 2, 3)
  assert config.optimizer.lr == pytest.approx(2e-4)
  assert config.model.attention_implementation == "mosaic_gpu"   # not a literal: a string
  assert config.sampling.steps == 7
  assert base_config().model.remat is False   # a fresh config is untouched


@pytest.mark.parametrize("item, message", [
    ("model.scan=True", "no key 'model.scan'"),
    ("modle.remat=True", "no section 'modle'"),
    ("model.remat", "expected section.key=value"),
    ("model.remat.deep=1", "model.remat is a value"),
    ("sampling.steps=many", "cannot be casted to type <class 'int'>"),   # the field's type
])
def test_bad_overrides_name_the_problem(item, message):
  with pytest.raises(ValueError, match=message):
    apply_overrides(base_config(), [item])


def _benchmark(name):
  spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_train_throughput_applies_them_to_each_case():
  module = _benchmark("train_throughput")
  plain = module.case_config("quickstart", 8)
  changed = module.case_config("quickstart", 8, ["model.remat=True", "optimizer.lr=1e-3"])
  assert not plain.model.remat and changed.model.remat
  assert changed.optimizer.lr == pytest.approx(1e-3) != plain.optimizer.lr
  assert changed.data.batch_size == 8 and changed.data.source == "synthetic"


@pytest.mark.parametrize("item", ["data.batch_size=32", "data.source=tfds", "mesh.data=2"])
def test_train_throughput_refuses_what_it_sets_itself(item):
  with pytest.raises(ValueError, match="set by the harness"):
    _benchmark("train_throughput").case_config("quickstart", 8, [item])


@pytest.mark.parametrize("item", ["sampling.steps=10", "sampling.batch_size=8"])
def test_sample_throughput_refuses_what_it_sets_itself(item):
  with pytest.raises(ValueError, match="set by the harness"):
    _benchmark("sample_throughput").check_overrides([item])
