"""Best-of-n sampling: selection, its KL cost and unbiased estimates of its expected reward.

Best-of-n draws ``n`` responses from the policy and keeps the one the proxy reward model
scores highest. Its KL from the sampling policy is ``kl_bon(n) = log n - (n - 1) / n`` (exact
for continuous scores, an upper bound otherwise). Drawing ``n`` fresh samples for every ``n``
is wasteful: from one set of ``N`` samples, ``best_of_n_expected_reward`` gives the unbiased
estimate of the expected gold (and proxy) reward of best-of-n for every ``n <= N`` at once.

Ties in proxy scores: best-of-n over i.i.d. samples picks uniformly at random among the tied
maxima (``best_of_n_select`` takes the first index, which is the same thing in distribution
because i.i.d. samples are exchangeable). The estimator matches this by replacing the gold
score of tied samples with their mean before weighting; with continuous scores there are no
ties and this changes nothing.

References:
    Gao, Schulman and Hilton, "Scaling Laws for Reward Model Overoptimization", 2022
    (the unbiased best-of-n estimator and the KL of best-of-n).
    Stiennon et al., "Learning to summarize from human feedback", 2020.
"""

import math

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import numpy as np

from jaxrm.math._arrays import (
  as_float,
  check_finite,
  check_in_range,
  is_concrete,
  nan_where_invalid,
)


def kl_bon(n: ArrayLike) -> jax.Array:
  """KL divergence of best-of-n from the sampling policy: ``log n - (n - 1) / n``.

  Exact when the proxy scores are continuous (no ties); an upper bound otherwise. It is 0 at
  ``n = 1`` and increases with ``n`` (like ``log n - 1`` for large ``n``).

  Args:
      n: number of samples, ``>= 1``, any shape.

  Returns:
      ``KL_bon(n)`` in nats, same shape as ``n``; NaN where a traced ``n`` is below 1.

  Raises:
      ValueError: a concrete ``n`` below 1 (or NaN).

  References:
      Stiennon et al., 2020; Gao et al., 2022; Beirami et al., "Theoretical guarantees on the
      best-of-n alignment policy", 2024 (the bound).
  """
  n = as_float(n, "n")
  check_in_range(n, "n", low=1.0)
  return nan_where_invalid(jnp.log(n) - (n - 1.0) / n, n >= 1.0)


def best_of_n_select(scores: ArrayLike) -> jax.Array:
  """Index of the best of ``N`` samples: ``argmax`` over the last axis (first index on ties).

  Args:
      scores: proxy scores, ``[..., N]``.

  Returns:
      int32 indices, ``[...]``.
  """
  scores = jnp.asarray(scores)
  if scores.ndim < 1:
    raise ValueError(f"scores must have shape [..., N], got {scores.shape}")
  return jnp.argmax(scores, axis=-1).astype(jnp.int32)


def select_best_of_n(samples, scores: ArrayLike):
  """Selects the best-scored sample along the samples axis.

  Args:
      samples: an array or pytree of arrays whose leaves have shape ``scores.shape + rest``,
          e.g. tokens ``[batch, N, seq]`` with scores ``[batch, N]``.
      scores: proxy scores, ``[..., N]``.

  Returns:
      The same pytree with leaves of shape ``scores.shape[:-1] + rest``: the sample of
      ``best_of_n_select(scores)``.
  """
  scores = jnp.asarray(scores)
  idx = best_of_n_select(scores)
  axis = scores.ndim - 1

  def take(leaf):
    leaf = jnp.asarray(leaf)
    if leaf.shape[: scores.ndim] != scores.shape:
      raise ValueError(
        f"each leaf of samples must have shape scores.shape + rest = {scores.shape} + "
        f"(...), got {leaf.shape}"
      )
    index = idx.reshape(idx.shape + (1,) * (leaf.ndim - axis))
    return jnp.take_along_axis(leaf, index, axis=axis).squeeze(axis)

  return jax.tree.map(take, samples)


