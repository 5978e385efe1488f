"""Tests for jaxrm.math.metrics against float64 NumPy references and scipy.stats."""

import functools
import math

import jax
import numpy as np
import pytest
from scipy import stats

from jaxrm.math import metrics


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _pairs(seed, n=400, ties=False):
  rng = np.random.default_rng(seed)
  if ties:  # small integer rewards: many exact ties
    return rng.integers(-2, 3, n).astype(np.float64), rng.integers(-2, 3, n).astype(np.float64)
  return rng.normal(size=n) + 0.5, rng.normal(size=n)


def _np_kendall_tau_b(x, y):
  """O(n^2) definition of Kendall's tau-b."""
  sx = np.sign(x[:, None] - x[None, :])
  sy = np.sign(y[:, None] - y[None, :])
  upper = np.triu(np.ones_like(sx, bool), k=1)
  numerator = np.sum((sx * sy)[upper])
  return numerator / np.sqrt(np.sum(sx[upper] != 0) * np.sum(sy[upper] != 0))


# ------------------------------------------------------------------------------ pairwise
@pytest.mark.parametrize("use_labels", [False, True])
def test_pairwise_accuracy_counts_ties_as_half_and_matches_numpy(use_labels):
  rc, rr = _pairs(0, ties=True)
  labels = np.random.default_rng(1).uniform(size=rc.shape) if use_labels else None
  p = labels if use_labels else np.ones_like(rc)
  s = (rc > rr) + 0.5 * (rc == rr)
  got = jax.jit(functools.partial(metrics.pairwise_accuracy, labels=labels))(rc, rr)
  np.testing.assert_allclose(got, np.mean(p * s + (1 - p) * (1 - s)), rtol=1e-6)
  assert np.sum(rc == rr) > 50  # the ties were exercised
  assert metrics.pairwise_accuracy(np.ones(4), np.ones(4)) == 0.5


@pytest.mark.parametrize("use_labels", [False, True])
def test_log_loss_and_brier_score_match_numpy(use_labels):
  rc, rr = _pairs(2)
  p = np.random.default_rng(3).uniform(size=rc.shape) if use_labels else np.ones_like(rc)
  labels = p if use_labels else None
  q = _sigmoid(rc - rr)
  np.testing.assert_allclose(
    jax.jit(functools.partial(metrics.log_loss, labels=labels))(rc, rr),
    np.mean(-p * np.log(q) - (1 - p) * np.log(1 - q)),
    rtol=1e-5,
  )
  np.testing.assert_allclose(
    jax.jit(functools.partial(metrics.brier_score, labels=labels))(rc, rr),
    np.mean((q - p) ** 2),
    rtol=1e-5,
  )


# ------------------------------------------------------------------------------ calibration
def _np_ece(q, p, num_bins):
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  bins = np.clip(np.digitize(q, edges[1:-1]), 0, num_bins - 1)
  conf, acc, count = np.full(num_bins, np.nan), np.full(num_bins, np.nan), np.zeros(num_bins)
  ece = 0.0
  for b in range(num_bins):
    in_bin = bins == b
    count[b] = in_bin.sum()
    if count[b]:
      conf[b], acc[b] = q[in_bin].mean(), p[in_bin].mean()
      ece += count[b] / len(q) * abs(acc[b] - conf[b])
  return ece, conf, acc, count


@pytest.mark.parametrize("num_bins", [5, 15])
@pytest.mark.parametrize("use_labels", [False, True])
def test_expected_calibration_error_matches_numpy_reliability_diagram(num_bins, use_labels):
  rng = np.random.default_rng(4)
  rc, rr = rng.normal(size=300) * 3, np.zeros(300)
  rc[:5] = -40.0  # saturated probabilities leave some bins empty, others at the edges
  labels = (rng.uniform(size=300) < _sigmoid(rc / 2)).astype(np.float64) if use_labels else None
  p = labels if use_labels else np.ones(300)
  got = jax.jit(
    functools.partial(metrics.expected_calibration_error, labels=labels, num_bins=num_bins)
  )(rc, rr)
  ece, conf, acc, count = _np_ece(_sigmoid(rc - rr), p, num_bins)
  np.testing.assert_allclose(got.ece, ece, rtol=1e-5)
  np.testing.assert_allclose(got.confidence, conf, rtol=1e-5)
  np.testing.assert_allclose(got.accuracy, acc, rtol=1e-5)
  np.testing.assert_array_equal(got.count, count)
  assert got.count.sum() == 300


def test_expected_calibration_error_takes_a_numpy_int_bin_count():
  rc, rr = np.linspace(-3, 3, 50), np.zeros(50)
  want = metrics.expected_calibration_error(rc, rr, num_bins=7)
  got = metrics.expected_calibration_error(rc, rr, num_bins=np.int64(7))
  np.testing.assert_array_equal(got.count, want.count)
  assert float(got.ece) == float(want.ece)


