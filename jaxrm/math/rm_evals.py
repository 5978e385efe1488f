"""Reward-model evaluations beyond pairwise accuracy, and bootstrap intervals for correlations.

A reward model is usually chosen by its held-out pairwise accuracy; what matters is the gold
reward a policy reaches when optimised against it (Lambert & Calandra 2023, Wen et al. 2024).
These functions score a reward model in the ways the objective-mismatch literature compares.
They take scores, not models, so they apply to any reward model and any labelled data
(synthetic or real):

* pure ``jax.numpy`` (jit-able): :func:`pairwise_accuracy` (re-exported from
  :mod:`jaxrm.math.metrics`), :func:`accuracy_by_gold_gap` (small vs large gold gaps),
  :func:`best_of_k_accuracy` (does the RM pick gold's best of K responses; the gold regret of
  its pick), :func:`one_vs_many_accuracy` (one chosen against many rejected, Kim et al. 2024),
  :func:`policy_pair_accuracy` (pairs sampled from an optimised policy: off-distribution);
  log-loss and ECE are :func:`jaxrm.math.metrics.log_loss` and
  :func:`jaxrm.math.metrics.expected_calibration_error`;
* NumPy host functions (rank statistics, used on evaluation sets, not inside steps):
  :func:`top_quantile_rank_correlation` (Spearman / Kendall with gold on the top quantile of
  responses, the region optimisation visits), :func:`batch_spearman` and
  :func:`batch_kendall_tau` (many correlations at once), :func:`bootstrap_correlation`
  (percentile bootstrap intervals resampling the units, e.g. proxies) and
  :func:`bootstrap_correlation_difference` (paired: do two evaluations predict an outcome
  differently?).

Ties follow :mod:`jaxrm.math.best_of_n`: a reward model that ties picks uniformly among its
tied maxima, so a tie scores the expected value of that random pick.

References:
    Lambert & Calandra, "The Alignment Ceiling: Objective Mismatch in Reinforcement Learning
    from Human Feedback", 2023. Wen et al., "Rethinking Reward Model Evaluation: Are We
    Barking up the Wrong Tree?", ICLR 2025. Kim et al., "Evaluating Robustness of Reward
    Models for Mathematical Reasoning" (RewardMATH), 2024. Frick et al., "How to Evaluate
    Reward Models for RLHF" (PPE), 2024.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import numpy as np

from jaxrm.math import metrics
from jaxrm.math._arrays import as_float

pairwise_accuracy = metrics.pairwise_accuracy
log_loss = metrics.log_loss
expected_calibration_error = metrics.expected_calibration_error


# ------------------------------------------------------------------------------ jax evaluations
def _same_shape(name: str, x: jax.Array, ref_name: str, ref: jax.Array) -> None:
  if x.shape != ref.shape:
    raise ValueError(f"{name} must have the shape of {ref_name} {ref.shape}, got {x.shape}")


class GapAccuracy(NamedTuple):
  """Pairwise accuracy on pairs with a small and with a large gold gap."""

  small: jax.Array  # shape=(), accuracy on pairs with |gold gap| < threshold (NaN if none)
  large: jax.Array  # shape=(), accuracy on pairs with |gold gap| >= threshold (NaN if none)
  threshold: jax.Array  # shape=(), the gap threshold used
  fraction_small: jax.Array  # shape=(), share of pairs in the small-gap group


def accuracy_by_gold_gap(
  rewards_chosen: ArrayLike,
  rewards_rejected: ArrayLike,
  gold_chosen: ArrayLike,
  gold_rejected: ArrayLike,
  *,
  threshold: float | None = None,
) -> GapAccuracy:
  """Pairwise accuracy split by the size of the gold gap ``|gold_c - gold_r|``.

  Hard pairs (a small gold gap) are where a reward model's accuracy is informative about fine
  distinctions; easy pairs inflate accuracy (Wen et al. 2024 vary which pairs are scored).
  Per pair the score is that of :func:`jaxrm.math.metrics.pairwise_accuracy` (ties half).

  Args:
      rewards_chosen: reward-model scores of the chosen responses, ``[batch]``.
      rewards_rejected: scores of the rejected responses, ``[batch]``.
      gold_chosen: gold scores of the chosen responses, ``[batch]``.
      gold_rejected: gold scores of the rejected responses, ``[batch]``.
      threshold: gap separating small from large; default the median gap.

  Returns:
      A :class:`GapAccuracy`.
  """
  rc, rr = (
    as_float(rewards_chosen, "rewards_chosen"),
    as_float(rewards_rejected, "rewards_rejected"),
  )
  gc, gr = as_float(gold_chosen, "gold_chosen"), as_float(gold_rejected, "gold_rejected")
  if rc.ndim != 1 or rc.shape[0] == 0:
    raise ValueError(f"rewards_chosen must have shape [batch] with batch > 0, got {rc.shape}")
  _same_shape("rewards_rejected", rr, "rewards_chosen", rc)
  _same_shape("gold_chosen", gc, "rewards_chosen", rc)
  _same_shape("gold_rejected", gr, "rewards_chosen", rc)
  delta = rc - rr
  score = jnp.where(delta > 0, 1.0, jnp.where(delta == 0, 0.5, 0.0)).astype(delta.dtype)
  gap = jnp.abs(gc - gr).astype(delta.dtype)
  t = jnp.median(gap) if threshold is None else jnp.asarray(threshold, delta.dtype)
  small = (gap < t).astype(delta.dtype)
  large = 1.0 - small

  def mean_over(w):
    n = jnp.sum(w)
    return jnp.where(n > 0, jnp.sum(w * score) / jnp.maximum(n, 1.0), jnp.nan)

  return GapAccuracy(mean_over(small), mean_over(large), t, jnp.mean(small))


class BestOfK(NamedTuple):
  """How well a reward model picks the best of K responses per prompt."""

  accuracy: jax.Array  # shape=(), P(the RM's pick is gold's best), averaged over prompts
  regret: jax.Array  # shape=(), mean gold(best) - gold(RM's pick), >= 0
  per_prompt_accuracy: jax.Array  # [num_prompts]
  per_prompt_regret: jax.Array  # [num_prompts]


def best_of_k_accuracy(scores: ArrayLike, gold: ArrayLike) -> BestOfK:
  """Best-of-K accuracy and gold regret of the reward model's argmax over K responses.

  For each prompt the reward model picks its highest-scored response (uniformly among tied
  maxima); it is correct when the pick has the maximal gold score (any of gold's tied maxima
  counts). The regret is ``max_k gold - gold(pick)`` (expected over tied picks). This is the
  best-of-K evaluation of Frick et al. (2024) and, with ``K = 1 + M``, the one-vs-many
  accuracy of Kim et al. (2024) when gold's best is the chosen response.

  Args:
      scores: reward-model scores, ``[num_prompts, K]``.
      gold: gold scores of the same responses, ``[num_prompts, K]``.

  Returns:
      A :class:`BestOfK`.
  """
  s, g = as_float(scores, "scores"), as_float(gold, "gold")
  if s.ndim != 2 or s.shape[0] == 0 or s.shape[1] < 2:
    raise ValueError(f"scores must have shape [num_prompts, K] with K >= 2, got {s.shape}")
  _same_shape("gold", g, "scores", s)
  g = g.astype(s.dtype)
  picked = (s == jnp.max(s, axis=1, keepdims=True)).astype(s.dtype)
  picked = picked / jnp.sum(picked, axis=1, keepdims=True)  # uniform over tied maxima
  best = jnp.max(g, axis=1)
  acc = jnp.sum(picked * (g == best[:, None]), axis=1)
  regret = best - jnp.sum(picked * g, axis=1)
  return BestOfK(jnp.mean(acc), jnp.mean(regret), acc, regret)


def one_vs_many_accuracy(rewards_chosen: ArrayLike, rewards_rejected: ArrayLike) -> jax.Array:
  """Share of prompts whose chosen response scores above every rejected one (Kim et al. 2024).

  RewardMATH scores one correct solution against many incorrect ones: a reward model is right
  on a prompt only if the chosen response is its argmax. A tie with ``t`` rejected responses
  at the top scores ``1 / (1 + t)`` (a uniform pick among the tied maxima).

  Args:
      rewards_chosen: scores of the chosen response of each prompt, ``[num_prompts]``.
      rewards_rejected: scores of the rejected responses, ``[num_prompts, M]``, ``M >= 1``.

  Returns:
      A scalar in ``[0, 1]``.
  """
  c, r = as_float(rewards_chosen, "rewards_chosen"), as_float(rewards_rejected, "rewards_rejected")
  if c.ndim != 1 or c.shape[0] == 0:
    raise ValueError(f"rewards_chosen must have shape [num_prompts] > 0, got {c.shape}")
  if r.ndim != 2 or r.shape[0] != c.shape[0] or r.shape[1] < 1:
    raise ValueError(
      f"rewards_rejected must have shape [num_prompts, M] = [{c.shape[0]}, M >= 1], got {r.shape}"
    )
  top = jnp.max(r, axis=1)
  ties = jnp.sum(r == c[:, None], axis=1)
  score = jnp.where(c > top, 1.0, jnp.where(c == top, 1.0 / (1.0 + ties), 0.0))
  return jnp.mean(score)


def policy_pair_accuracy(
  proxy_a: ArrayLike, proxy_b: ArrayLike, gold_a: ArrayLike, gold_b: ArrayLike
) -> jax.Array:
  """Agreement with gold on pairs of responses sampled from an optimised policy.

  The standard accuracy is measured on pairs from the initial policy, where the reward model
  was trained; optimisation moves the policy elsewhere. Sample two responses per prompt from an
  optimised policy (best-of-n, RL, ...), score both sides with the reward model and with gold,
  and pass the four score vectors. The pairs carry no label: gold's order is the label, and
  each pair scores as in :func:`jaxrm.math.metrics.gold_pairwise_accuracy` (1 agree, 0
  disagree, 1/2 when exactly one of the two ties).

  Args:
      proxy_a, proxy_b: reward-model scores of the two responses, ``[batch]``.
      gold_a, gold_b: gold scores of the same responses, ``[batch]``.

  Returns:
      A scalar in ``[0, 1]``.
  """
  return metrics.gold_pairwise_accuracy(proxy_a, proxy_b, gold_a, gold_b)


# ------------------------------------------------------------------------------ rank statistics
def _host_rows(name: str, x: ArrayLike) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim == 1:
    x = x[None]
  if x.ndim != 2 or x.shape[1] < 2:
    raise ValueError(f"{name} must have shape [n] or [batch, n] with n >= 2, got {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name} must be finite")
  return x


def _average_ranks(x: np.ndarray) -> np.ndarray:
  """Average ranks (1-based, ties averaged) along the last axis of ``[b, n]``: O(b n^2)."""
  less = np.sum(x[:, None, :] < x[:, :, None], axis=-1)
  equal = np.sum(x[:, None, :] == x[:, :, None], axis=-1)
  return less + (equal + 1) / 2.0


def _rows_corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  a = a - a.mean(axis=1, keepdims=True)
  b = b - b.mean(axis=1, keepdims=True)
  den = np.sqrt(np.sum(a * a, axis=1) * np.sum(b * b, axis=1))
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(den > 0, np.sum(a * b, axis=1) / np.where(den > 0, den, 1.0), np.nan)


def batch_spearman(x: ArrayLike, y: ArrayLike, *, chunk: int = 64) -> np.ndarray:
  """Spearman correlation of each row of ``x`` with the same row of ``y`` (NumPy, host).

  Equals :func:`jaxrm.math.metrics.spearman` row by row (ties get average ranks), but computes
  all rows at once with ``O(n^2)`` comparisons per row, which is fast for the few hundred
  units of a bootstrap over proxies.

  Args:
      x: ``[batch, n]`` (or ``[n]``).
      y: the shape of ``x``.
      chunk: rows per vectorised block (bounds memory at ``chunk * n^2``).

  Returns:
      ``[batch]`` float64; NaN where a row is constant.
  """
  x, y = _host_rows("x", x), _host_rows("y", y)
  if x.shape != y.shape:
    raise ValueError(f"y must have the shape of x {x.shape}, got {y.shape}")
  out = [
    _rows_corr(_average_ranks(x[i : i + chunk]), _average_ranks(y[i : i + chunk]))
    for i in range(0, x.shape[0], chunk)
  ]
  return np.concatenate(out)


def batch_kendall_tau(x: ArrayLike, y: ArrayLike, *, chunk: int = 64) -> np.ndarray:
  """Kendall's tau-b of each row of ``x`` with the same row of ``y`` (NumPy, host, O(n^2)).

  ``tau_b = sum_ij sign(x_i - x_j) sign(y_i - y_j) / sqrt(sum sign(x_i - x_j)^2 * sum
  sign(y_i - y_j)^2)``, which is :func:`jaxrm.math.metrics.kendall_tau` row by row.

  Returns:
      ``[batch]`` float64; NaN where a row is constant.
  """
  x, y = _host_rows("x", x), _host_rows("y", y)
  if x.shape != y.shape:
    raise ValueError(f"y must have the shape of x {x.shape}, got {y.shape}")
  out = []
  for i in range(0, x.shape[0], chunk):
    sx = np.sign(x[i : i + chunk, :, None] - x[i : i + chunk, None, :])
    sy = np.sign(y[i : i + chunk, :, None] - y[i : i + chunk, None, :])
    den = np.sqrt(np.sum(sx * sx, axis=(1, 2)) * np.sum(sy * sy, axis=(1, 2)))
    with np.errstate(invalid="ignore", divide="ignore"):
      out.append(
        np.where(den > 0, np.sum(sx * sy, axis=(1, 2)) / np.where(den > 0, den, 1), np.nan)
      )
  return np.concatenate(out)


_METHODS = {"spearman": batch_spearman, "kendall": batch_kendall_tau}


def top_quantile_rank_correlation(
  scores: ArrayLike, gold: ArrayLike, *, quantile: float = 0.9, by: str = "gold"
) -> dict[str, float]:
  """Rank correlation of reward-model scores with gold on the top quantile of responses.

  Optimisation moves a policy to the responses the reward model scores highest, so what
  matters is whether the reward model orders *good* responses correctly, not the bulk of
  the initial policy's samples. The responses kept are those whose ``by`` score (``'gold'``
  or ``'scores'``) is at or above its ``quantile`` quantile.

  Args:
      scores: reward-model scores of ``n`` responses, ``[n]``.
      gold: gold scores of the same responses, ``[n]``.
      quantile: in ``[0, 1)``; 0 keeps every response.
      by: rank the responses by ``'gold'`` (default) or by the reward model's ``'scores'``.

  Returns:
      ``{'spearman', 'kendall_tau', 'num'}`` (Python floats; ``num`` responses kept).
  """
  s, g = np.asarray(scores, np.float64), np.asarray(gold, np.float64)
  if s.ndim != 1 or g.shape != s.shape:
    raise ValueError(f"scores and gold must both have shape [n], got {s.shape} and {g.shape}")
  if not 0.0 <= quantile < 1.0:
    raise ValueError(f"quantile must lie in [0, 1), got {quantile}")
  if by not in ("gold", "scores"):
    raise ValueError(f"by must be 'gold' or 'scores', got {by!r}")
  key = g if by == "gold" else s
  keep = key >= np.quantile(key, quantile)
  if keep.sum() < 2:
    raise ValueError(f"the top {1 - quantile:.3g} of {s.shape[0]} responses has < 2 responses")
  return {
    "spearman": metrics.spearman(s[keep], g[keep]),
    "kendall_tau": metrics.kendall_tau(s[keep], g[keep]),
    "num": float(keep.sum()),
  }


# ------------------------------------------------------------------------------ bootstrap
class BootstrapCI(NamedTuple):
  """A correlation, its percentile-bootstrap interval and the resampled values."""

  estimate: np.ndarray  # [m] correlation on the full sample
  low: np.ndarray  # [m] lower end of the interval
  high: np.ndarray  # [m] upper end of the interval
  samples: np.ndarray  # [num_resamples, m] resampled correlations (NaN: degenerate resample)


def _resample_indices(n: int, num_resamples: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, n, size=(num_resamples, n))


def _bootstrap_setup(x, y, method, num_resamples, confidence):
  x = np.asarray(x, np.float64)
  x = x[None] if x.ndim == 1 else x
  y = np.asarray(y, np.float64)
  if y.ndim != 1 or y.shape[0] < 3:
    raise ValueError(f"y must have shape [n] with n >= 3, got {y.shape}")
  if x.ndim != 2 or x.shape[1] != y.shape[0]:
    raise ValueError(f"x must have shape [n] or [m, n] with n = {y.shape[0]}, got {x.shape}")
  if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
    raise ValueError("x and y must be finite")
  if method not in _METHODS:
    raise ValueError(f"method must be one of {sorted(_METHODS)}, got {method!r}")
  if not isinstance(num_resamples, int) or num_resamples < 10:
    raise ValueError(f"num_resamples must be an int >= 10, got {num_resamples!r}")
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
  return x, y


def _resampled(x, y, method, idx):
  """Correlations ``[B, m]`` of every row of ``x`` with ``y`` on the resamples ``idx [B, n]``."""
  fn = _METHODS[method]
  ys = y[idx]
  return np.stack([fn(row[idx], ys) for row in x], axis=1)


def bootstrap_correlation(
  x: ArrayLike,
  y: ArrayLike,
  *,
  method: str = "spearman",
  num_resamples: int = 1000,
  confidence: float = 0.95,
  seed: int = 0,
) -> BootstrapCI:
  """Rank correlation of ``x`` with ``y`` and its percentile-bootstrap interval.

  The units (e.g. proxy reward models) are resampled with replacement ``num_resamples``
  times; the interval is the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2``
  percentiles of the resampled correlations (resamples where a side is constant are NaN and
  left out). Several ``x`` rows share the same resamples, so their intervals are comparable.
  Deterministic given ``seed``.

  Args:
      x: ``[n]`` or ``[m, n]`` (m evaluations of n units).
      y: ``[n]`` (an outcome of the same units), ``n >= 3``.
      method: ``'spearman'`` or ``'kendall'`` (tau-b).
      num_resamples: bootstrap resamples (>= 10).
      confidence: interval coverage in ``(0, 1)``.
      seed: NumPy seed of the resampling.

  Returns:
      A :class:`BootstrapCI` (arrays of shape ``[m]``; ``m = 1`` for a vector ``x``).

  References:
      Efron & Tibshirani, "An Introduction to the Bootstrap", 1993, ch. 13 (percentile
      intervals).
  """
  x, y = _bootstrap_setup(x, y, method, num_resamples, confidence)
  estimate = np.stack([_METHODS[method](row, y)[0] for row in x])
  samples = _resampled(x, y, method, _resample_indices(y.shape[0], num_resamples, seed))
  alpha = (1.0 - confidence) / 2.0
  with np.errstate(all="ignore"):
    low = (
      np.nanquantile(samples, alpha, axis=0) if np.isfinite(samples).any() else estimate * math.nan
    )
    high = (
      np.nanquantile(samples, 1 - alpha, axis=0)
      if np.isfinite(samples).any()
      else estimate * math.nan
    )
  return BootstrapCI(estimate, np.asarray(low), np.asarray(high), samples)


def bootstrap_correlation_difference(
  x_a: ArrayLike,
  x_b: ArrayLike,
  y: ArrayLike,
  *,
  method: str = "spearman",
  num_resamples: int = 1000,
  confidence: float = 0.95,
  seed: int = 0,
) -> BootstrapCI:
  """Paired bootstrap of ``corr(x_a, y) - corr(x_b, y)``: does ``x_a`` predict ``y`` better?

  Both correlations are computed on the same resamples of the units, so the interval of the
  difference accounts for their dependence (they share ``y``).

  Args:
      x_a, x_b: two evaluations of the same ``n`` units, ``[n]`` each.
      y: the outcome, ``[n]``.
      method, num_resamples, confidence, seed: as in :func:`bootstrap_correlation`.

  Returns:
      A :class:`BootstrapCI` of the difference (arrays of shape ``[1]``).
  """
  x_a, x_b = np.asarray(x_a, np.float64), np.asarray(x_b, np.float64)
  if x_a.ndim != 1 or x_b.shape != x_a.shape:
    raise ValueError(f"x_a and x_b must both have shape [n], got {x_a.shape} and {x_b.shape}")
  both = bootstrap_correlation(
    np.stack([x_a, x_b]),
    y,
    method=method,
    num_resamples=num_resamples,
    confidence=confidence,
    seed=seed,
  )
  diff = both.samples[:, :1] - both.samples[:, 1:]
  alpha = (1.0 - confidence) / 2.0
  with np.errstate(all="ignore"):
    low, high = np.nanquantile(diff, alpha, axis=0), np.nanquantile(diff, 1 - alpha, axis=0)
  return BootstrapCI(both.estimate[:1] - both.estimate[1:], low, high, diff)