def _concrete_ns(ns, num_samples: int) -> np.ndarray:
  try:
    ns_np = np.asarray(ns)
  except jax.errors.TracerArrayConversionError:
    raise ValueError(
      "ns must be concrete (Python ints or a NumPy array), not traced: close over it or "
      "mark it static under jit"
    ) from None
  if ns_np.ndim > 1:
    raise ValueError(f"ns must have shape [n_values], got {ns_np.shape}")
  ns_np = np.atleast_1d(ns_np)
  if ns_np.size and not np.all(np.equal(np.mod(ns_np, 1), 0)):
    raise ValueError(f"ns must be integers, got {ns_np}")
  ns_np = ns_np.astype(np.int64)
  if ns_np.size and (ns_np.min() < 1 or ns_np.max() > num_samples):
    raise ValueError(
      f"ns must lie in [1, N] = [1, {num_samples}], got min {ns_np.min()} max {ns_np.max()}"
    )
  return ns_np


def best_of_n_weights(num_samples: int, ns: ArrayLike) -> np.ndarray:
  """Weights of the unbiased best-of-n estimator on samples sorted by ascending proxy score.

  For samples ``S_1, ..., S_N`` sorted by ascending proxy score, best-of-n of a uniformly
  random ``n``-subset picks ``S_i`` with probability

    ``w_i(n) = C(i - 1, n - 1) / C(N, n)``  for ``i >= n`` (and 0 for ``i < n``):

  ``S_i`` must be in the subset and the other ``n - 1`` members must come from the ``i - 1``
  lower-scored samples. The weights of each ``n`` sum to 1 (hockey-stick identity). They are
  computed on the host in float64 from log-binomials (``lgamma``), which is stable for
  ``N`` in the tens of thousands and every ``n <= N``.

  Args:
      num_samples: ``N``.
      ns: the values of ``n``, ``[n_values]`` integers in ``[1, N]`` (concrete, not traced).

  Returns:
      A float64 NumPy array ``[n_values, N]``.

  References:
      Gao et al., "Scaling Laws for Reward Model Overoptimization", 2022.
  """
  num_samples = int(num_samples)
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")
  ns_np = _concrete_ns(ns, num_samples)
  log_fact = np.array([math.lgamma(k + 1.0) for k in range(num_samples + 1)])

  def log_binom(a, b):
    return log_fact[a] - log_fact[b] - log_fact[a - b]

  i = np.arange(1, num_samples + 1)[None, :]  # 1-based rank by proxy score.
  n = ns_np[:, None]
  valid = i >= n
  a, b = np.where(valid, i - 1, 0), np.where(valid, n - 1, 0)
  log_w = log_binom(a, b) - log_binom(num_samples, n)
  return np.where(valid, np.exp(log_w), 0.0)


