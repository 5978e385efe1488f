"""Reward over-optimisation functional forms of Gao et al. (2022) and their least-squares fits.

With ``d = sqrt(KL(pi || pi_init))`` and rewards re-centred so that ``pi_init`` scores 0, Gao et
al. model the gold reward reached by best-of-n and by RL as

* ``R_bon(d) = d (alpha_bon - beta_bon d)``,
* ``R_RL(d) = d (alpha_RL - beta_RL log d)`` (with ``d log d -> 0`` at ``d = 0``).

Both are linear in ``(alpha, beta)`` for fixed ``d``, so `fit_bon` and `fit_rl` fit them by
(weighted) least squares without an intercept and return a `Fit` with standard errors, 95%
t-intervals and R². `gold_peak` gives where a fitted curve peaks. Everything here is NumPy on
the host: these are analysis functions for a handful of points, not training-step code. The
Student-t quantile is computed here (`student_t_quantile`), so SciPy is not needed.

References:
    Gao, Schulman & Hilton, "Scaling laws for reward model overoptimization", 2022
    (arXiv:2210.10760), section 3 and eqs. (1)–(2).
"""

import functools
import math
from typing import NamedTuple

from jax.typing import ArrayLike
import numpy as np

from jaxrm.math.metrics import spearman  # noqa: F401  (re-exported: rank agreement of fitted quantities)

_FORMS = ("bon", "rl")


def _d_log_d(d: np.ndarray) -> np.ndarray:
  """``d log d`` with its limit 0 at ``d = 0``."""
  return np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)


def bon_reward(d: ArrayLike, *, alpha: float, beta: float) -> np.ndarray:
  """Best-of-n form ``R_bon(d) = d (alpha - beta d)``, ``d = sqrt(KL)`` of any shape."""
  d = np.asarray(d, np.float64)
  return d * (alpha - beta * d)


def rl_reward(d: ArrayLike, *, alpha: float, beta: float) -> np.ndarray:
  """RL form ``R_RL(d) = d (alpha - beta log d)`` (0 at ``d = 0``), ``d`` of any shape."""
  d = np.asarray(d, np.float64)
  return alpha * d - beta * _d_log_d(d)


class Fit(NamedTuple):
  """A least-squares fit of a Gao et al. (2022) form; ``predict(d)`` evaluates it."""

  form: str  # 'bon' or 'rl'
  alpha: float
  beta: float
  alpha_stderr: float
  beta_stderr: float
  alpha_ci: tuple[float, float]  # 95% t-interval
  beta_ci: tuple[float, float]  # 95% t-interval
  r_squared: float  # weighted, centred: 1 - SS_res / SS_tot
  num_points: int  # points with non-zero weight

  def predict(self, d: ArrayLike) -> np.ndarray:
    """The fitted reward at ``d = sqrt(KL)`` (any shape)."""
    form = bon_reward if self.form == "bon" else rl_reward
    return form(d, alpha=self.alpha, beta=self.beta)


# ------------------------------------------------------------------------------ t quantile
def _betacf(a: float, b: float, x: float) -> float:
  """Continued fraction for the incomplete beta function (modified Lentz)."""
  tiny, eps = 1e-300, 1e-16
  c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
  d = 1.0 / (d if abs(d) > tiny else tiny)
  h = d
  for m in range(1, 1000):
    for numerator in (
      m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
      -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
    ):
      d = 1.0 + numerator * d
      d = 1.0 / (d if abs(d) > tiny else tiny)
      c = 1.0 + numerator / c
      c = c if abs(c) > tiny else tiny
      h *= d * c
    if abs(d * c - 1.0) < eps:
      break
  return h


def _betainc(a: float, b: float, x: float) -> float:
  """Regularised incomplete beta function ``I_x(a, b)`` in float64."""
  if x <= 0.0:
    return 0.0
  if x >= 1.0:
    return 1.0
  log_front = (
    math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
  )
  if x < (a + 1.0) / (a + b + 2.0):
    return math.exp(log_front) * _betacf(a, b, x) / a
  return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def _student_t_sf(t: float, df: float) -> float:
  """``P(T > t)`` for ``t >= 0``: ``I_{df / (df + t^2)}(df / 2, 1 / 2) / 2``."""
  return 0.5 * _betainc(0.5 * df, 0.5, df / (df + t * t))


