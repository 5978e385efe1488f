"""Tests for jaxrm.math.distributional against independent float64 NumPy / SciPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special as sp_special
from scipy import stats

from jaxrm.math import distributional as dist
from jaxrm.math import preference

RNG = np.random.default_rng(0)


# ------------------------------------------------------------------------------ references
def _np_mv_losses(mc, sc, mr, sr, p):
  z = (mc - mr) / np.sqrt(sc**2 + sr**2)
  return -(p * sp_special.log_ndtr(z) + (1 - p) * sp_special.log_ndtr(-z))


def _np_mv_grads(mc, sc, mr, sr, p):
  """Analytic d loss / d (mc, sc, mr, sr) of one example each."""
  s = np.sqrt(sc**2 + sr**2)
  z = (mc - mr) / s
  mills = lambda x: np.exp(stats.norm.logpdf(x) - sp_special.log_ndtr(x))
  dz = -p * mills(z) + (1 - p) * mills(-z)
  return dz / s, dz * -(mc - mr) * sc / s**3, -dz / s, dz * -(mc - mr) * sr / s**3


def _np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _np_cat_prob(lc, lr, atoms):
  """P(c > r) by the paper's double sum, one example at a time (float64)."""
  pc, pr = _np_softmax(lc), _np_softmax(lr)
  out = np.zeros(lc.shape[0])
  for b in range(lc.shape[0]):
    for i in range(len(atoms)):
      for j in range(len(atoms)):
        w = 1.0 if atoms[i] > atoms[j] else (0.5 if atoms[i] == atoms[j] else 0.0)
        out[b] += pc[b, i] * pr[b, j] * w
  return out


def _np_cat_losses(lc, lr, atoms, p):
  pcr = _np_cat_prob(lc, lr, atoms)
  return -(p * np.log(pcr) + (1 - p) * np.log(_np_cat_prob(lr, lc, atoms)))


def _np_quantile_cat(logits, atoms, alpha):
  """Interpolated quantile with bins centred on evenly spaced atoms, by bisection on the CDF."""
  p = _np_softmax(logits)
  h = atoms[1] - atoms[0]
  edges = np.concatenate([atoms - h / 2, atoms[-1:] + h / 2])
  out = []
  for row in p:
    cdf = lambda x, row=row: sum(
      w * np.clip((x - edges[i]) / (edges[i + 1] - edges[i]), 0, 1) for i, w in enumerate(row)
    )
    lo, hi = edges[0], edges[-1]
    for _ in range(200):
      mid = (lo + hi) / 2
      lo, hi = (mid, hi) if cdf(mid) < alpha else (lo, mid)
    out.append((lo + hi) / 2)
  return np.array(out)


def _finite_diff(f, x, h=1e-6):
  g = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    e = np.zeros_like(x)
    e[idx] = h
    g[idx] = (f(x + e) - f(x - e)) / (2 * h)
  return g


# ------------------------------------------------------------------------------ mean-variance
def _mv_inputs(b=7):
  return (
    RNG.normal(size=b) * 2,
    np.exp(RNG.normal(size=b)),
    RNG.normal(size=b) * 2,
    np.exp(RNG.normal(size=b)),
  )


def test_mean_variance_log_prob_matches_scipy_probit():
  mc, sc, mr, sr = _mv_inputs()
  with jax.enable_x64(True):
    got = dist.mean_variance_log_prob(mc, sc, mr, sr)
  want = sp_special.log_ndtr((mc - mr) / np.sqrt(sc**2 + sr**2))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12)


@pytest.mark.parametrize("p", [1.0, 0.7, 0.0])
def test_mean_variance_losses_and_gradients_match_numpy(p):
  mc, sc, mr, sr = _mv_inputs()
  labels = np.full(mc.shape, p)
  with jax.enable_x64(True):
    fn = lambda *a: jnp.sum(dist.mean_variance_losses(*a, labels=labels))
    got = dist.mean_variance_losses(mc, sc, mr, sr, labels=labels)
    grads = jax.grad(fn, argnums=(0, 1, 2, 3))(mc, sc, mr, sr)
  np.testing.assert_allclose(np.asarray(got), _np_mv_losses(mc, sc, mr, sr, p), rtol=1e-10)
  for g, want in zip(grads, _np_mv_grads(mc, sc, mr, sr, p)):
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-8, atol=1e-12)


