"""Tests for jaxrm.math.rm_evals against float64 NumPy references and scipy.stats."""

import functools

import jax
import numpy as np
import pytest
from scipy import stats

from jaxrm.math import metrics, rm_evals


def _ints(rng, shape, lo=-2, hi=3):
  """Small integer scores: many exact ties."""
  return rng.integers(lo, hi, shape).astype(np.float64)


# ------------------------------------------------------------------------------ gold gap
@pytest.mark.parametrize("threshold", [None, 0.7])
def test_accuracy_by_gold_gap_matches_numpy(threshold):
  rng = np.random.default_rng(0)
  rc, rr = _ints(rng, 500), _ints(rng, 500)
  gc, gr = rng.normal(size=500), rng.normal(size=500)
  got = jax.jit(functools.partial(rm_evals.accuracy_by_gold_gap, threshold=threshold))(
    rc, rr, gc, gr
  )
  gap = np.abs(gc - gr)
  t = np.median(gap) if threshold is None else threshold
  score = (rc > rr) + 0.5 * (rc == rr)
  np.testing.assert_allclose(got.small, score[gap < t].mean(), rtol=1e-6)
  np.testing.assert_allclose(got.large, score[gap >= t].mean(), rtol=1e-6)
  np.testing.assert_allclose(got.fraction_small, np.mean(gap < t), rtol=1e-6)
  np.testing.assert_allclose(got.threshold, t, rtol=1e-6)


def test_accuracy_by_gold_gap_is_nan_for_an_empty_group_and_rejects_bad_shapes():
  got = rm_evals.accuracy_by_gold_gap([1.0, 2.0], [0.0, 0.0], [1.0, 1.0], [0.0, 0.0], threshold=0.5)
  assert np.isnan(got.small) and got.large == 1.0
  with pytest.raises(ValueError, match="gold_rejected must have the shape"):
    rm_evals.accuracy_by_gold_gap([1.0, 2.0], [0.0, 0.0], [1.0, 1.0], [0.0])


# ------------------------------------------------------------------------------ best-of-K
def _np_best_of_k(s, g):
  acc, regret = [], []
  for si, gi in zip(s, g):
    tied = np.flatnonzero(si == si.max())  # the RM picks uniformly among its tied maxima
    acc.append(np.mean(gi[tied] == gi.max()))
    regret.append(gi.max() - gi[tied].mean())
  return np.mean(acc), np.mean(regret)


def test_best_of_k_accuracy_and_regret_match_numpy_with_ties():
  rng = np.random.default_rng(1)
  s, g = _ints(rng, (300, 6)), _ints(rng, (300, 6), -3, 4)
  got = jax.jit(rm_evals.best_of_k_accuracy)(s, g)
  acc, regret = _np_best_of_k(s, g)
  np.testing.assert_allclose(got.accuracy, acc, rtol=1e-6)
  np.testing.assert_allclose(got.regret, regret, rtol=1e-6)
  assert got.per_prompt_accuracy.shape == (300,)
  # A perfect RM has accuracy 1 and no regret; a reversed one picks the worst.
  g = rng.normal(size=(50, 8))
  assert rm_evals.best_of_k_accuracy(g, g).accuracy == 1.0
  assert rm_evals.best_of_k_accuracy(g, g).regret == 0.0
  assert rm_evals.best_of_k_accuracy(-g, g).accuracy == 0.0


def test_best_of_k_rejects_bad_shapes():
  with pytest.raises(ValueError, match="scores must have shape"):
    rm_evals.best_of_k_accuracy(np.ones(4), np.ones(4))
  with pytest.raises(ValueError, match="gold must have the shape"):
    rm_evals.best_of_k_accuracy(np.ones((3, 4)), np.ones((3, 5)))


def test_one_vs_many_accuracy_matches_numpy_with_ties():
  rng = np.random.default_rng(2)
  c, r = _ints(rng, 400), _ints(rng, (400, 3))
  got = jax.jit(rm_evals.one_vs_many_accuracy)(c, r)
  ref = []
  for ci, ri in zip(c, r):
    top = ri.max()
    ref.append(1.0 if ci > top else (1.0 / (1 + np.sum(ri == ci)) if ci == top else 0.0))
  np.testing.assert_allclose(got, np.mean(ref), rtol=1e-6)
  with pytest.raises(ValueError, match="rewards_rejected must have shape"):
    rm_evals.one_vs_many_accuracy(c, r[:10])


def test_one_vs_many_equals_best_of_k_when_chosen_is_gold_best():
  rng = np.random.default_rng(3)
  s, g = rng.normal(size=(200, 5)), rng.normal(size=(200, 5))
  best = g.argmax(1)
  rest = np.array([[j for j in range(5) if j != b] for b in best])
  ovm = rm_evals.one_vs_many_accuracy(s[np.arange(200), best], np.take_along_axis(s, rest, 1))
  np.testing.assert_allclose(ovm, rm_evals.best_of_k_accuracy(s, g).accuracy, rtol=1e-6)


def test_policy_pair_accuracy_matches_numpy():
  rng = np.random.default_rng(4)
  pa, pb, ga, gb = (_ints(rng, 300) for _ in range(4))
  got = rm_evals.policy_pair_accuracy(pa, pb, ga, gb)
  ref = 1.0 - np.abs(np.sign(pa - pb) - np.sign(ga - gb)) / 2.0
  np.testing.assert_allclose(got, ref.mean(), rtol=1e-6)