@functools.lru_cache(maxsize=256)
def student_t_quantile(q: float, df: float) -> float:
  """Quantile ``t`` with ``P(T <= t) = q`` of Student's t with ``df > 0`` degrees of freedom.

  The survival function is the regularised incomplete beta function, evaluated by its
  continued fraction (Numerical Recipes, section 6.4), and inverted by bisection to
  float64 precision (relative error ~1e-12; checked against ``scipy.stats.t.ppf``).

  Args:
      q: probability in ``(0, 1)``.
      df: degrees of freedom, ``> 0`` (need not be an integer).

  Returns:
      The quantile, a Python float.
  """
  if not 0.0 < q < 1.0:
    raise ValueError(f"q must be in (0, 1), got {q}")
  if not df > 0:
    raise ValueError(f"df must be > 0, got {df}")
  if q < 0.5:
    return -student_t_quantile(1.0 - q, df)
  tail = 1.0 - q
  low, high = 0.0, 1.0
  while _student_t_sf(high, df) > tail:
    low, high = high, 2.0 * high
  for _ in range(200):
    mid = 0.5 * (low + high)
    if _student_t_sf(mid, df) > tail:
      low = mid
    else:
      high = mid
    if high - low <= 1e-14 * high:
      break
  return 0.5 * (low + high)


# ------------------------------------------------------------------------------ fits
def _fit(form: str, d: ArrayLike, r: ArrayLike, weights: ArrayLike | None) -> Fit:
  d, r = np.asarray(d, np.float64), np.asarray(r, np.float64)
  if d.ndim != 1:
    raise ValueError(f"d must have shape [n], got {d.shape}")
  if r.shape != d.shape:
    raise ValueError(f"r must have the shape of d {d.shape}, got {r.shape}")
  if not (np.all(np.isfinite(d)) and np.all(np.isfinite(r))):
    raise ValueError("d and r must be finite")
  if np.any(d < 0):
    raise ValueError(f"d = sqrt(KL) must be >= 0, got min {d.min()}")
  w = np.ones_like(d) if weights is None else np.asarray(weights, np.float64)
  if w.shape != d.shape:
    raise ValueError(f"weights must have the shape of d {d.shape}, got {w.shape}")
  if np.any(w < 0) or not np.all(np.isfinite(w)):
    raise ValueError("weights must be finite and >= 0")
  n = int(np.sum(w > 0))
  if n < 3:
    raise ValueError(f"need at least 3 points with non-zero weight to fit, got {n}")

  second = d * d if form == "bon" else _d_log_d(d)
  x = np.stack([d, -second], axis=1)  # r = alpha * x[:, 0] + beta * x[:, 1]
  sw = np.sqrt(w)
  xw, rw = x * sw[:, None], r * sw
  if np.linalg.matrix_rank(xw) < 2:
    raise ValueError(
      f"alpha and beta of the {form!r} form are not identifiable: need "
      f"at least two distinct d > 0 with non-zero weight"
    )
  coef = np.linalg.lstsq(xw, rw, rcond=None)[0]
  residual = rw - xw @ coef
  ss_res = float(residual @ residual)
  dof = n - 2
  covariance = ss_res / dof * np.linalg.inv(xw.T @ xw)
  stderr = np.sqrt(np.maximum(np.diag(covariance), 0.0))
  r_mean = np.sum(w * r) / np.sum(w)
  ss_tot = float(np.sum(w * (r - r_mean) ** 2))
  t = student_t_quantile(0.975, dof)
  alpha, beta = float(coef[0]), float(coef[1])
  return Fit(
    form=form,
    alpha=alpha,
    beta=beta,
    alpha_stderr=float(stderr[0]),
    beta_stderr=float(stderr[1]),
    alpha_ci=(alpha - t * float(stderr[0]), alpha + t * float(stderr[0])),
    beta_ci=(beta - t * float(stderr[1]), beta + t * float(stderr[1])),
    r_squared=1.0 - ss_res / ss_tot if ss_tot > 0 else math.nan,
    num_points=n,
  )


