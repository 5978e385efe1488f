"""Reward-model evaluation metrics: accuracy, calibration, reward statistics, rank agreement.

Pairwise metrics take ``rewards_chosen`` and ``rewards_rejected`` of shape ``[batch]`` and read
the reward model as the Bradley–Terry classifier ``P(chosen preferred) = sigmoid(r_c - r_r)``.
The event scored is "chosen is preferred": its label is 1 for every pair unless ``labels``
(``[batch]`` in ``[0, 1]``, e.g. soft labels or gold preferences) are given.

Two kinds of function live here:

* pure ``jax.numpy`` functions (jit-able, usable inside a training step):
  `pairwise_accuracy`, `log_loss`, `brier_score`, `expected_calibration_error`,
  `reward_mean_std`, `margin_quantiles`, `margin_histogram`, `pearson_correlation`,
  `length_correlation`, `gold_pairwise_accuracy`;
* NumPy host functions (rank statistics, which need sorting with ties and are used on
  evaluation sets, not inside steps): `rankdata`, `spearman`, `kendall_tau`, `gold_agreement`,
  and `summarize_preferences`, which returns Python floats for reports and logs.
"""

from collections.abc import Sequence
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import numpy as np

from jaxrm.math import preference
from jaxrm.math._arrays import as_float, check_in_range, is_int


def _pair(
  rewards_chosen: ArrayLike, rewards_rejected: ArrayLike, labels: ArrayLike | None
) -> tuple[jax.Array, jax.Array]:
  """Checks shapes; returns ``delta = r_c - r_r`` and the target ``p`` (``[batch]`` each)."""
  rewards_chosen = as_float(rewards_chosen, "rewards_chosen")
  rewards_rejected = as_float(rewards_rejected, "rewards_rejected")
  if rewards_chosen.ndim != 1 or rewards_chosen.shape[0] == 0:
    raise ValueError(
      f"rewards_chosen must have shape [batch] with batch > 0, got {rewards_chosen.shape}"
    )
  if rewards_rejected.shape != rewards_chosen.shape:
    raise ValueError(
      f"rewards_rejected must have the shape of rewards_chosen {rewards_chosen.shape}, "
      f"got {rewards_rejected.shape}"
    )
  delta = rewards_chosen - rewards_rejected
  if labels is None:
    return delta, jnp.ones_like(delta)
  labels = as_float(labels, "labels").astype(delta.dtype)
  if labels.shape != delta.shape:
    raise ValueError(f"labels must have shape {delta.shape}, got {labels.shape}")
  check_in_range(labels, "labels", low=0.0, high=1.0)
  return delta, labels


def _vector(name: str, x: ArrayLike) -> jax.Array:
  x = as_float(x, name)
  if x.ndim != 1 or x.shape[0] == 0:
    raise ValueError(f"{name} must have shape [batch] with batch > 0, got {x.shape}")
  return x


# ------------------------------------------------------------------------------ pairwise
def pairwise_accuracy(
  rewards_chosen: ArrayLike, rewards_rejected: ArrayLike, *, labels: ArrayLike | None = None
) -> jax.Array:
  """Fraction of pairs the reward model orders correctly; a tie counts as half.

  Per pair the score is ``s = 1[r_c > r_r] + 0.5 * 1[r_c == r_r]``; with a (soft) label
  ``p`` it is the expected score ``p * s + (1 - p) * (1 - s)``.

  Args:
      rewards_chosen: ``[batch]``.
      rewards_rejected: ``[batch]``.
      labels: ``P(chosen preferred)``, ``[batch]``; default all ones.

  Returns:
      A scalar in ``[0, 1]``.
  """
  delta, p = _pair(rewards_chosen, rewards_rejected, labels)
  s = jnp.where(delta > 0, 1.0, jnp.where(delta == 0, 0.5, 0.0)).astype(delta.dtype)
  return jnp.mean(p * s + (1.0 - p) * (1.0 - s))


