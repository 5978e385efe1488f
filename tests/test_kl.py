"""Tests for jaxrm.math.kl: per-token KL estimators, exact KL from logits, masked sequence sums."""

import functools

import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from jaxrm.math import kl


def _np_log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_kl(logits, ref_logits):
  logp, ref_logp = _np_log_softmax(logits), _np_log_softmax(ref_logits)
  return np.sum(np.exp(logp) * (logp - ref_logp), axis=-1)


def _random_pair(seed, vocab, scale=1.5):
  rng = np.random.default_rng(seed)
  return scale * rng.normal(size=vocab), scale * rng.normal(size=vocab)


def test_estimators_match_numpy_formulas():
  rng = np.random.default_rng(0)
  logp = np.log(rng.uniform(0.01, 1.0, size=(4, 7)))
  ref_logp = np.log(rng.uniform(0.01, 1.0, size=(4, 7)))
  log_rho = ref_logp - logp
  expected = {
    "k1": -log_rho,
    "k2": 0.5 * log_rho**2,
    "k3": np.exp(log_rho) - 1.0 - log_rho,
  }
  with jax.enable_x64(True):
    for name, fn in [("k1", kl.kl_k1), ("k2", kl.kl_k2), ("k3", kl.kl_k3)]:
      np.testing.assert_allclose(jax.jit(fn)(logp, ref_logp), expected[name], rtol=1e-12)
      by_name = jax.jit(functools.partial(kl.kl_estimate, estimator=name))
      np.testing.assert_allclose(by_name(logp, ref_logp), expected[name], rtol=1e-12)
  # float32 path.
  np.testing.assert_allclose(
    jax.jit(kl.kl_k3)(logp.astype(np.float32), ref_logp.astype(np.float32)),
    expected["k3"],
    rtol=1e-4,
    atol=1e-6,
  )


def test_estimator_gradients_wrt_logp_match_analytic_forms():
  # Used as a differentiable KL loss term (e.g. GRPO's k3 penalty).
  rng = np.random.default_rng(7)
  logp = np.log(rng.uniform(0.05, 1.0, size=(3, 5)))
  ref_logp = np.log(rng.uniform(0.05, 1.0, size=(3, 5)))
  log_rho = ref_logp - logp
  expected = {"k1": np.ones_like(logp), "k2": -log_rho, "k3": 1.0 - np.exp(log_rho)}
  with jax.enable_x64(True):
    for name, grad_expected in expected.items():
      fn = functools.partial(kl.kl_estimate, estimator=name)
      grad = jax.jit(jax.grad(lambda lp, fn=fn: jnp.sum(fn(lp, ref_logp))))(logp)
      np.testing.assert_allclose(grad, grad_expected, rtol=1e-12, err_msg=name)
      check_grads(fn, (logp, ref_logp), order=2, modes=["rev"])


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_k1_and_k3_expectations_under_pi_equal_exact_kl(estimator):
  # Exact expectation over the vocabulary: sum_v pi(v) k(v) == KL(pi || pi_ref).
  with jax.enable_x64(True):
    for seed in range(3):
      logits, ref_logits = _random_pair(seed, vocab=12)
      logp, ref_logp = _np_log_softmax(logits), _np_log_softmax(ref_logits)
      values = kl.kl_estimate(logp, ref_logp, estimator=estimator)
      expectation = np.sum(np.exp(logp) * np.asarray(values))
      np.testing.assert_allclose(expectation, _np_kl(logits, ref_logits), rtol=1e-10)


@jax.jit
def _draw_k1_k3(key, logp, ref_logp):
  tokens = jax.random.categorical(key, logp, shape=(100_000,))
  return (
    kl.kl_estimate(logp[tokens], ref_logp[tokens], estimator="k1"),
    kl.kl_estimate(logp[tokens], ref_logp[tokens], estimator="k3"),
  )