_FIT_DOC = """Fits ``{formula}`` by weighted least squares (no intercept).

    Standard errors are the usual OLS/WLS ones, ``s^2 (X^T W X)^-1`` with the residual variance
    ``s^2 = sum w e^2 / (n - 2)``: the weights are relative precisions (e.g. inverse variances,
    or the number of seeds averaged into a point), so scaling all weights changes nothing and
    an integer weight is the same as repeating the point. The 95% intervals use the Student-t
    quantile with ``n - 2`` degrees of freedom (`student_t_quantile`), exact for Gaussian
    noise. ``r_squared`` is the weighted centred R², ``1 - SS_res / SS_tot`` (it can be
    negative for a model without intercept; NaN when all ``r`` are equal).

    Args:
        d: ``sqrt(KL(pi || pi_init))`` per point, ``[n]``, all ``>= 0``.
        r: gold (or proxy) reward per point, re-centred so ``pi_init`` scores 0, ``[n]``.
        weights: non-negative weights ``[n]``; ``None`` means all ones. Points with weight 0
            are ignored; at least 3 points must remain.

    Returns:
        A `Fit` with ``form='{form}'``.

    Raises:
        ValueError: for mismatched shapes, negative or non-finite inputs, fewer than 3
            points, or ``d`` values that cannot identify ``alpha`` and ``beta``.
    """


def fit_bon(d: ArrayLike, r: ArrayLike, *, weights: ArrayLike | None = None) -> Fit:
  return _fit("bon", d, r, weights)


def fit_rl(d: ArrayLike, r: ArrayLike, *, weights: ArrayLike | None = None) -> Fit:
  return _fit("rl", d, r, weights)


fit_bon.__doc__ = _FIT_DOC.format(formula="R_bon(d) = d (alpha - beta d)", form="bon")
fit_rl.__doc__ = _FIT_DOC.format(formula="R_RL(d) = d (alpha - beta log d)", form="rl")


def gold_peak(fit: Fit) -> tuple[float, float]:
  """Where a fitted curve peaks over ``d >= 0``: ``(d_star, R_star)``.

  * ``'bon'``: ``d* = alpha / (2 beta)``, ``R* = alpha^2 / (4 beta)`` for ``beta > 0``.
  * ``'rl'``: ``dR/dd = alpha - beta (log d + 1) = 0`` gives ``d* = exp(alpha / beta - 1)`` and
    ``R* = beta d*`` for ``beta > 0`` (``(inf, inf)`` if ``d*`` overflows float64).

  With ``beta < 0``, or ``beta = 0`` and ``alpha > 0``, the curve grows without bound (no
  peak): ``(inf, inf)`` is returned. With ``beta = 0`` and ``alpha <= 0``, or for the bon
  form with ``beta > 0`` and ``alpha <= 0``, the reward never rises above its value at
  ``pi_init``: the maximum is at the boundary, ``(0.0, 0.0)``.

  Args:
      fit: a `Fit` from `fit_bon` or `fit_rl`.

  Returns:
      ``(d_star, R_star)`` as Python floats; ``KL* = d_star ** 2``.
  """
  alpha, beta = fit.alpha, fit.beta
  if fit.form not in _FORMS:
    raise ValueError(f"fit.form must be one of {_FORMS}, got {fit.form!r}")
  if beta < 0 or (beta == 0 and alpha > 0):
    return math.inf, math.inf
  if beta == 0 or (fit.form == "bon" and alpha <= 0):
    return 0.0, 0.0
  if fit.form == "bon":
    return alpha / (2.0 * beta), alpha * alpha / (4.0 * beta)
  exponent = alpha / beta - 1.0
  if exponent > 700.0:  # the peak lies beyond float64 range
    return math.inf, math.inf
  d_star = math.exp(exponent)
  return d_star, beta * d_star
