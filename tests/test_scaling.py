"""Tests for jaxrm.math.scaling: Gao et al. (2022) forms, least-squares fits and peaks."""

import math

import numpy as np
import pytest
from scipy import stats

from jaxrm.math import metrics, scaling

D = np.linspace(0.0, 6.0, 13)  # includes d = 0
TRUTH = {"bon": (1.2, 0.3), "rl": (0.8, 0.35)}
FIT = {"bon": scaling.fit_bon, "rl": scaling.fit_rl}


def _np_form(form, d, alpha, beta):
  """Independent reference: bon d(a - b d); rl a d - b d log d with 0 log 0 = 0."""
  d = np.asarray(d, np.float64)
  if form == "bon":
    return d * (alpha - beta * d)
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(d == 0, 0.0, d * (alpha - beta * np.log(d)))


@pytest.mark.parametrize("form", ["bon", "rl"])
def test_functional_forms_match_their_formulas_and_vanish_at_zero(form):
  fn = scaling.bon_reward if form == "bon" else scaling.rl_reward
  d = np.array([0.0, 1e-300, 0.5, 1.0, 2.0, 7.0])
  np.testing.assert_allclose(
    fn(d, alpha=1.5, beta=0.4), _np_form(form, d, 1.5, 0.4), rtol=1e-14, atol=0
  )
  assert fn(0.0, alpha=1.5, beta=0.4) == 0.0


@pytest.mark.parametrize("form", ["bon", "rl"])
def test_noiseless_fit_recovers_alpha_beta_exactly_with_unit_r_squared(form):
  alpha, beta = TRUTH[form]
  fit = FIT[form](D, _np_form(form, D, alpha, beta))
  assert fit.form == form and fit.num_points == len(D)
  np.testing.assert_allclose([fit.alpha, fit.beta], [alpha, beta], rtol=1e-12)
  np.testing.assert_allclose(fit.r_squared, 1.0, rtol=1e-12)
  assert fit.alpha_stderr < 1e-10 and fit.beta_stderr < 1e-10
  d_new = np.array([0.0, 0.3, 9.0])
  np.testing.assert_allclose(
    fit.predict(d_new), _np_form(form, d_new, alpha, beta), rtol=1e-12, atol=1e-14
  )


@pytest.mark.parametrize("form", ["bon", "rl"])
def test_noisy_fit_recovers_alpha_beta_within_three_standard_errors(form):
  # One draw; that the 95% intervals cover the truth 95% of the time is tested below.
  alpha, beta = TRUTH[form]
  rng = np.random.default_rng(0)
  r = _np_form(form, D, alpha, beta) + 0.1 * rng.normal(size=D.shape)
  fit = FIT[form](D, r)
  assert abs(fit.alpha - alpha) < 3 * fit.alpha_stderr
  assert abs(fit.beta - beta) < 3 * fit.beta_stderr
  # The standard errors estimate the true ones, 0.1 * sqrt(diag((X^T X)^-1)).
  x = np.stack([D, -(D * D if form == "bon" else _np_form("rl", D, 0.0, -1.0))], axis=1)
  true_stderr = 0.1 * np.sqrt(np.diag(np.linalg.inv(x.T @ x)))
  ratio = np.array([fit.alpha_stderr, fit.beta_stderr]) / true_stderr
  assert np.all((0.5 < ratio) & (ratio < 1.5)), ratio
  assert 0.9 < fit.r_squared < 1.0
  t = stats.t.ppf(0.975, len(D) - 2)
  np.testing.assert_allclose(
    fit.alpha_ci, [fit.alpha - t * fit.alpha_stderr, fit.alpha + t * fit.alpha_stderr], rtol=1e-12
  )


@pytest.mark.parametrize("form", ["bon", "rl"])
def test_fit_matches_numpy_least_squares_and_scipy_standard_errors(form):
  rng = np.random.default_rng(1)
  alpha, beta = TRUTH[form]
  d = rng.uniform(0.1, 5.0, size=20)
  r = _np_form(form, d, alpha, beta) + 0.2 * rng.normal(size=20)
  x = np.stack([d, -(d * d if form == "bon" else d * np.log(d))], axis=1)
  coef, ss_res = np.linalg.lstsq(x, r, rcond=None)[:2]
  cov = ss_res[0] / 18 * np.linalg.inv(x.T @ x)
  fit = FIT[form](d, r)
  np.testing.assert_allclose([fit.alpha, fit.beta], coef, rtol=1e-10)
  np.testing.assert_allclose([fit.alpha_stderr, fit.beta_stderr], np.sqrt(np.diag(cov)), rtol=1e-10)
  np.testing.assert_allclose(fit.r_squared, 1 - ss_res[0] / np.sum((r - r.mean()) ** 2), rtol=1e-10)