def log_loss(
  rewards_chosen: ArrayLike, rewards_rejected: ArrayLike, *, labels: ArrayLike | None = None
) -> jax.Array:
  """Mean cross-entropy of ``sigmoid(r_c - r_r)`` against the labels (Bradley–Terry NLL).

  Returns:
      A scalar, in nats.
  """
  _pair(rewards_chosen, rewards_rejected, labels)
  return preference.bradley_terry_loss(rewards_chosen, rewards_rejected, labels=labels)


def brier_score(
  rewards_chosen: ArrayLike, rewards_rejected: ArrayLike, *, labels: ArrayLike | None = None
) -> jax.Array:
  """Brier score ``mean((sigmoid(r_c - r_r) - p)^2)`` of the event "chosen preferred".

  References:
      Brier, "Verification of forecasts expressed in terms of probability", 1950.
  """
  delta, p = _pair(rewards_chosen, rewards_rejected, labels)
  return jnp.mean(jnp.square(jax.nn.sigmoid(delta) - p))


class Calibration(NamedTuple):
  """Expected calibration error and the reliability diagram behind it."""

  ece: jax.Array  # shape=(), float32
  confidence: jax.Array  # [num_bins] mean predicted P(chosen preferred) per bin (NaN if empty)
  accuracy: jax.Array  # [num_bins] mean label per bin (NaN if empty)
  count: jax.Array  # [num_bins] int32, pairs per bin


def expected_calibration_error(
  rewards_chosen: ArrayLike,
  rewards_rejected: ArrayLike,
  *,
  labels: ArrayLike | None = None,
  num_bins: int = 10,
) -> Calibration:
  """Expected calibration error of ``q = sigmoid(r_c - r_r)`` with equal-width bins.

  Bin ``i`` holds the pairs with ``q`` in ``[i / num_bins, (i + 1) / num_bins)`` (the last bin
  is closed). Per bin, ``confidence`` is the mean ``q`` and ``accuracy`` the mean label (the
  observed frequency of "chosen preferred"); ``ECE = sum_i count_i / N *
  |accuracy_i - confidence_i|``. Empty bins have ``count = 0`` and NaN confidence and accuracy
  (so a reliability plot skips them) and contribute nothing to the ECE.

  Args:
      rewards_chosen: ``[batch]``.
      rewards_rejected: ``[batch]``.
      labels: ``P(chosen preferred)``, ``[batch]``; default all ones.
      num_bins: number of equal-width bins on ``[0, 1]`` (a Python int; static under jit).

  Returns:
      A `Calibration`.

  References:
      Naeini, Cooper & Hauskrecht, "Obtaining well calibrated probabilities using Bayesian
      binning", AAAI 2015; Guo et al., "On calibration of modern neural networks", 2017.
  """
  if not is_int(num_bins) or num_bins < 1:
    raise ValueError(f"num_bins must be a positive int, got {num_bins!r}")
  delta, p = _pair(rewards_chosen, rewards_rejected, labels)
  return _calibration(delta, p, num_bins=int(num_bins))


@functools.partial(jax.jit, static_argnames="num_bins")
def _calibration(delta: jax.Array, p: jax.Array, *, num_bins: int) -> Calibration:
  """:func:`expected_calibration_error` of checked margins and targets as one compiled program
  (op by op, a process's first call took about twice as long: BUILD_NOTES, session 35)."""
  q = jax.nn.sigmoid(delta)
  bins = jnp.clip(jnp.floor(q * num_bins).astype(jnp.int32), 0, num_bins - 1)
  count = jax.ops.segment_sum(jnp.ones_like(q), bins, num_segments=num_bins)
  q_sum = jax.ops.segment_sum(q, bins, num_segments=num_bins)
  p_sum = jax.ops.segment_sum(p, bins, num_segments=num_bins)
  ece = jnp.sum(jnp.abs(p_sum - q_sum)) / q.shape[0]
  safe = jnp.maximum(count, 1.0)
  confidence = jnp.where(count > 0, q_sum / safe, jnp.nan)
  accuracy = jnp.where(count > 0, p_sum / safe, jnp.nan)
  return Calibration(ece, confidence, accuracy, count.astype(jnp.int32))