def test_mean_variance_with_equal_unit_stds_is_thurstone():
  # sigma_c = sigma_r = 1: z = delta / sqrt(2), the Thurstone (Case V) likelihood.
  mc, _, mr, _ = _mv_inputs()
  ones = np.ones_like(mc)
  np.testing.assert_allclose(
    dist.mean_variance_loss(mc, ones, mr, ones),
    preference.thurstone_loss(mc, mr),
    rtol=1e-6,
  )


def test_mean_variance_weights_labels_and_penalty():
  mc, sc, mr, sr = _mv_inputs(5)
  w = np.array([1.0, 0.0, 2.0, 0.5, 3.0])
  labels = np.array([1.0, 0.5, 0.2, 1.0, 0.9])
  with jax.enable_x64(True):
    got = dist.mean_variance_loss(mc, sc, mr, sr, weights=w, labels=labels, variance_penalty=0.3)
  per = _np_mv_losses(mc, sc, mr, sr, labels) + 0.3 * (sc**2 + sr**2)
  np.testing.assert_allclose(float(got), np.sum(w * per) / np.sum(w), rtol=1e-10)
  # label_smoothing eps is the constant soft label 1 - eps.
  np.testing.assert_allclose(
    dist.mean_variance_loss(mc, sc, mr, sr, label_smoothing=0.2),
    dist.mean_variance_loss(mc, sc, mr, sr, labels=np.full(5, 0.8)),
    rtol=1e-6,
  )


def test_mean_variance_loss_is_finite_for_extreme_gaps_and_tiny_stds():
  mc = jnp.array([1e4, -1e4, 3.0])
  s = jnp.array([1e-3, 1e-3, 1e-6])
  loss, grad = jax.value_and_grad(lambda m: dist.mean_variance_loss(m, s, jnp.zeros(3), s))(mc)
  assert np.isfinite(loss) and np.all(np.isfinite(grad))


def test_mean_variance_quantile_matches_normal_ppf():
  m, s = RNG.normal(size=6), np.exp(RNG.normal(size=6))
  with jax.enable_x64(True):
    got = dist.mean_variance_quantile(m, s, alpha=0.01)
  np.testing.assert_allclose(np.asarray(got), stats.norm.ppf(0.01, loc=m, scale=s), rtol=1e-10)


def test_mean_variance_quantile_orders_a_risky_response_below_a_safe_one():
  # Higher mean but much higher spread: the mean prefers it, the 1% quantile does not.
  q = dist.mean_variance_quantile(jnp.array([1.0, 0.8]), jnp.array([1.0, 0.1]), alpha=0.01)
  assert q[0] < q[1]


# ------------------------------------------------------------------------------ categorical
ATOMS = np.linspace(0.0, 1.0, 6)


@pytest.mark.parametrize("p", [1.0, 0.3])
def test_categorical_losses_and_gradients_match_the_papers_double_sum(p):
  lc, lr = RNG.normal(size=(4, 6)) * 2, RNG.normal(size=(4, 6)) * 2
  labels = np.full(4, p)
  with jax.enable_x64(True):
    got = dist.categorical_losses(lc, lr, atoms=ATOMS, labels=labels)
    gc, gr = jax.grad(
      lambda a, b: jnp.sum(dist.categorical_losses(a, b, atoms=ATOMS, labels=labels)), (0, 1)
    )(lc, lr)
    lp = dist.categorical_log_prob(lc, lr, atoms=ATOMS)
  np.testing.assert_allclose(np.asarray(lp), np.log(_np_cat_prob(lc, lr, ATOMS)), rtol=1e-12)
  np.testing.assert_allclose(np.asarray(got), _np_cat_losses(lc, lr, ATOMS, p), rtol=1e-12)
  ref = lambda a, b: np.sum(_np_cat_losses(a, b, ATOMS, p))
  np.testing.assert_allclose(np.asarray(gc), _finite_diff(lambda x: ref(x, lr), lc), atol=1e-7)
  np.testing.assert_allclose(np.asarray(gr), _finite_diff(lambda x: ref(lc, x), lr), atol=1e-7)


