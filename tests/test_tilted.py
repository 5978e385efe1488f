"""Tests for jaxrm.math.tilted: the KL-regularised optimum from pi_init samples (SNIS)."""

import jax
import numpy as np
import pytest

from jaxrm.math import tilted


def _numpy_reference(r, v, beta):
  """Float64 SNIS: E_w[v], E_w[r]/beta - log mean exp(r/beta), 1/sum w^2 (last axis)."""
  r, v = np.asarray(r, np.float64), np.asarray(v, np.float64)
  s = r / beta
  m = s.max(-1, keepdims=True)
  e = np.exp(s - m)
  w = e / e.sum(-1, keepdims=True)
  kl = (w * s).sum(-1) - (np.log(e.mean(-1)) + m[..., 0])
  return (w * v).sum(-1), kl, 1.0 / (w**2).sum(-1)


def test_matches_numpy_float64_per_prompt_and_beta():
  rng = np.random.default_rng(0)
  r, v = rng.normal(size=(3, 500)), rng.normal(size=(3, 500))
  betas = np.array([0.1, 0.5, 2.0, 50.0])
  with jax.enable_x64(True):
    out = tilted.tilted_optimum(r, v, betas)
    for k, beta in enumerate(betas):
      value, kl, ess = _numpy_reference(r, v, beta)
      np.testing.assert_allclose(out["value"][k], value, rtol=1e-10)
      np.testing.assert_allclose(out["kl"][k], kl, rtol=1e-8, atol=1e-12)
      np.testing.assert_allclose(out["ess"][k], ess, rtol=1e-10)
  # float32 inputs (the study's scores) agree to float32 precision.
  out32 = tilted.tilted_optimum(r.astype(np.float32), v.astype(np.float32), betas)
  value, kl, ess = _numpy_reference(r, v, 0.5)
  np.testing.assert_allclose(out32["kl"][1], kl, rtol=1e-3, atol=1e-5)
  np.testing.assert_allclose(out32["value"][1], value, rtol=1e-4, atol=1e-5)


def test_exactly_solvable_discrete_case():
  # pi_init on 3 outcomes with probabilities (1/2, 1/4, 1/4), given as a sample list that holds
  # each outcome in exact proportion: SNIS is then exact, and pi_beta = p exp(r/beta) / Z.
  p = np.array([0.5, 0.25, 0.25])
  r_out, v_out = np.array([0.0, 1.0, 3.0]), np.array([2.0, -1.0, 5.0])
  idx = np.array([0, 0, 1, 2])
  for beta in (0.3, 1.0, 4.0):
    q = p * np.exp(r_out / beta)
    q /= q.sum()
    with jax.enable_x64(True):
      out = tilted.tilted_optimum(r_out[idx], v_out[idx], np.array([beta]))
    np.testing.assert_allclose(out["value"][0], q @ v_out, rtol=1e-12)
    np.testing.assert_allclose(out["kl"][0], np.sum(q * np.log(q / p)), rtol=1e-10)
  # The same through counts (multiplicities) instead of repeated samples.
  with jax.enable_x64(True):
    a = tilted.tilted_optimum(r_out[idx], v_out[idx], np.array([0.7]))
    b = tilted.tilted_optimum(r_out, v_out, np.array([0.7]), counts=np.array([2.0, 1.0, 1.0]))
  for k in ("value", "kl", "ess"):
    np.testing.assert_allclose(a[k], b[k], rtol=1e-12)


def test_limits_and_several_values():
  r = np.array([[0.0, 1.0, 2.0, 3.0]])
  out = tilted.tilted_optimum(r, np.stack([r, 2 * r]), np.array([1e6, 1e-3]))
  np.testing.assert_allclose(out["kl"][0], 0.0, atol=1e-5)  # beta -> inf: pi_init
  np.testing.assert_allclose(out["ess"][0], 4.0, rtol=1e-4)
  np.testing.assert_allclose(out["kl"][1], np.log(4.0), rtol=1e-4)  # beta -> 0: argmax
  np.testing.assert_allclose(out["ess"][1], 1.0, rtol=1e-4)
  np.testing.assert_allclose(out["value"][1, :, 0], [3.0, 6.0], rtol=1e-4)
  w = tilted.tilted_weights(r, np.array([1.0]))
  np.testing.assert_allclose(w[0, 0], np.exp(r[0]) / np.exp(r[0]).sum(), rtol=1e-6)


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(reward=np.zeros(3), values=np.zeros(3), betas=np.array([0.0])), "betas must all be > 0"),
    (dict(reward=np.zeros(3), values=np.zeros(4), betas=np.array([1.0])), "values must have"),
    (dict(reward=np.array([0, np.nan]), values=np.zeros(2), betas=np.ones(1)), "reward"),
    (dict(reward=np.zeros(3), values=np.zeros(3), betas=np.ones((1, 1))), "betas must have"),
    (
      dict(reward=np.zeros(3), values=np.zeros(3), betas=np.ones(1), counts=np.ones(2)),
      "counts must have",
    ),
    (
      dict(reward=np.zeros(3), values=np.zeros(3), betas=np.ones(1), counts=np.array([1, -1, 2])),
      r"counts must lie in \[0, inf\], got -1.0 at index \(1,\)",
    ),
  ],
)
def test_bad_input_is_named(kwargs, message):
  with pytest.raises(ValueError, match=message):
    tilted.tilted_optimum(**kwargs)