def _sorted_by_proxy(proxy: jax.Array, gold: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Sorts by ascending proxy; the gold scores of tied proxy scores become their mean."""
  order = jnp.argsort(proxy, stable=True)
  proxy_sorted, gold_sorted = proxy[order], gold[order]
  n = proxy.shape[0]
  starts = jnp.concatenate([jnp.ones((1,), bool), proxy_sorted[1:] != proxy_sorted[:-1]])
  group = jnp.cumsum(starts) - 1
  sums = jax.ops.segment_sum(gold_sorted, group, num_segments=n)
  counts = jax.ops.segment_sum(jnp.ones_like(gold_sorted), group, num_segments=n)
  return proxy_sorted, sums[group] / counts[group]


def best_of_n_expected_reward(
  proxy_scores: ArrayLike, gold_scores: ArrayLike, ns: ArrayLike
) -> tuple[jax.Array, jax.Array]:
  """Unbiased estimates of the expected gold and proxy reward of best-of-n, for each ``n``.

  ``R_n = sum_{i=n..N} C(i - 1, n - 1) / C(N, n) * gold(S_i)`` with ``S_1..S_N`` the samples
  sorted by ascending proxy score (``S_N`` is the proxy's argmax): the exact mean, over all
  ``n``-subsets of the ``N`` samples, of the gold score of the subset's proxy argmax, and an
  unbiased estimate of best-of-n's expected gold reward under the sampling policy. ``n = 1``
  gives the plain mean and ``n = N`` the gold score of the proxy's argmax. Tied proxy scores:
  see the module docstring.

  Args:
      proxy_scores: scores of the ``N`` samples under the proxy reward (the selection
          criterion), ``[N]``; finite (a concrete NaN or inf raises ``ValueError``, a traced
          one makes both results NaN: it would otherwise sort as the best sample).
      gold_scores: scores of the same samples under the gold reward, ``[N]``.
      ns: the values of ``n``, ``[n_values]`` integers in ``[1, N]``; must be concrete
          (close over them under ``jit``).

  Returns:
      ``(gold, proxy)``: the estimates for the gold and for the proxy score, each
      ``[n_values]``.

  References:
      Gao et al., "Scaling Laws for Reward Model Overoptimization", 2022.
  """
  proxy, gold = as_float(proxy_scores, "proxy_scores"), as_float(gold_scores, "gold_scores")
  if proxy.ndim != 1:
    raise ValueError(
      f"proxy_scores must have shape [N], got {proxy.shape} (use batched_best_of_n_expected_reward)"
    )
  if gold.shape != proxy.shape:
    raise ValueError(
      f"gold_scores must have the shape of proxy_scores {proxy.shape}, got {gold.shape}"
    )
  check_finite(proxy, "proxy_scores")
  dtype = jnp.result_type(proxy, gold)
  weights = jnp.asarray(best_of_n_weights(proxy.shape[0], ns), dtype)
  proxy_sorted, gold_sorted = _sorted_by_proxy(proxy.astype(dtype), gold.astype(dtype))
  # Elementwise product and sum rather than a matmul: no reduced-precision matmul on TPU.
  gold_n = jnp.sum(weights * gold_sorted[None, :], axis=-1)
  proxy_n = jnp.sum(weights * proxy_sorted[None, :], axis=-1)
  # A traced non-finite proxy score would sort as the best sample: report NaN, never a pick.
  proxy_ok = jnp.all(jnp.isfinite(proxy))
  return nan_where_invalid(gold_n, proxy_ok), nan_where_invalid(proxy_n, proxy_ok)


def batched_best_of_n_expected_reward(
  proxy_scores: ArrayLike, gold_scores: ArrayLike, ns: ArrayLike
) -> tuple[jax.Array, jax.Array]:
  """``best_of_n_expected_reward`` for each prompt, averaged over prompts.

  Args:
      proxy_scores: proxy scores of ``N`` samples for each prompt, ``[num_prompts, N]``.
      gold_scores: gold scores of the same samples, ``[num_prompts, N]``.
      ns: the values of ``n``, ``[n_values]`` concrete integers in ``[1, N]``.

  Returns:
      ``(gold, proxy)``: the estimates averaged over prompts, each ``[n_values]``.

  References:
      Gao et al., "Scaling Laws for Reward Model Overoptimization", 2022.
  """
  proxy, gold = as_float(proxy_scores, "proxy_scores"), as_float(gold_scores, "gold_scores")
  if proxy.ndim != 2:
    raise ValueError(f"proxy_scores must have shape [num_prompts, N], got {proxy.shape}")
  if gold.shape != proxy.shape:
    raise ValueError(
      f"gold_scores must have the shape of proxy_scores {proxy.shape}, got {gold.shape}"
    )
  _concrete_ns(ns, proxy.shape[1])  # Validate before vmap so errors name the argument.
  check_finite(proxy, "proxy_scores")
  gold_n, proxy_n = jax.vmap(lambda p, g: best_of_n_expected_reward(p, g, ns))(proxy, gold)
  return jnp.mean(gold_n, axis=0), jnp.mean(proxy_n, axis=0)


def best_of_n_ess(num_samples: int, ns: ArrayLike) -> np.ndarray:
  """Effective sample size ``1 / sum_i w_i(n)^2`` of the unbiased estimator, for each ``n``.

  The weights (:func:`best_of_n_weights`) do not depend on the scores (ties aside), so neither
  does the ESS: ``N`` at ``n = 1``, 1 at ``n = N``. Averaging ``P`` prompts with equal weight
  multiplies it by ``P`` (the pooled ESS is the sum of the per-prompt ones).

  Args:
      num_samples: ``N`` per prompt.
      ns: ``[n_values]`` concrete integers in ``[1, N]``.

  Returns:
      float64 ``[n_values]``: the ESS per prompt.
  """
  w = best_of_n_weights(num_samples, ns)
  return 1.0 / np.sum(w * w, axis=-1)


def best_of_n_cumulative_weights(num_samples: int, ns: ArrayLike) -> np.ndarray:
  """``F[k, j] = C(k, n_j) / C(N, n_j)``: the estimator's weight on the ``k`` lowest ranks.

  (The hockey-stick identity sums :func:`best_of_n_weights` over ranks ``1..k``.) Float64
  ``[N + 1, n_values]``; used by :func:`best_of_n_resampled`.
  """
  num_samples = int(num_samples)
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")
  ns_np = _concrete_ns(ns, num_samples)
  log_fact = np.array([math.lgamma(k + 1.0) for k in range(num_samples + 1)])
  k = np.arange(num_samples + 1)[:, None]
  n = ns_np[None, :]
  valid = k >= n
  kk = np.where(valid, k, n)
  log_f = (
    log_fact[kk]
    - log_fact[n]
    - log_fact[kk - n]
    - (log_fact[num_samples] - log_fact[n] - log_fact[num_samples - n])
  )
  return np.where(valid, np.exp(log_f), 0.0)


def best_of_n_resampled(
  sorted_values: ArrayLike, counts: ArrayLike, cumulative_weights: ArrayLike
) -> jax.Array:
  """The unbiased best-of-n estimate on a resample (e.g. a bootstrap) of the ``N`` samples.

  A resample repeats sample ``j`` ``counts[j]`` times (``sum counts = N``). Sorted by proxy,
  its copies occupy ranks ``K_{j-1} + 1 .. K_j`` (``K`` the cumulative counts), so the
  estimator on the resample is ``sum_j values_j (F[K_j] - F[K_{j-1}])`` with ``F`` from
  :func:`best_of_n_cumulative_weights`: no re-sorting per resample.

  Args:
      sorted_values: scores of the samples sorted by ascending proxy score, ``[..., N]`` (for
          tied proxy scores pass the tie-averaged values, as :func:`best_of_n_expected_reward`
          uses; the study's continuous scores have no ties).
      counts: integer multiplicities ``[..., N]`` in the same order, each row summing to ``N``.
      cumulative_weights: ``[N + 1, n_values]`` from :func:`best_of_n_cumulative_weights`.

  Returns:
      ``[..., n_values]``. With all counts 1 it equals :func:`best_of_n_expected_reward`.
  """
  values = as_float(sorted_values, "sorted_values")
  counts = jnp.asarray(counts)
  table = jnp.asarray(cumulative_weights, values.dtype)
  if counts.shape != values.shape:
    raise ValueError(
      f"counts must have the shape of sorted_values {values.shape}, got {counts.shape}"
    )
  if table.ndim != 2 or table.shape[0] != values.shape[-1] + 1:
    raise ValueError(
      f"cumulative_weights must have shape [N + 1, n_values] = [{values.shape[-1] + 1}, ...], "
      f"got {table.shape}"
    )
  check_in_range(counts, "counts", low=0)
  if (
    is_concrete(counts)
    and counts.size
    and np.any(np.sum(np.asarray(counts), -1) != values.shape[-1])
  ):
    raise ValueError(f"counts must sum to N={values.shape[-1]} along the last axis (a resample)")
  cum = jnp.cumsum(counts.astype(jnp.int32), axis=-1)
  upper, lower = table[cum], table[cum - counts.astype(jnp.int32)]  # [..., N, n_values]
  return jnp.sum((upper - lower) * values[..., None], axis=-2)