def test_categorical_probabilities_of_both_orders_sum_to_one_and_ties_are_half():
  lc, lr = RNG.normal(size=(5, 6)), RNG.normal(size=(5, 6))
  a = jnp.exp(dist.categorical_log_prob(lc, lr, atoms=ATOMS))
  b = jnp.exp(dist.categorical_log_prob(lr, lc, atoms=ATOMS))
  np.testing.assert_allclose(a + b, 1.0, rtol=1e-6)
  np.testing.assert_allclose(jnp.exp(dist.categorical_log_prob(lc, lc, atoms=ATOMS)), 0.5, 1e-6)


def test_categorical_log_prob_is_finite_for_peaked_distributions():
  # Near point masses at atoms 5 and 0: P(c > r) ~ 1 and log P(r > c) ~ -200, both finite.
  lc = jnp.full((1, 6), -100.0).at[0, 5].set(100.0)
  lr = jnp.full((1, 6), -100.0).at[0, 0].set(100.0)
  fwd, grad = jax.value_and_grad(
    lambda x: dist.categorical_loss(x, lr, atoms=ATOMS, labels=jnp.array([0.0]))
  )(lc)
  assert np.isfinite(fwd) and fwd > 100 and np.all(np.isfinite(grad))


def test_categorical_entropy_bonus_is_the_entropy_of_the_weighted_batch_mean():
  lc, lr = RNG.normal(size=(3, 6)), RNG.normal(size=(3, 6))
  w = np.array([1.0, 2.0, 0.0])
  with jax.enable_x64(True):
    got = dist.categorical_loss(lc, lr, atoms=ATOMS, weights=w, entropy_coef=0.1)
  nll = np.sum(w * _np_cat_losses(lc, lr, ATOMS, 1.0)) / w.sum()
  probs = np.concatenate([_np_softmax(lc), _np_softmax(lr)])
  ww = np.concatenate([w, w])
  pbar = (ww[:, None] * probs).sum(0) / ww.sum()
  np.testing.assert_allclose(float(got), nll + 0.1 * np.sum(pbar * np.log(pbar)), rtol=1e-10)


def test_categorical_mean_std_and_quantile_match_numpy():
  logits = RNG.normal(size=(5, 6)) * 2
  with jax.enable_x64(True):
    mean = dist.categorical_mean(logits, atoms=ATOMS)
    std = dist.categorical_std(logits, atoms=ATOMS)
    q = dist.categorical_quantile(logits, atoms=ATOMS, alpha=0.1)
  p = _np_softmax(logits)
  m = p @ ATOMS
  np.testing.assert_allclose(np.asarray(mean), m, rtol=1e-12)
  np.testing.assert_allclose(np.asarray(std), np.sqrt(p @ ATOMS**2 - m**2), rtol=1e-9)
  np.testing.assert_allclose(np.asarray(q), _np_quantile_cat(logits, ATOMS, 0.1), atol=1e-10)


def test_categorical_quantile_of_a_point_mass_lies_in_its_atoms_bin():
  logits = jnp.full((1, 6), -1e9).at[0, 2].set(0.0)
  q = dist.categorical_quantile(logits, atoms=ATOMS, alpha=0.5)
  np.testing.assert_allclose(q, [ATOMS[2]], atol=1e-6)  # the bin's middle


