"""Tests for jaxrm.math.dpo: DPO, conservative DPO, IPO, SimPO and KTO against NumPy float64."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrm.math import dpo


def np_log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def np_grad(f, args, eps=1e-6):
  """Central finite differences of a float64 NumPy function, one array per argument."""
  grads = []
  for i, a in enumerate(args):
    g = np.zeros_like(a)
    for j in range(a.size):
      up = [x.copy() for x in args]
      down = [x.copy() for x in args]
      up[i].flat[j] += eps
      down[i].flat[j] -= eps
      g.flat[j] = (f(*up) - f(*down)) / (2 * eps)
    grads.append(g)
  return grads


def logps(seed, n=6):
  rng = np.random.default_rng(seed)
  return [rng.normal(-10.0, 3.0, size=n) for _ in range(4)]


def np_dpo(pc, pr, rc, rr, beta, eps):
  z = beta * ((pc - rc) - (pr - rr))
  return np.mean(-(1 - eps) * np_log_sigmoid(z) - eps * np_log_sigmoid(-z))


def np_ipo(pc, pr, rc, rr, beta):
  return np.mean(((pc - rc) - (pr - rr) - 1 / (2 * beta)) ** 2)


def np_simpo(pc, pr, nc, nr, beta, gamma, eps):
  z = beta * (pc / nc - pr / nr) - gamma
  return np.mean(-(1 - eps) * np_log_sigmoid(z) - eps * np_log_sigmoid(-z))


def np_kto(p, r, desirable, beta, z0, wd, wu):
  ratio = p - r
  losses = np.where(
    desirable,
    wd * (1 - np_sigmoid(beta * (ratio - z0))),
    wu * (1 - np_sigmoid(beta * (z0 - ratio))),
  )
  return np.mean(losses)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dpo_and_conservative_dpo_match_numpy_values_and_policy_gradients(eps):
  pc, pr, rc, rr = logps(0)
  beta = 0.3
  with jax.enable_x64(True):
    fn = jax.jit(functools.partial(dpo.dpo_loss, beta=beta, label_smoothing=eps))
    np.testing.assert_allclose(fn(pc, pr, rc, rr), np_dpo(pc, pr, rc, rr, beta, eps), rtol=1e-10)
    got = jax.grad(fn, argnums=(0, 1, 2, 3))(pc, pr, rc, rr)
  want = np_grad(lambda a, b: np_dpo(a, b, rc, rr, beta, eps), [pc, pr])
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-6, atol=1e-9)
  # The reference log-probs are constants.
  np.testing.assert_array_equal(got[2], 0.0)
  np.testing.assert_array_equal(got[3], 0.0)


def test_dpo_is_bradley_terry_on_the_implicit_reward_and_weights_are_a_weighted_mean():
  pc, pr, rc, rr = logps(1)
  beta = 0.1
  r_c = dpo.implicit_reward(pc, rc, beta=beta)
  r_r = dpo.implicit_reward(pr, rr, beta=beta)
  np.testing.assert_allclose(r_c, beta * (pc - rc), rtol=1e-6)
  np.testing.assert_allclose(
    dpo.dpo_loss(pc, pr, rc, rr, beta=beta), np.mean(-np_log_sigmoid(r_c - r_r)), rtol=1e-5
  )
  w = np.array([1.0, 0.0, 2.0, 1.0, 0.5, 0.0])
  per = -np_log_sigmoid(beta * ((pc - rc) - (pr - rr)))
  np.testing.assert_allclose(
    dpo.dpo_loss(pc, pr, rc, rr, beta=beta, weights=w), np.sum(w * per) / w.sum(), rtol=1e-5
  )


def test_ipo_matches_numpy_values_and_gradients():
  pc, pr, rc, rr = logps(2)
  beta = 0.5
  with jax.enable_x64(True):
    fn = jax.jit(functools.partial(dpo.ipo_loss, beta=beta))
    np.testing.assert_allclose(fn(pc, pr, rc, rr), np_ipo(pc, pr, rc, rr, beta), rtol=1e-10)
    got = jax.grad(fn, argnums=(0, 1))(pc, pr, rc, rr)
  want = np_grad(lambda a, b: np_ipo(a, b, rc, rr, beta), [pc, pr])
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-8)


def test_ipo_is_minimised_at_log_ratio_margin_one_over_two_beta():
  beta = 0.25
  rc, rr = np.zeros(3), np.zeros(3)
  pc = np.full(3, -1.0)
  pr = pc - 1 / (2 * beta)
  np.testing.assert_allclose(dpo.ipo_loss(pc, pr, rc, rr, beta=beta), 0.0, atol=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_simpo_matches_numpy_values_and_gradients(eps):
  pc, pr, _, _ = logps(3)
  rng = np.random.default_rng(3)
  nc = rng.integers(1, 9, size=6).astype(np.float64)
  nr = rng.integers(1, 9, size=6).astype(np.float64)
  beta, gamma = 2.0, 0.8
  with jax.enable_x64(True):
    fn = jax.jit(functools.partial(dpo.simpo_loss, beta=beta, gamma=gamma, label_smoothing=eps))
    np.testing.assert_allclose(
      fn(pc, pr, nc, nr), np_simpo(pc, pr, nc, nr, beta, gamma, eps), rtol=1e-10
    )
    got = jax.grad(fn, argnums=(0, 1))(pc, pr, nc, nr)
  want = np_grad(lambda a, b: np_simpo(a, b, nc, nr, beta, gamma, eps), [pc, pr])
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-9)


def test_kto_matches_numpy_values_and_gradients_and_the_reference_point_is_clamped():
  p, r, _, _ = logps(4, n=8)
  desirable = np.array([True, False, True, True, False, False, True, False])
  beta, wd, wu = 0.2, 1.0, 1.5
  z0 = float(dpo.kto_reference_point(p[::-1] + 0.3, r[::-1]))
  np.testing.assert_allclose(z0, max(0.0, np.mean(p - r + 0.3)), rtol=1e-5, atol=1e-6)
  assert float(dpo.kto_reference_point(r - 1.0, r)) == 0.0  # negative KL estimate -> 0
  with jax.enable_x64(True):
    fn = jax.jit(
      functools.partial(
        dpo.kto_loss, beta=beta, reference_point=z0, desirable_weight=wd, undesirable_weight=wu
      )
    )
    np.testing.assert_allclose(fn(p, r, desirable), np_kto(p, r, desirable, beta, z0, wd, wu))
    got = jax.grad(fn)(p, r, desirable)
  (want,) = np_grad(lambda a: np_kto(a, r, desirable, beta, z0, wd, wu), [p])
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
  # The reference point is not differentiated.
  g = jax.grad(lambda q: dpo.kto_reference_point(q, r))(p)
  np.testing.assert_array_equal(g, 0.0)


def test_kto_is_nan_for_an_infinite_log_prob_not_a_saturated_loss():
  # fp16 sums of long responses overflow to -inf; a saturated sigmoid would hide it
  p, r, desirable = np.zeros(3), np.array([0.0, -np.inf, 0.0]), np.array([True, True, False])
  losses = np.asarray(dpo.kto_losses(p, r, desirable, beta=0.1, reference_point=0.0))
  assert np.isnan(losses[1]) and np.isfinite(losses[[0, 2]]).all()
  for bad in (np.inf, -np.inf):
    z0 = dpo.kto_reference_point(np.zeros(3), np.array([0.0, bad, 0.0]))
    assert np.isnan(z0)
    assert np.isnan(dpo.kto_loss(p, np.zeros(3), desirable, beta=0.1, reference_point=z0))


def test_losses_are_finite_for_large_log_ratios():
  big = np.array([-1e4, 1e4], np.float32)
  zero = np.zeros(2, np.float32)
  for loss in (
    dpo.dpo_loss(big, -big, zero, zero, beta=1.0, label_smoothing=0.1),
    dpo.simpo_loss(big, -big, np.ones(2), np.ones(2), beta=2.0, gamma=1.0),
  ):
    assert np.isfinite(loss)
  g = jax.grad(lambda x: dpo.dpo_loss(x, -x, zero, zero, beta=1.0))(big)
  assert np.all(np.isfinite(g))


@pytest.mark.parametrize(
  "call, message",
  [
    (
      lambda: dpo.dpo_loss(np.zeros(3), np.zeros(3), np.zeros(3), np.zeros(2), beta=0.1),
      r"ref_rejected_logps must have the shape of policy_chosen_logps \(3,\), got \(2,\)",
    ),
    (
      lambda: dpo.dpo_loss(np.zeros((3, 2)), np.zeros(3), np.zeros(3), np.zeros(3), beta=0.1),
      r"policy_chosen_logps must have shape \[batch\], got \(3, 2\)",
    ),
    (
      lambda: dpo.dpo_loss(np.zeros(3), np.zeros(3), np.zeros(3), np.zeros(3), beta=0.0),
      r"beta must be > 0, got 0.0",
    ),
    (  # an array beta is checked too (a negative one flips the loss's sign)
      lambda: dpo.dpo_loss(
        np.zeros(3), np.zeros(3), np.zeros(3), np.zeros(3), beta=jnp.array(-0.1)
      ),
      r"beta must be > 0, got -0.1",
    ),
    (
      lambda: dpo.dpo_loss(np.zeros(3), np.zeros(3), np.zeros(3), np.zeros(3), beta=None),
      r"beta must be a number, got None",
    ),
    (
      lambda: dpo.dpo_loss([0.0], [0.0], ["x"], [0.0], beta=0.1),
      r"ref_chosen_logps must be a numeric array",
    ),
    (
      lambda: dpo.simpo_loss(np.zeros(2), np.zeros(2), [3.0, 0.0], np.ones(2), beta=2.0, gamma=1.0),
      r"chosen_lengths must lie in \[1, inf\], got 0.0 at index \(1,\)",
    ),
    (
      lambda: dpo.dpo_loss(
        np.zeros(3), np.zeros(3), np.zeros(3), np.zeros(3), beta=0.1, label_smoothing=0.7
      ),
      r"label_smoothing must be in \[0, 0.5\], got 0.7",
    ),
    (
      lambda: dpo.kto_loss(
        np.zeros(3), np.zeros(3), np.ones(2, bool), beta=0.1, reference_point=0.0
      ),
      r"desirable must have the shape of policy_logps \(3,\), got \(2,\)",
    ),
    (
      lambda: dpo.kto_loss(
        np.zeros(3), np.zeros(3), np.ones(3, bool), beta=0.1, reference_point=jnp.zeros(2)
      ),
      r"reference_point must be a scalar",
    ),
  ],
)
def test_bad_inputs_raise_naming_the_argument(call, message):
  with pytest.raises(ValueError, match=message):
    call()