@pytest.mark.parametrize("form", ["bon", "rl"])
def test_confidence_intervals_have_95_percent_coverage_with_few_points(form):
  # With 5 points (3 degrees of freedom) a normal-quantile interval (1.96) would cover only
  # ~86%; the t-quantile (3.18) restores 95%.
  alpha, beta = TRUTH[form]
  d = np.array([0.5, 1.5, 2.5, 3.5, 4.5])
  rng = np.random.default_rng(2)
  hits = np.zeros(2)
  reps = 600
  for _ in range(reps):
    fit = FIT[form](d, _np_form(form, d, alpha, beta) + 0.3 * rng.normal(size=5))
    hits += [fit.alpha_ci[0] < alpha < fit.alpha_ci[1], fit.beta_ci[0] < beta < fit.beta_ci[1]]
  coverage = hits / reps
  assert np.all((0.93 < coverage) & (coverage < 0.97)), coverage


def test_weights_act_as_repetitions_are_scale_free_and_zero_weight_drops_a_point():
  rng = np.random.default_rng(3)
  d = np.array([0.5, 1.0, 2.0, 3.0, 4.0, 5.0])
  r = _np_form("bon", d, 1.0, 0.2) + 0.1 * rng.normal(size=6)
  w = np.array([1, 2, 1, 3, 1, 2])
  weighted = scaling.fit_bon(d, r, weights=w)
  repeated = scaling.fit_bon(np.repeat(d, w), np.repeat(r, w))
  np.testing.assert_allclose(
    [weighted.alpha, weighted.beta], [repeated.alpha, repeated.beta], rtol=1e-12
  )
  scaled = scaling.fit_bon(d, r, weights=10.0 * w)
  np.testing.assert_allclose(
    [scaled.alpha, scaled.beta, scaled.alpha_stderr, scaled.r_squared],
    [weighted.alpha, weighted.beta, weighted.alpha_stderr, weighted.r_squared],
    rtol=1e-12,
  )
  outlier = r.copy()
  outlier[2] += 100.0
  dropped = scaling.fit_rl(d, outlier, weights=[1, 1, 0, 1, 1, 1])
  kept = scaling.fit_rl(np.delete(d, 2), np.delete(r, 2))
  np.testing.assert_allclose([dropped.alpha, dropped.beta], [kept.alpha, kept.beta], rtol=1e-12)
  assert dropped.num_points == 5


def test_rl_fit_handles_d_equal_zero_as_the_limit_d_log_d_to_zero():
  d = np.array([0.0, 0.0, 0.5, 1.0, 2.0, 4.0])
  r = _np_form("rl", d, *TRUTH["rl"])
  fit = scaling.fit_rl(d, r)
  assert np.all(np.isfinite([fit.alpha, fit.beta, fit.alpha_stderr, fit.r_squared]))
  np.testing.assert_allclose([fit.alpha, fit.beta], TRUTH["rl"], rtol=1e-12)
  assert fit.predict(0.0) == 0.0


@pytest.mark.parametrize(
  "form, alpha, beta",
  [
    ("bon", 1.2, 0.3),
    ("bon", 0.4, 1.7),
    ("rl", 0.8, 0.35),
    ("rl", -0.5, 0.6),
    ("rl", 2.0, 0.9),
  ],
)
def test_gold_peak_matches_dense_grid_argmax(form, alpha, beta):
  fit = scaling.Fit(form, alpha, beta, 0.0, 0.0, (alpha, alpha), (beta, beta), 1.0, 10)
  d_star, r_star = scaling.gold_peak(fit)
  grid = np.linspace(0.0, 3 * d_star + 1.0, 2_000_001)
  values = _np_form(form, grid, alpha, beta)
  i = np.argmax(values)
  np.testing.assert_allclose(d_star, grid[i], atol=2 * (grid[1] - grid[0]))
  np.testing.assert_allclose(r_star, values[i], rtol=1e-9)
  np.testing.assert_allclose(r_star, fit.predict(d_star), rtol=1e-12)