def test_k1_and_k3_are_unbiased_monte_carlo():
  for seed in range(3):
    logits, ref_logits = _random_pair(seed, vocab=10)
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32))
    ref_logp = jax.nn.log_softmax(jnp.asarray(ref_logits, jnp.float32))
    exact = _np_kl(logits, ref_logits)
    for values in _draw_k1_k3(jax.random.key(seed), logp, ref_logp):
      values = np.asarray(values, np.float64)
      mean, stderr = values.mean(), values.std(ddof=1) / np.sqrt(values.size)
      assert abs(mean - exact) < 4 * stderr, (mean, exact, stderr)


def test_k2_is_biased_for_far_distributions_but_close_for_near_ones():
  with jax.enable_x64(True):
    logits, ref_logits = _random_pair(3, vocab=12)
    logp = _np_log_softmax(logits)
    # Near: pi_ref a small perturbation of pi; E_pi[k2] agrees with the KL to second order.
    near_ref = _np_log_softmax(logits + 0.05 * (ref_logits - logits))
    e_k2 = np.sum(np.exp(logp) * np.asarray(kl.kl_k2(logp, near_ref)))
    exact = _np_kl(logp, near_ref)
    np.testing.assert_allclose(e_k2, exact, rtol=0.05)
    # Far: the bias is visible (the test above is not vacuous).
    far_ref = _np_log_softmax(ref_logits)
    e_k2_far = np.sum(np.exp(logp) * np.asarray(kl.kl_k2(logp, far_ref)))
    assert abs(e_k2_far - _np_kl(logp, far_ref)) > 0.05 * _np_kl(logp, far_ref)


def test_k3_is_nonnegative_everywhere():
  grid = np.concatenate([-np.logspace(-9, 2, 200), [0.0], np.logspace(-9, 2, 200)])
  logp, ref_logp = np.meshgrid(grid - 1.0, grid - 1.0)
  values = jax.jit(kl.kl_k3)(logp.astype(np.float32), ref_logp.astype(np.float32))
  assert np.all(np.asarray(values) >= 0.0)
  rng = np.random.default_rng(1)
  a, b = rng.normal(scale=5.0, size=(2, 10_000)).astype(np.float32)
  assert np.all(np.asarray(jax.jit(kl.kl_k3)(a, b)) >= 0.0)
  assert np.all(np.asarray(jax.jit(kl.kl_k3)(a, a + 1e-7)) >= 0.0)


def test_unknown_estimator_raises_value_error():
  with pytest.raises(ValueError, match="estimator"):
    kl.kl_estimate(jnp.zeros(3), jnp.zeros(3), estimator="k4")


def test_mismatched_shapes_raise_value_error_naming_arguments():
  with pytest.raises(ValueError, match=r"logp and ref_logp.*\(3,\).*\(4,\)"):
    kl.kl_k1(jnp.zeros(3), jnp.zeros(4))
  with pytest.raises(ValueError, match="logits and ref_logits"):
    kl.exact_kl_from_logits(jnp.zeros((2, 5)), jnp.zeros((2, 6)))


def test_exact_kl_from_logits_matches_numpy_float64():
  rng = np.random.default_rng(2)
  logits = 2.0 * rng.normal(size=(3, 4, 17))
  ref_logits = 2.0 * rng.normal(size=(3, 4, 17))
  expected = _np_kl(logits, ref_logits)
  with jax.enable_x64(True):
    got = jax.jit(kl.exact_kl_from_logits)(logits, ref_logits)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, expected, rtol=1e-12)
  logits32, ref_logits32 = logits.astype(np.float32), ref_logits.astype(np.float32)
  got32 = jax.jit(kl.exact_kl_from_logits)(logits32, ref_logits32)
  assert got32.shape == (3, 4)
  np.testing.assert_allclose(got32, expected, rtol=2e-5, atol=1e-6)


def test_exact_kl_is_zero_for_equal_distributions_and_shift_invariant():
  logits = np.random.default_rng(3).normal(size=(5, 9)).astype(np.float32)
  np.testing.assert_allclose(kl.exact_kl_from_logits(logits, logits + 3.0), 0.0, atol=1e-6)