# ------------------------------------------------------------------------------ rank statistics
@pytest.mark.parametrize("by", ["gold", "scores"])
def test_top_quantile_rank_correlation_matches_scipy_on_the_kept_responses(by):
  rng = np.random.default_rng(5)
  g = rng.normal(size=1000)
  s = g + rng.normal(size=1000)
  got = rm_evals.top_quantile_rank_correlation(s, g, quantile=0.8, by=by)
  key = g if by == "gold" else s
  keep = key >= np.quantile(key, 0.8)
  assert got["num"] == keep.sum() == 200
  np.testing.assert_allclose(got["spearman"], stats.spearmanr(s[keep], g[keep])[0], rtol=1e-10)
  np.testing.assert_allclose(got["kendall_tau"], stats.kendalltau(s[keep], g[keep])[0], rtol=1e-10)
  # Restricting to the top lowers the correlation of a noisy proxy (range restriction).
  full = rm_evals.top_quantile_rank_correlation(s, g, quantile=0.0)
  assert full["num"] == 1000 and full["spearman"] > got["spearman"]


def test_top_quantile_rank_correlation_rejects_bad_input():
  with pytest.raises(ValueError, match="quantile must lie"):
    rm_evals.top_quantile_rank_correlation(np.ones(5), np.arange(5.0), quantile=1.0)
  with pytest.raises(ValueError, match="by must be"):
    rm_evals.top_quantile_rank_correlation(np.ones(5), np.arange(5.0), by="proxy")


def test_batch_spearman_and_kendall_match_scipy_row_by_row_with_ties():
  rng = np.random.default_rng(6)
  x, y = _ints(rng, (70, 30)), _ints(rng, (70, 30))
  sp = rm_evals.batch_spearman(x, y, chunk=16)
  kt = rm_evals.batch_kendall_tau(x, y, chunk=16)
  for i in range(70):
    np.testing.assert_allclose(sp[i], stats.spearmanr(x[i], y[i])[0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(kt[i], stats.kendalltau(x[i], y[i])[0], rtol=1e-10, atol=1e-12)
  assert np.isnan(rm_evals.batch_spearman(np.ones(5), np.arange(5.0))[0])
  assert np.isnan(rm_evals.batch_kendall_tau(np.ones(5), np.arange(5.0))[0])


# ------------------------------------------------------------------------------ bootstrap
def test_bootstrap_correlation_estimate_shape_and_determinism():
  rng = np.random.default_rng(7)
  y = rng.normal(size=40)
  x = np.stack([y + rng.normal(size=40), rng.normal(size=40), -y])
  a = rm_evals.bootstrap_correlation(x, y, num_resamples=200, seed=3)
  b = rm_evals.bootstrap_correlation(x, y, num_resamples=200, seed=3)
  c = rm_evals.bootstrap_correlation(x, y, num_resamples=200, seed=4)
  assert a.estimate.shape == a.low.shape == a.high.shape == (3,)
  assert a.samples.shape == (200, 3)
  np.testing.assert_array_equal(a.samples, b.samples)
  assert not np.array_equal(a.samples, c.samples)
  for i in range(3):
    assert a.estimate[i] == pytest.approx(metrics.spearman(x[i], y))
  assert np.all(a.low <= a.estimate) and np.all(a.estimate <= a.high)
  assert a.high[2] == pytest.approx(-1.0)  # a perfect (negative) relation stays perfect
  k = rm_evals.bootstrap_correlation(x[0], y, method="kendall", num_resamples=50)
  assert k.estimate[0] == pytest.approx(metrics.kendall_tau(x[0], y))


def test_bootstrap_interval_covers_the_population_spearman():
  # Bivariate normal with rho = 0.5: population Spearman = 6 / pi * arcsin(rho / 2).
  rho = 0.5
  truth = 6.0 / np.pi * np.arcsin(rho / 2.0)
  rng = np.random.default_rng(8)
  cov = [[1.0, rho], [rho, 1.0]]
  hits, reps = 0, 200
  for r in range(reps):
    xy = rng.multivariate_normal([0.0, 0.0], cov, size=60)
    ci = rm_evals.bootstrap_correlation(xy[:, 0], xy[:, 1], num_resamples=300, seed=r)
    hits += bool(ci.low[0] <= truth <= ci.high[0])
  # Nominal 95%; percentile intervals at n = 60 run a little low. 200 replications have a
  # binomial s.d. of 1.5 points, so 0.88 flags a broken interval, not noise.
  assert 0.88 <= hits / reps <= 0.995


def test_bootstrap_correlation_difference_is_paired():
  rng = np.random.default_rng(9)
  y = rng.normal(size=80)
  good, bad = y + 0.3 * rng.normal(size=80), y + 3.0 * rng.normal(size=80)
  d = rm_evals.bootstrap_correlation_difference(good, bad, y, num_resamples=300)
  assert d.estimate[0] == pytest.approx(metrics.spearman(good, y) - metrics.spearman(bad, y))
  assert d.low[0] > 0 and d.samples.shape == (300, 1)
  same = rm_evals.bootstrap_correlation_difference(good, good, y, num_resamples=50)
  np.testing.assert_array_equal(same.samples, 0.0)


def test_bootstrap_rejects_bad_input():
  with pytest.raises(ValueError, match="x must have shape"):
    rm_evals.bootstrap_correlation(np.ones(4), np.arange(5.0))
  with pytest.raises(ValueError, match="method must be one of"):
    rm_evals.bootstrap_correlation(np.arange(5.0), np.arange(5.0), method="pearson")
  with pytest.raises(ValueError, match="num_resamples"):
    rm_evals.bootstrap_correlation(np.arange(5.0), np.arange(5.0), num_resamples=5)
  with pytest.raises(ValueError, match="finite"):
    rm_evals.bootstrap_correlation(np.r_[np.nan, 1.0, 2.0], np.arange(3.0))