def test_expected_calibration_error_is_zero_for_calibrated_and_large_for_overconfident():
  # Every pair predicted 0.5 and half of the labels say "chosen preferred": calibrated.
  labels = np.tile([1.0, 0.0], 50)
  calibrated = metrics.expected_calibration_error(np.zeros(100), np.zeros(100), labels=labels)
  assert calibrated.ece == 0.0
  assert np.sum(np.isnan(np.asarray(calibrated.accuracy))) == 9  # nine empty bins
  # Confident (q ~ 1) but right only half the time: ECE ~ 0.5.
  confident = metrics.expected_calibration_error(np.full(100, 20.0), np.zeros(100), labels=labels)
  np.testing.assert_allclose(confident.ece, 0.5, atol=1e-6)


# ------------------------------------------------------------------------------ distributions
def test_reward_margin_and_length_statistics_match_numpy():
  rng = np.random.default_rng(5)
  rc, rr = _pairs(5)
  delta = rc - rr
  mean, std = jax.jit(metrics.reward_mean_std)(np.stack([rc, rr]))
  np.testing.assert_allclose([mean, std], [np.mean([rc, rr]), np.std([rc, rr])], rtol=1e-5)
  qs = (0.1, 0.5, 0.9)
  np.testing.assert_allclose(
    jax.jit(functools.partial(metrics.margin_quantiles, quantiles=qs))(rc, rr),
    np.quantile(delta, qs),
    rtol=1e-5,
  )
  counts, edges = jax.jit(
    functools.partial(metrics.margin_histogram, num_bins=7, value_range=(-3.0, 3.0))
  )(rc, rr)
  np_counts, np_edges = np.histogram(delta, bins=7, range=(-3.0, 3.0))
  np.testing.assert_array_equal(counts, np_counts)
  np.testing.assert_allclose(edges, np_edges, rtol=1e-6)
  lengths = rng.integers(1, 50, size=rc.shape)
  rewards = 0.05 * lengths + rng.normal(size=rc.shape)
  np.testing.assert_allclose(
    jax.jit(metrics.length_correlation)(rewards, lengths),
    np.corrcoef(rewards, lengths)[0, 1],
    rtol=1e-5,
  )
  np.testing.assert_allclose(
    jax.jit(metrics.pearson_correlation)(rc, rr), np.corrcoef(rc, rr)[0, 1], rtol=1e-4, atol=1e-6
  )


def test_gold_pairwise_accuracy_scores_sign_agreement_with_ties_half():
  rng = np.random.default_rng(6)
  gold_a, gold_b = rng.integers(0, 3, 200).astype(float), rng.integers(0, 3, 200).astype(float)
  proxy_a, proxy_b = gold_a + rng.normal(size=200), gold_b + rng.normal(size=200)
  proxy_b[:10] = proxy_a[:10]  # proxy ties
  proxy_sign, gold_sign = np.sign(proxy_a - proxy_b), np.sign(gold_a - gold_b)
  expected = np.mean(
    np.where(proxy_sign == gold_sign, 1.0, np.where(proxy_sign * gold_sign == 0, 0.5, 0.0))
  )
  assert 0 < np.sum(gold_sign == 0) and 0 < np.sum(proxy_sign == 0)  # ties exercised
  np.testing.assert_allclose(
    jax.jit(metrics.gold_pairwise_accuracy)(proxy_a, proxy_b, gold_a, gold_b), expected, rtol=1e-6
  )
  assert metrics.gold_pairwise_accuracy(gold_a, gold_b, gold_a, gold_b) == 1.0
  np.testing.assert_allclose(
    metrics.gold_pairwise_accuracy(gold_b, gold_a, gold_a, gold_b),
    np.mean(gold_a == gold_b),
    rtol=1e-6,
  )


# ------------------------------------------------------------------------------ rank statistics
def test_rankdata_gives_average_ranks_like_scipy():
  x = np.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0, 5.0, 3.0, 5.0])
  np.testing.assert_array_equal(metrics.rankdata(x), stats.rankdata(x))
  np.testing.assert_array_equal(metrics.rankdata(np.array([])), np.array([]))


@pytest.mark.parametrize("ties", [False, True])
def test_spearman_and_kendall_tau_b_match_scipy_and_numpy(ties):
  rng = np.random.default_rng(7)
  if ties:
    x = rng.integers(0, 6, 300).astype(float)
    y = rng.integers(0, 4, 300) + 0.5 * x
  else:
    x = rng.normal(size=300)
    y = x + rng.normal(size=300)
  tau = metrics.kendall_tau(x, y)
  rho = metrics.spearman(x, y)
  assert isinstance(tau, float) and isinstance(rho, float)
  np.testing.assert_allclose(tau, stats.kendalltau(x, y, variant="b").statistic, rtol=1e-12)
  np.testing.assert_allclose(tau, _np_kendall_tau_b(x, y), rtol=1e-12)
  np.testing.assert_allclose(rho, stats.spearmanr(x, y).statistic, rtol=1e-12)
  np.testing.assert_allclose(
    rho, np.corrcoef(stats.rankdata(x), stats.rankdata(y))[0, 1], rtol=1e-12
  )