def test_exact_kl_handles_minus_inf_logits():
  logits = np.array([0.3, -np.inf, 1.0, -0.5])
  ref_logits = np.array([0.0, 0.2, 0.5, 0.1])
  # Tokens with pi(v) = 0 contribute nothing.
  p = np.exp(_np_log_softmax(logits[[0, 2, 3]]))
  ref_logp = _np_log_softmax(ref_logits)[[0, 2, 3]]
  expected = np.sum(p * (np.log(p) - ref_logp))
  got = jax.jit(kl.exact_kl_from_logits)(logits.astype(np.float32), ref_logits.astype(np.float32))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  grad_fn = jax.grad(lambda x: kl.exact_kl_from_logits(x, ref_logits))
  grads = grad_fn(jnp.asarray(logits, jnp.float32))
  assert np.all(np.isfinite(np.asarray(grads)))
  # pi_ref(v) = 0 where pi(v) > 0: the KL is infinite.
  assert np.isinf(kl.exact_kl_from_logits(ref_logits, logits))


def test_exact_kl_gradients_match_finite_differences():
  rng = np.random.default_rng(4)
  logits, ref_logits = rng.normal(size=(2, 6)), rng.normal(size=(2, 6))
  with jax.enable_x64(True):
    check_grads(kl.exact_kl_from_logits, (logits, ref_logits), order=2, modes=["rev"])


def test_sequence_kl_masked_positions_contribute_nothing():
  rng = np.random.default_rng(5)
  per_token = rng.normal(size=(3, 6)).astype(np.float32)
  mask = np.array([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=bool)
  expected = np.sum(np.where(mask, per_token.astype(np.float64), 0.0), axis=-1)
  poisoned = np.where(mask, per_token, np.nan).astype(np.float32)
  got = jax.jit(kl.sequence_kl)(poisoned, mask)
  assert got.shape == (3,)
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  # A float mask means the same, and extra padding changes nothing.
  float_mask = mask.astype(np.float32)
  np.testing.assert_allclose(kl.sequence_kl(poisoned, float_mask), expected, rtol=1e-6)
  padded = np.concatenate([poisoned, np.full((3, 4), 1e9, np.float32)], axis=1)
  padded_mask = np.concatenate([mask, np.zeros((3, 4), bool)], axis=1)
  np.testing.assert_allclose(kl.sequence_kl(padded, padded_mask), expected, rtol=1e-6)


def test_sequence_kl_gradient_is_zero_at_masked_positions():
  mask = np.array([[1, 1, 0], [0, 1, 1]], bool)
  per_token = jnp.asarray(np.random.default_rng(6).normal(size=(2, 3)), jnp.float32)
  grads = jax.grad(lambda x: jnp.sum(kl.sequence_kl(x, mask) ** 2))(per_token)
  expected = 2 * np.sum(np.where(mask, per_token, 0), -1, keepdims=True) * mask
  np.testing.assert_allclose(grads, expected, rtol=1e-6)


def test_sequence_kl_rejects_bad_shapes():
  with pytest.raises(ValueError, match=r"per_token_kl must have shape \[batch, seq\], got"):
    kl.sequence_kl(jnp.zeros(4), jnp.ones(4, bool))
  with pytest.raises(ValueError, match=r"mask must have the shape of per_token_kl \(2, 4\)"):
    kl.sequence_kl(jnp.zeros((2, 4)), jnp.ones((2, 3), bool))


@pytest.mark.parametrize(
  "call, name",
  [
    (lambda bad: kl.kl_estimate(bad, np.zeros(2)), "logp"),
    (lambda bad: kl.kl_estimate(np.zeros(2), bad), "ref_logp"),
    (lambda bad: kl.exact_kl_from_logits(bad, np.zeros(2)), "logits"),
    (lambda bad: kl.sequence_kl(bad, np.ones(2, bool)), "per_token_kl"),
  ],
  ids=["logp", "ref_logp", "logits", "per_token_kl"],
)
def test_string_arrays_raise_naming_the_argument(call, name):
  with pytest.raises(ValueError, match=f"^{name} must be a numeric array, got dtype <U1"):
    call(np.array(["a", "b"]))
