"""Losses and weightings against the official Denoiser.loss outputs in the fixture."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from hdit_jax import convert
from hdit_jax.diffusion import losses

NHWC = (0, 2, 3, 1)


@pytest.fixture(scope="module")
def setup(kdiff):
  config = kdiff.json("hdit_config.json")
  io = kdiff.tensors("hdit_io.safetensors")
  model, _ = convert.model_from_kdiffusion(kdiff.path("hdit_weights.safetensors"))
  cond = {"aug_cond": io["input.aug_cond"]} if "input.aug_cond" in io else {}
  if "input.class_cond" in io:
    cond["class_cond"] = io["input.class_cond"].astype(np.int32)
  return config, io, model, cond


@pytest.mark.parity
def test_every_fixture_loss(setup):
  config, io, model, cond = setup
  sigma_data = float(config["denoiser"]["sigma_data"])
  x0, noise = np.transpose(io["input.x0"], NHWC), np.transpose(io["input.noise"], NHWC)
  checked = 0
  for entry in config["denoiser"]["losses"]:
    key = entry["key"]
    if key not in io:   # optional losses
      continue
    if entry["wrapper"] == "SimpleLossDenoiser":
      got = losses.simple_loss(model, x0, noise, io["input.sigma"], sigma_data, **cond)
    else:
      got = losses.diffusion_loss(model, x0, noise, io["input.sigma"], sigma_data,
                                  entry["weighting"], entry.get("scales", 1), **cond)
      weight_key = "weight." + key.split(".", 1)[1]
      if weight_key in io:
        np.testing.assert_allclose(
            losses.loss_weight(io["input.sigma"], sigma_data, entry["weighting"]),
            io[weight_key], rtol=1e-6)
    np.testing.assert_allclose(got, io[key], rtol=1e-5, err_msg=key)
    checked += 1
  assert checked >= 4


def test_dct_matrix_is_orthonormal_dct_ii():
  m = losses.dct_matrix(7)
  np.testing.assert_allclose(m @ m.T, np.eye(7), atol=1e-12)
  x = np.random.default_rng(0).normal(size=7)
  # DCT-II by its definition, orthonormal scaling.
  n = np.arange(7)
  ref = np.array([np.sum(x * np.cos(np.pi * (2 * n + 1) * k / 14)) for k in range(7)])
  ref *= np.sqrt(2 / 7)
  ref[0] /= np.sqrt(2)
  np.testing.assert_allclose(m @ x, ref, atol=1e-12)


def test_weightings_closed_form():
  sigma = jnp.array([0.01, 0.5, 3.0, 80.0])
  sd = 0.6
  np.testing.assert_allclose(losses.loss_weight(sigma, sd, "karras"), 1.0)
  np.testing.assert_allclose(losses.loss_weight(sigma, sd, "snr"), sd**2 / (sigma**2 + sd**2),
                             rtol=1e-6)
  # soft-min-snr is 1/(sigma^2 + sd^2) in x0 space: w / c_out^2.
  c_out2 = (sigma * sd) ** 2 / (sigma**2 + sd**2)
  np.testing.assert_allclose(losses.loss_weight(sigma, sd, "soft-min-snr") / c_out2,
                             1 / (sigma**2 + sd**2), rtol=1e-5)
  with pytest.raises(ValueError, match="min-snr-5"):
    losses.loss_weight(sigma, sd, "min-snr-5")


def test_drop_labels_rate():
  labels = jnp.zeros((20000,), jnp.int32)
  dropped = losses.drop_labels(jax.random.key(0), labels, 10, 0.1)
  frac = float(jnp.mean(dropped == 10))
  assert 0.09 < frac < 0.11
  assert set(np.unique(dropped)) <= {0, 10}
  assert losses.drop_labels(jax.random.key(0), labels, 10, 0.0) is labels