@pytest.mark.parametrize(
  "form, alpha, beta, expected",
  [
    ("bon", 1.0, -0.2, (math.inf, math.inf)),
    ("bon", 1.0, 0.0, (math.inf, math.inf)),
    ("bon", -1.0, 0.5, (0.0, 0.0)),
    ("bon", -1.0, 0.0, (0.0, 0.0)),
    ("rl", 1.0, -0.2, (math.inf, math.inf)),
    ("rl", -1.0, -0.2, (math.inf, math.inf)),
    ("rl", 1.0, 0.0, (math.inf, math.inf)),
    ("rl", -1.0, 0.0, (0.0, 0.0)),
    ("rl", 1000.0, 1.0, (math.inf, math.inf)),
  ],
)
def test_gold_peak_without_interior_peak_reports_unbounded_or_boundary(form, alpha, beta, expected):
  fit = scaling.Fit(form, alpha, beta, 0.0, 0.0, (alpha, alpha), (beta, beta), 1.0, 10)
  assert scaling.gold_peak(fit) == expected
  if expected[0] == math.inf and beta != 0:  # the reward really does keep rising
    far = np.array([1e3, 1e4, 1e5])
    assert np.all(np.diff(fit.predict(far)) > 0)


def test_gold_peak_of_fitted_noisy_curve_is_near_true_peak():
  alpha, beta = TRUTH["bon"]
  rng = np.random.default_rng(4)
  fit = scaling.fit_bon(D, _np_form("bon", D, alpha, beta) + 0.02 * rng.normal(size=D.shape))
  d_star, r_star = scaling.gold_peak(fit)
  np.testing.assert_allclose(
    [d_star, r_star], [alpha / (2 * beta), alpha**2 / (4 * beta)], rtol=0.05
  )


@pytest.mark.parametrize("q", [0.005, 0.025, 0.6, 0.9, 0.975, 0.9995])
@pytest.mark.parametrize("df", [1, 2, 3, 4.5, 11, 30, 200])
def test_student_t_quantile_matches_scipy(q, df):
  np.testing.assert_allclose(scaling.student_t_quantile(q, df), stats.t.ppf(q, df), rtol=1e-11)


def test_spearman_is_reexported_from_metrics():
  assert scaling.spearman is metrics.spearman
  assert scaling.spearman([1.0, 2.0, 3.0], [1.0, 4.0, 9.0]) == 1.0


@pytest.mark.parametrize(
  "call, message",
  [
    (lambda: scaling.fit_bon(np.ones((2, 3)), np.ones((2, 3))), r"d must have shape \[n\]"),
    (
      lambda: scaling.fit_rl(np.ones(4), np.ones(5)),
      r"r must have the shape of d \(4,\), got \(5,\)",
    ),
    (lambda: scaling.fit_bon([-1.0, 1.0, 2.0], [0.0, 1.0, 2.0]), r"d = sqrt\(KL\) must be >= 0"),
    (lambda: scaling.fit_bon([1.0, 2.0], [0.0, 1.0]), r"at least 3 points"),
    (
      lambda: scaling.fit_rl([1.0, 2.0, 3.0], [0.0, 1.0, 2.0], weights=[1, 1]),
      r"weights must have the shape of d \(3,\), got \(2,\)",
    ),
    (
      lambda: scaling.fit_rl([1.0, 2.0, 3.0], [0.0, 1.0, 2.0], weights=[1, -1, 1]),
      r"weights must be finite and >= 0",
    ),
    (lambda: scaling.fit_bon([0.0, 2.0, 2.0], [0.0, 1.0, 1.0]), r"not identifiable"),
    (lambda: scaling.fit_bon([0.0, 1.0, np.nan], [0.0, 1.0, 1.0]), r"must be finite"),
    (lambda: scaling.student_t_quantile(1.0, 3), r"q must be in \(0, 1\)"),
    (lambda: scaling.student_t_quantile(0.5, 0), r"df must be > 0"),
  ],
)
def test_bad_inputs_raise_value_error_naming_the_argument(call, message):
  with pytest.raises(ValueError, match=message):
    call()