# ------------------------------------------------------------------------------ r^2
def test_explained_variance_matches_the_papers_formula():
  m, s = RNG.normal(size=50), np.exp(RNG.normal(size=50))
  with jax.enable_x64(True):
    got = dist.explained_variance(m, s)
  np.testing.assert_allclose(float(got), np.var(m) / (np.var(m) + np.mean(s**2)), rtol=1e-12)
  assert float(dist.explained_variance(m, np.zeros(50))) == 1.0


def test_functions_run_under_jit():
  mc, sc, mr, sr = (jnp.asarray(x, jnp.float32) for x in _mv_inputs())
  f = jax.jit(lambda *a: dist.mean_variance_loss(*a))
  np.testing.assert_allclose(f(mc, sc, mr, sr), dist.mean_variance_loss(mc, sc, mr, sr), 1e-6)
  lc = jnp.asarray(RNG.normal(size=(3, 6)), jnp.float32)
  g = jax.jit(lambda x: dist.categorical_quantile(x, atoms=ATOMS, alpha=0.01))
  np.testing.assert_allclose(g(lc), dist.categorical_quantile(lc, atoms=ATOMS, alpha=0.01), 1e-6)


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
  "call, message",
  [
    (
      lambda: dist.mean_variance_loss(np.zeros((2, 1)), np.ones(2), np.zeros(2), np.ones(2)),
      r"mean_chosen must have shape \[batch\], got \(2, 1\)",
    ),
    (
      lambda: dist.mean_variance_loss(np.zeros(2), np.ones(3), np.zeros(2), np.ones(2)),
      r"std_chosen must have the shape of mean_chosen \(2,\), got \(3,\)",
    ),
    (
      lambda: dist.mean_variance_loss(np.zeros(2), np.ones(2), np.zeros(3), np.ones(3)),
      r"mean_rejected must have the shape of mean_chosen \(2,\), got \(3,\)",
    ),
    (
      lambda: dist.mean_variance_loss(np.zeros(2), np.ones(2), np.zeros(2), np.array([1.0, -1])),
      r"std_rejected must lie in \[0.0, inf\], got -1.0 at index \(1,\)",
    ),
    (
      lambda: dist.mean_variance_loss(
        np.zeros(2), np.ones(2), np.zeros(2), np.ones(2), labels=np.array([0.5, 2.0])
      ),
      r"labels must lie in \[0.0, 1.0\]",
    ),
    (
      lambda: dist.mean_variance_quantile(np.zeros(2), np.ones(2), alpha=1.0),
      r"alpha must be in \(0, 1\), got 1.0",
    ),
    (
      lambda: dist.categorical_loss(np.zeros((2, 6)), np.zeros((2, 5)), atoms=ATOMS),
      r"logits_rejected must have the shape of logits_chosen \(2, 6\), got \(2, 5\)",
    ),
    (
      lambda: dist.categorical_loss(np.zeros((2, 5)), np.zeros((2, 5)), atoms=ATOMS),
      r"atoms must have shape \[num_atoms\] = \(5,\) to match the logits, got \(6,\)",
    ),
    (
      lambda: dist.categorical_mean(np.zeros(6), atoms=ATOMS),
      r"logits must have shape \[batch, num_atoms\] \(num_atoms >= 2\), got \(6,\)",
    ),
    (
      lambda: dist.categorical_quantile(np.zeros((1, 3)), atoms=[0.0, 1.0, 1.0], alpha=0.1),
      r"atoms \(differences: must increase strictly\) must lie in",
    ),
    (
      lambda: dist.categorical_loss(
        np.zeros((2, 6)), np.zeros((2, 6)), atoms=ATOMS, weights=np.array([1.0, -1.0])
      ),
      r"weights must lie in \[0.0, inf\]",
    ),
    (
      lambda: dist.explained_variance(np.zeros(3), np.ones(2)),
      r"std must have the shape of mean \(3,\), got \(2,\)",
    ),
  ],
)
def test_bad_input_raises_naming_the_argument_and_shape(call, message):
  with pytest.raises(ValueError, match=message):
    call()