def test_rank_correlations_are_one_for_monotone_maps_and_nan_for_constants():
  x = np.random.default_rng(8).normal(size=50)
  assert metrics.kendall_tau(x, np.exp(x)) == pytest.approx(1.0)
  assert metrics.spearman(x, x**3) == pytest.approx(1.0)
  assert metrics.kendall_tau(x, -x) == pytest.approx(-1.0)
  assert math.isnan(metrics.kendall_tau(x, np.ones(50)))
  assert math.isnan(metrics.spearman(np.ones(50), x))


def test_gold_agreement_reports_accuracy_and_rank_correlations_as_floats():
  rng = np.random.default_rng(9)
  gold_a, gold_b = rng.normal(size=100), rng.normal(size=100)
  proxy_a, proxy_b = gold_a + 0.5 * rng.normal(size=100), gold_b + 0.5 * rng.normal(size=100)
  got = metrics.gold_agreement(proxy_a, proxy_b, gold_a, gold_b)
  proxy, gold = np.r_[proxy_a, proxy_b], np.r_[gold_a, gold_b]
  assert set(got) == {"pairwise_accuracy", "spearman", "kendall_tau"}
  assert all(isinstance(v, float) for v in got.values())
  np.testing.assert_allclose(got["spearman"], stats.spearmanr(proxy, gold).statistic)
  np.testing.assert_allclose(got["kendall_tau"], stats.kendalltau(proxy, gold).statistic)
  np.testing.assert_allclose(
    got["pairwise_accuracy"], np.mean((proxy_a > proxy_b) == (gold_a > gold_b)), rtol=1e-6
  )


# ------------------------------------------------------------------------------ summary
def test_summarize_preferences_returns_python_floats_matching_the_metrics():
  rc, rr = _pairs(10)
  summary = metrics.summarize_preferences(rc, rr, num_bins=12)
  assert all(type(v) is float for v in summary.values())
  q = _sigmoid(rc - rr)
  expected = {
    "accuracy": np.mean((rc > rr) + 0.5 * (rc == rr)),
    "log_loss": -np.mean(np.log(q)),
    "brier": np.mean((q - 1) ** 2),
    "ece": _np_ece(q, np.ones_like(q), 12)[0],
    "reward_mean": np.mean([rc, rr]),
    "reward_std": np.std([rc, rr]),
    "chosen_mean": np.mean(rc),
    "rejected_mean": np.mean(rr),
    "margin_mean": np.mean(rc - rr),
    "margin_std": np.std(rc - rr),
    "margin_q10": np.quantile(rc - rr, 0.1),
    "margin_q50": np.quantile(rc - rr, 0.5),
    "margin_q90": np.quantile(rc - rr, 0.9),
  }
  assert set(summary) == set(expected)
  for key, value in expected.items():
    np.testing.assert_allclose(summary[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
  labelled = metrics.summarize_preferences(rc, rr, labels=np.zeros_like(rc))
  np.testing.assert_allclose(labelled["accuracy"], 1 - summary["accuracy"], rtol=1e-6)


# ------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize(
  "call, message",
  [
    (
      lambda: metrics.pairwise_accuracy(np.zeros((2, 3)), np.zeros((2, 3))),
      r"rewards_chosen must have shape \[batch\] with batch > 0, got \(2, 3\)",
    ),
    (
      lambda: metrics.brier_score(np.zeros(3), np.zeros(2)),
      r"rewards_rejected must have the shape of rewards_chosen \(3,\), got \(2,\)",
    ),
    (
      lambda: metrics.log_loss(np.zeros(3), np.zeros(3), labels=np.zeros(2)),
      r"labels must have shape \(3,\), got \(2,\)",
    ),
    (
      lambda: metrics.expected_calibration_error(np.zeros(3), np.zeros(3), num_bins=0),
      r"num_bins must be a positive int",
    ),
    (
      lambda: metrics.pearson_correlation(np.zeros(3), np.zeros(4)),
      r"y must have the shape of x \(3,\), got \(4,\)",
    ),
    (
      lambda: metrics.kendall_tau(np.zeros(1), np.zeros(1)),
      r"x must have shape \[n\] with n >= 2, got \(1,\)",
    ),
    (lambda: metrics.spearman(np.zeros(3), np.array([0.0, np.nan, 1.0])), r"y must be finite"),
    (
      lambda: metrics.margin_quantiles(np.zeros(3), np.zeros(3), quantiles=(5, 50, 95)),
      r"quantiles must lie in \[0.0, 1.0\], got 5.0",
    ),
  ],
)
def test_bad_inputs_raise_value_error_naming_the_argument(call, message):
  with pytest.raises(ValueError, match=message):
    call()