# ------------------------------------------------------------------------------ distributions
def reward_mean_std(rewards: ArrayLike) -> tuple[jax.Array, jax.Array]:
  """Mean and (population, ``ddof=0``) standard deviation of all entries of ``rewards``."""
  rewards = as_float(rewards, "rewards")
  if rewards.size == 0:
    raise ValueError(f"rewards must be non-empty, got shape {rewards.shape}")
  return jnp.mean(rewards), jnp.std(rewards)


def margin_quantiles(
  rewards_chosen: ArrayLike,
  rewards_rejected: ArrayLike,
  *,
  quantiles: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95),
) -> jax.Array:
  """Quantiles of the reward margin ``r_c - r_r`` (linear interpolation), ``[len(quantiles)]``."""
  delta, _ = _pair(rewards_chosen, rewards_rejected, None)
  q = as_float(quantiles, "quantiles")
  check_in_range(q, "quantiles", low=0.0, high=1.0)
  return jnp.quantile(delta, q.astype(delta.dtype))


def margin_histogram(
  rewards_chosen: ArrayLike,
  rewards_rejected: ArrayLike,
  *,
  num_bins: int = 20,
  value_range: tuple[float, float] | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Histogram of the reward margin ``r_c - r_r``.

  Args:
      rewards_chosen: ``[batch]``.
      rewards_rejected: ``[batch]``.
      num_bins: number of equal-width bins.
      value_range: ``(low, high)``; default the margins' min and max. Margins outside are
          not counted.

  Returns:
      ``(counts [num_bins], edges [num_bins + 1])`` as in `numpy.histogram`.
  """
  delta, _ = _pair(rewards_chosen, rewards_rejected, None)
  return jnp.histogram(delta, bins=num_bins, range=value_range)


def pearson_correlation(x: ArrayLike, y: ArrayLike) -> jax.Array:
  """Pearson correlation of two ``[n]`` vectors (NaN if either is constant)."""
  x, y = _vector("x", x), _vector("y", y)
  if x.shape != y.shape:
    raise ValueError(f"y must have the shape of x {x.shape}, got {y.shape}")
  xc, yc = x - jnp.mean(x), y - jnp.mean(y)
  return jnp.sum(xc * yc) / jnp.sqrt(jnp.sum(xc * xc) * jnp.sum(yc * yc))


def length_correlation(rewards: ArrayLike, lengths: ArrayLike) -> jax.Array:
  """Pearson correlation between rewards ``[n]`` and response lengths ``[n]``.

  A strongly positive value flags a length-biased reward model (Singhal et al., "A long way
  to go: investigating length correlations in RLHF", 2023). Pass response lengths, e.g.
  ``response_mask.sum(-1)``, not prompt + response.
  """
  return pearson_correlation(rewards, lengths)


def gold_pairwise_accuracy(
  proxy_a: ArrayLike, proxy_b: ArrayLike, gold_a: ArrayLike, gold_b: ArrayLike
) -> jax.Array:
  """How often the proxy reward model agrees with the gold scorer on which of a pair is better.

  Per pair the score is ``1 - |sign(proxy_a - proxy_b) - sign(gold_a - gold_b)| / 2``: 1 when
  both order the pair the same way (or both tie), 0 when they disagree, and 1/2 when exactly
  one of them ties. All inputs are ``[batch]``.

  Returns:
      A scalar in ``[0, 1]``.
  """
  proxy_delta, _ = _pair(proxy_a, proxy_b, None)
  gold_delta, _ = _pair(gold_a, gold_b, None)
  if gold_delta.shape != proxy_delta.shape:
    raise ValueError(
      f"gold_a must have the shape of proxy_a {proxy_delta.shape}, got {gold_delta.shape}"
    )
  return jnp.mean(1.0 - jnp.abs(jnp.sign(proxy_delta) - jnp.sign(gold_delta)) / 2.0)


# ------------------------------------------------------------------------------ rank statistics
def _host_vector(name: str, x: ArrayLike) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != 1 or x.shape[0] < 2:
    raise ValueError(f"{name} must have shape [n] with n >= 2, got {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name} must be finite")
  return x


def _host_pair(x: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
  x, y = _host_vector("x", x), _host_vector("y", y)
  if x.shape != y.shape:
    raise ValueError(f"y must have the shape of x {x.shape}, got {y.shape}")
  return x, y


def rankdata(x: ArrayLike) -> np.ndarray:
  """Ranks ``1..n`` of a ``[n]`` vector, ties given their average rank (NumPy, host)."""
  x = np.asarray(x, np.float64)
  if x.ndim != 1:
    raise ValueError(f"x must have shape [n], got {x.shape}")
  order = np.argsort(x, kind="stable")
  sorted_x = x[order]
  starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
  ends = np.r_[starts[1:], x.shape[0]]  # exclusive
  average = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
  ranks = np.empty(x.shape[0])
  ranks[order] = np.repeat(average, ends - starts)
  return ranks


def spearman(x: ArrayLike, y: ArrayLike) -> float:
  """Spearman rank correlation: Pearson correlation of average ranks (NumPy, host).

  Returns NaN if either input is constant.
  """
  x, y = _host_pair(x, y)
  rx, ry = rankdata(x), rankdata(y)
  rx, ry = rx - rx.mean(), ry - ry.mean()
  denominator = math.sqrt(np.sum(rx * rx) * np.sum(ry * ry))
  return float(np.sum(rx * ry) / denominator) if denominator > 0 else math.nan


def _tied_pairs(sorted_values: np.ndarray) -> int:
  """Number of tied pairs ``sum t (t - 1) / 2`` over runs of equal values in a sorted array."""
  starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
  runs = np.diff(np.r_[starts, sorted_values.shape[0]])
  return int(np.sum(runs * (runs - 1) // 2))


def _count_inversions(values: np.ndarray) -> int:
  """Pairs ``i < j`` with ``values[i] > values[j]`` (Fenwick tree over dense ranks)."""
  dense = np.unique(values, return_inverse=True)[1].ravel() + 1  # 1-based
  tree = [0] * (int(dense.max()) + 1)
  inversions = 0
  for seen, v in enumerate(dense.tolist()):
    not_greater, i = 0, v  # how many earlier values are <= v
    while i > 0:
      not_greater += tree[i]
      i -= i & -i
    inversions += seen - not_greater
    i = v
    while i < len(tree):
      tree[i] += 1
      i += i & -i
  return inversions


def kendall_tau(x: ArrayLike, y: ArrayLike) -> float:
  """Kendall's tau-b rank correlation, ties handled (NumPy, host, ``O(n log n)``).

  ``tau_b = (C - D) / sqrt((n0 - n1) (n0 - n2))`` with ``C``/``D`` the concordant/discordant
  pairs, ``n0 = n (n - 1) / 2``, and ``n1``/``n2`` the pairs tied in ``x``/``y``. Sorting by
  ``(x, y)`` makes ``D`` the number of inversions of ``y`` (Knight's algorithm), and
  ``C - D = n0 - n1 - n2 + n3 - 2 D`` with ``n3`` the pairs tied in both. Returns NaN if
  either input is constant.

  References:
      Kendall, "The treatment of ties in ranking problems", Biometrika 1945; Knight, "A
      computer method for calculating Kendall's tau with ungrouped data", JASA 1966.
  """
  x, y = _host_pair(x, y)
  n = x.shape[0]
  order = np.lexsort((y, x))  # by x, then y
  xs, ys = x[order], y[order]
  n0 = n * (n - 1) // 2
  n1 = _tied_pairs(xs)
  n2 = _tied_pairs(np.sort(y))
  joint = np.flatnonzero(np.r_[True, (xs[1:] != xs[:-1]) | (ys[1:] != ys[:-1])])
  runs = np.diff(np.r_[joint, n])
  n3 = int(np.sum(runs * (runs - 1) // 2))
  if n0 == n1 or n0 == n2:
    return math.nan
  concordant_minus_discordant = n0 - n1 - n2 + n3 - 2 * _count_inversions(ys)
  return concordant_minus_discordant / math.sqrt((n0 - n1) * (n0 - n2))


def gold_agreement(
  proxy_a: ArrayLike, proxy_b: ArrayLike, gold_a: ArrayLike, gold_b: ArrayLike
) -> dict[str, float]:
  """Agreement of a proxy reward model with the gold scorer on an evaluation set of pairs.

  Args:
      proxy_a, proxy_b: proxy rewards of the two responses of each pair, ``[batch]``.
      gold_a, gold_b: gold rewards of the same responses, ``[batch]``.

  Returns:
      ``{'pairwise_accuracy': ..., 'spearman': ..., 'kendall_tau': ...}`` as Python floats:
      `gold_pairwise_accuracy` on the pairs, and the rank correlations between proxy and gold
      scores over all ``2 * batch`` responses.
  """
  proxy = np.concatenate([np.asarray(proxy_a), np.asarray(proxy_b)])
  gold = np.concatenate([np.asarray(gold_a), np.asarray(gold_b)])
  return {
    "pairwise_accuracy": float(gold_pairwise_accuracy(proxy_a, proxy_b, gold_a, gold_b)),
    "spearman": spearman(proxy, gold),
    "kendall_tau": kendall_tau(proxy, gold),
  }


# ------------------------------------------------------------------------------ summary
_SUMMARY_QUANTILES = (0.1, 0.5, 0.9)


@functools.partial(jax.jit, static_argnames="num_bins")
def _summary_arrays(rewards_chosen, rewards_rejected, labels, *, num_bins):
  all_rewards = jnp.concatenate([rewards_chosen, rewards_rejected])
  delta = rewards_chosen - rewards_rejected
  mean, std = reward_mean_std(all_rewards)
  quantiles = margin_quantiles(rewards_chosen, rewards_rejected, quantiles=_SUMMARY_QUANTILES)
  return {
    "accuracy": pairwise_accuracy(rewards_chosen, rewards_rejected, labels=labels),
    "log_loss": log_loss(rewards_chosen, rewards_rejected, labels=labels),
    "brier": brier_score(rewards_chosen, rewards_rejected, labels=labels),
    "ece": expected_calibration_error(
      rewards_chosen, rewards_rejected, labels=labels, num_bins=num_bins
    ).ece,
    "reward_mean": mean,
    "reward_std": std,
    "chosen_mean": jnp.mean(rewards_chosen),
    "rejected_mean": jnp.mean(rewards_rejected),
    "margin_mean": jnp.mean(delta),
    "margin_std": jnp.std(delta),
    **{f"margin_q{int(round(100 * q)):02d}": v for q, v in zip(_SUMMARY_QUANTILES, quantiles)},
  }


def summarize_preferences(
  rewards_chosen: ArrayLike,
  rewards_rejected: ArrayLike,
  *,
  labels: ArrayLike | None = None,
  num_bins: int = 10,
) -> dict[str, float]:
  """Standard reward-model metrics on a set of pairs, as Python floats (host).

  Keys: ``accuracy`` (ties half), ``log_loss``, ``brier``, ``ece`` (``num_bins`` bins),
  ``reward_mean`` / ``reward_std`` (over chosen and rejected rewards together),
  ``chosen_mean``, ``rejected_mean``, ``margin_mean``, ``margin_std`` and the margin quantiles
  ``margin_q10``, ``margin_q50``, ``margin_q90``.

  Args:
      rewards_chosen: ``[batch]``.
      rewards_rejected: ``[batch]``.
      labels: ``P(chosen preferred)``, ``[batch]``; default all ones.
      num_bins: calibration bins.

  Returns:
      A dict of Python floats.
  """
  _, p = _pair(rewards_chosen, rewards_rejected, labels)
  if not is_int(num_bins) or num_bins < 1:
    raise ValueError(f"num_bins must be a positive int, got {num_bins!r}")
  out = _summary_arrays(as_float(rewards_chosen), as_float(rewards_rejected), p, num_bins=num_bins)
  return {k: float(v) for k, v in out.items()}
