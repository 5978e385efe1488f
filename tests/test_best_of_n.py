"""Tests for jaxrm.math.best_of_n: KL of best-of-n, selection, and the unbiased reward estimator."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrm.math import best_of_n as bon


def _exact_subset_mean(proxy, gold, n):
  """Mean over all n-subsets of the gold score of the proxy argmax (ties: uniform pick)."""
  values = []
  for subset in itertools.combinations(range(len(proxy)), n):
    subset = np.array(subset)
    best = proxy[subset].max()
    values.append(gold[subset][proxy[subset] == best].mean())
  return np.mean(values)


# ----------------------------------------------------------------------------- KL of best-of-n
def test_kl_bon_is_zero_at_one_increasing_and_matches_formula():
  ns = np.arange(1, 10_001)
  got = np.asarray(jax.jit(bon.kl_bon)(ns))
  np.testing.assert_allclose(got, np.log(ns) - (ns - 1) / ns, rtol=1e-5, atol=1e-6)
  assert got[0] == 0.0
  assert np.all(np.diff(got) > 0)
  np.testing.assert_allclose(bon.kl_bon(4), np.log(4) - 0.75, rtol=1e-6)


# ----------------------------------------------------------------------------- selection
def test_best_of_n_select_takes_argmax_and_first_index_on_ties():
  scores = np.array([[0.1, 0.9, 0.3], [2.0, 2.0, -1.0]], np.float32)
  idx = jax.jit(bon.best_of_n_select)(scores)
  np.testing.assert_array_equal(idx, [1, 0])
  assert idx.dtype == jnp.int32


def test_select_best_of_n_selects_along_samples_axis_for_a_pytree():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 100, size=(3, 5, 7))
  mask = rng.uniform(size=(3, 5, 7)) < 0.5
  scores = rng.normal(size=(3, 5)).astype(np.float32)
  got = jax.jit(bon.select_best_of_n)({"tokens": tokens, "mask": mask}, scores)
  best = scores.argmax(-1)
  np.testing.assert_array_equal(got["tokens"], tokens[np.arange(3), best])
  np.testing.assert_array_equal(got["mask"], mask[np.arange(3), best])
  with pytest.raises(ValueError, match=r"scores.shape \+ rest"):
    bon.select_best_of_n(tokens[:, :4], scores)


# ----------------------------------------------------------------------------- weights
def test_weights_are_the_exact_binomial_ratios_and_sum_to_one():
  big_n = 12
  weights = bon.best_of_n_weights(big_n, np.arange(1, big_n + 1))
  for n in range(1, big_n + 1):
    expected = [
      math.comb(i - 1, n - 1) / math.comb(big_n, n) if i >= n else 0.0 for i in range(1, big_n + 1)
    ]
    np.testing.assert_allclose(weights[n - 1], expected, rtol=1e-12, atol=0)
  np.testing.assert_allclose(weights.sum(1), 1.0, rtol=1e-12)


def test_weights_sum_to_one_and_are_finite_for_n_up_to_16384():
  ns = np.array([1, 2, 3, 10, 100, 1000, 4096, 8192, 16000, 16383, 16384])
  weights = bon.best_of_n_weights(16384, ns)
  assert weights.shape == (len(ns), 16384)
  assert np.all(np.isfinite(weights)) and np.all(weights >= 0)
  np.testing.assert_allclose(weights.sum(1), 1.0, rtol=1e-10)
  np.testing.assert_allclose(weights[0], 1.0 / 16384, rtol=1e-10)
  np.testing.assert_array_equal(weights[-1, :-1], 0.0)


@pytest.mark.parametrize("ns", [[0], [5, 13], [1.5], [[1, 2]]])
def test_invalid_ns_raise_value_error(ns):
  with pytest.raises(ValueError, match="ns must"):
    bon.best_of_n_weights(12, ns)


def test_traced_ns_raise_value_error():
  with pytest.raises(ValueError, match="ns must be concrete"):
    jax.jit(lambda ns: bon.best_of_n_expected_reward(jnp.zeros(4), jnp.zeros(4), ns))(
      jnp.array([1, 2])
    )


# ----------------------------------------------------------------------------- estimator
def test_estimator_equals_exact_mean_over_all_subsets():
  rng = np.random.default_rng(1)
  proxy, gold = rng.normal(size=(2, 9))
  ns = np.arange(1, 10)
  with jax.enable_x64(True):
    gold_n, proxy_n = jax.jit(lambda p, g: bon.best_of_n_expected_reward(p, g, ns))(proxy, gold)
    for n in ns:
      expected = _exact_subset_mean(proxy, gold, n)
      np.testing.assert_allclose(gold_n[n - 1], expected, rtol=1e-12)
      np.testing.assert_allclose(proxy_n[n - 1], _exact_subset_mean(proxy, proxy, n), rtol=1e-12)


def test_estimator_with_tied_proxy_scores_matches_uniform_tie_breaking():
  rng = np.random.default_rng(2)
  proxy = np.array([0.0, 1.0, 1.0, 2.0, 2.0, 2.0, 3.0, 1.0, 0.0])
  gold = rng.normal(size=9)
  ns = np.arange(1, 10)
  with jax.enable_x64(True):
    gold_n, _ = bon.best_of_n_expected_reward(proxy, gold, ns)
    expected = [_exact_subset_mean(proxy, gold, n) for n in ns]
    np.testing.assert_allclose(gold_n, expected, rtol=1e-12)


def test_estimator_matches_monte_carlo_best_of_n_draws():
  rng = np.random.default_rng(3)
  big_n = 300
  proxy = rng.normal(size=big_n)
  gold = proxy + rng.normal(scale=1.5, size=big_n) - 0.1 * proxy**2
  ns = np.array([1, 2, 8, 32, 100])
  gold_n, proxy_n = jax.jit(lambda p, g: bon.best_of_n_expected_reward(p, g, ns))(
    proxy.astype(np.float32), gold.astype(np.float32)
  )
  draws = 4000
  for j, n in enumerate(ns):
    picks = np.array([rng.choice(big_n, size=n, replace=False) for _ in range(draws)])
    best = picks[np.arange(draws), proxy[picks].argmax(1)]
    for estimate, score in [(gold_n[j], gold), (proxy_n[j], proxy)]:
      values = score[best]
      stderr = values.std(ddof=1) / np.sqrt(draws)
      assert abs(values.mean() - float(estimate)) < 3 * stderr, (n, values.mean(), estimate)


def test_estimator_endpoints_are_the_mean_and_the_proxy_argmax():
  rng = np.random.default_rng(4)
  proxy, gold = rng.normal(size=(2, 64)).astype(np.float32)
  gold_n, proxy_n = bon.best_of_n_expected_reward(proxy, gold, [1, 64])
  expected = [gold.astype(np.float64).mean(), gold[proxy.argmax()]]
  np.testing.assert_allclose(gold_n, expected, rtol=1e-5)
  np.testing.assert_allclose(proxy_n, [proxy.astype(np.float64).mean(), proxy.max()], rtol=1e-5)


def test_proxy_estimate_is_nondecreasing_in_n():
  rng = np.random.default_rng(5)
  proxy, gold = rng.normal(size=(2, 200)).astype(np.float32)
  _, proxy_n = bon.best_of_n_expected_reward(proxy, gold, np.arange(1, 201))
  assert np.all(np.diff(np.asarray(proxy_n)) >= -1e-5)


def test_estimator_is_finite_and_exact_at_the_ends_for_n_16384():
  rng = np.random.default_rng(6)
  big_n = 16384
  proxy = rng.normal(size=big_n).astype(np.float32)
  gold = (proxy + rng.normal(size=big_n)).astype(np.float32)
  ns = np.array([1, 2, 16, 256, 4096, 16000, 16384])
  gold_n, proxy_n = jax.jit(lambda p, g: bon.best_of_n_expected_reward(p, g, ns))(proxy, gold)
  assert np.all(np.isfinite(gold_n)) and np.all(np.isfinite(proxy_n))
  weights = bon.best_of_n_weights(big_n, ns)
  order = np.argsort(proxy, kind="stable")
  expected = weights @ gold[order].astype(np.float64)
  np.testing.assert_allclose(gold_n, expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gold_n[0], gold.astype(np.float64).mean(), atol=1e-5)
  np.testing.assert_allclose(gold_n[-1], gold[proxy.argmax()], rtol=1e-6)
  np.testing.assert_allclose(proxy_n[-1], proxy.max(), rtol=1e-6)


def test_batched_estimator_is_the_mean_over_prompts():
  rng = np.random.default_rng(7)
  proxy, gold = rng.normal(size=(2, 5, 40)).astype(np.float32)
  ns = [1, 3, 10, 40]
  got_gold, got_proxy = jax.jit(lambda p, g: bon.batched_best_of_n_expected_reward(p, g, ns))(
    proxy, gold
  )
  per_prompt = [bon.best_of_n_expected_reward(proxy[i], gold[i], ns) for i in range(5)]
  np.testing.assert_allclose(got_gold, np.mean([g for g, _ in per_prompt], 0), rtol=1e-5)
  np.testing.assert_allclose(got_proxy, np.mean([p for _, p in per_prompt], 0), rtol=1e-5)
  with pytest.raises(ValueError, match=r"proxy_scores must have shape \[num_prompts, N\]"):
    bon.batched_best_of_n_expected_reward(proxy[0], gold[0], ns)
  with pytest.raises(ValueError, match=r"gold_scores must have the shape of proxy_scores"):
    bon.best_of_n_expected_reward(proxy[0], gold[0, :10], ns)


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("n", [0, 0.5, -3, float("nan")])
def test_kl_bon_rejects_n_below_one_naming_n(n):
  with pytest.raises(ValueError, match=r"^n must lie in \[1.0, inf\]"):
    bon.kl_bon(n)
  with pytest.raises(ValueError, match=r"^n must lie in \[1.0, inf\], got .* at index \(1,\)"):
    bon.kl_bon(np.array([2.0, n]))
  # Under jit the value is NaN, never a finite number (kl_bon(0.5) was 0.31).
  assert np.isnan(jax.jit(bon.kl_bon)(jnp.float32(n)))


def test_best_of_n_rejects_a_nan_proxy_score_instead_of_picking_it():
  proxy = np.array([0.1, 0.5, np.nan, 0.2])
  gold = np.array([1.0, 2.0, 9.0, 3.0])
  with pytest.raises(ValueError, match=r"^proxy_scores must be finite, got nan at index \(2,\)"):
    bon.best_of_n_expected_reward(proxy, gold, [1, 4])
  with pytest.raises(ValueError, match=r"^proxy_scores must be finite, got nan at index \(1, 2\)"):
    bon.batched_best_of_n_expected_reward(
      np.stack([np.zeros(4), proxy]), np.stack([gold, gold]), [2]
    )
  # Traced: both estimates are NaN (an unguarded sort puts NaN last, i.e. picks it as the best).
  fn = jax.jit(lambda p, g: bon.best_of_n_expected_reward(p, g, [1, 4]))
  gold_n, proxy_n = fn(proxy, gold)
  assert np.all(np.isnan(gold_n)) and np.all(np.isnan(proxy_n))
  gold_ok, _ = fn(np.array([0.1, 0.5, 0.3, 0.2]), gold)
  np.testing.assert_allclose(gold_ok[1], 2.0)


def test_best_of_n_rejects_string_scores_naming_the_argument():
  with pytest.raises(ValueError, match="^gold_scores must be a numeric array"):
    bon.best_of_n_expected_reward(np.array([0.1, 0.2]), np.array(["a", "b"]), [1])


# ----------------------------------------------------------------------------- ESS and resamples
def test_ess_matches_numpy_and_its_limits():
  n_samples, ns = 50, np.array([1, 2, 7, 50])
  w = np.array(
    [
      [
        math.comb(i - 1, n - 1) / math.comb(n_samples, n) if i >= n else 0.0
        for i in range(1, n_samples + 1)
      ]
      for n in ns
    ]
  )
  np.testing.assert_allclose(bon.best_of_n_ess(n_samples, ns), 1 / (w**2).sum(1), rtol=1e-10)
  np.testing.assert_allclose(bon.best_of_n_ess(n_samples, [1, 50]), [50.0, 1.0], rtol=1e-10)


def test_resampled_estimator_equals_the_estimator_on_the_repeated_samples():
  rng = np.random.default_rng(3)
  n_samples, ns = 12, np.array([1, 2, 3, 5, 12])
  proxy, gold = rng.normal(size=n_samples), rng.normal(size=n_samples)
  order = np.argsort(proxy)
  table = bon.best_of_n_cumulative_weights(n_samples, ns)
  with jax.enable_x64(True):
    for _ in range(5):
      counts = rng.multinomial(n_samples, np.ones(n_samples) / n_samples)
      got = np.asarray(bon.best_of_n_resampled(gold[order], counts[order], table))
      idx = np.repeat(np.arange(n_samples), counts)
      # The NumPy reference: mean over every n-subset of the repeated list (ties broken by
      # the copies' shared gold, so the pick among tied copies does not matter).
      want = [_exact_subset_mean(proxy[idx], gold[idx], n) for n in ns[:3]]
      np.testing.assert_allclose(got[:3], want, rtol=1e-10)
      ref, _ = bon.best_of_n_expected_reward(proxy[idx], gold[idx], ns)
      np.testing.assert_allclose(got, ref, rtol=1e-10)
    ones = np.ones(n_samples, int)
    np.testing.assert_allclose(
      bon.best_of_n_resampled(gold[order], ones, table),
      bon.best_of_n_expected_reward(proxy, gold, ns)[0],
      rtol=1e-10,
    )
  with pytest.raises(ValueError, match="counts must have"):
    bon.best_of_n_resampled(gold, np.ones(3, int), table)
  bad = np.ones(len(gold), int)
  bad[:2] = (-1, 3)  # sums to N, but a count is negative
  with pytest.raises(ValueError, match=r"counts must lie in \[0, inf\], got -1"):
    bon.best_of_n_resampled(gold, bad, table)
  with pytest.raises(ValueError, match=f"counts must sum to N={len(gold)}"):
    bon.best_of_n_resampled(gold, 2 * np.ones(len(gold), int), table)
