"""Tests of the synthetic RLHF world (jaxrm.data.synthetic)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrm.data import synthetic
from tests import run_helpers

CFG = synthetic.WorldConfig(num_calibration=2048, gold_width=32, policy_width=16)


@pytest.fixture(scope="module")
def world():
  return synthetic.init_world(CFG, jax.random.key(0))


def _samples(world, num, seed):
  prompts = synthetic.sample_prompts(CFG, jax.random.key(seed), num)
  return synthetic.sample_responses(world, CFG, prompts, jax.random.key(seed + 1))


def test_gold_is_standardised_under_pi_init(world):
  tokens, mask = _samples(world, 4096, 10)  # fresh samples, not the calibration ones
  gold = np.asarray(synthetic.gold_reward(world, CFG, tokens, mask))
  assert abs(gold.mean()) < 4 * gold.std() / np.sqrt(len(gold))
  assert 0.9 < gold.std() < 1.1


def test_gold_matches_numpy_formula(world):
  tokens, mask = _samples(world, 256, 20)
  raw = np.asarray(synthetic.RewardModel(CFG.gold_config()).apply(world.gold_params, tokens, mask))
  s = jax.tree.map(float, world.stats)
  count = (np.asarray(tokens)[:, CFG.prompt_len :] == CFG.feature_token).sum(1)
  expected = (
    (raw - s.raw_mean) / s.raw_std
    + CFG.feature_coef * (count - s.count_mean) / s.count_std
    - CFG.feature_penalty * np.maximum(count - s.count_threshold, 0) ** CFG.feature_penalty_power
  )
  expected = (expected - s.mean) / s.std
  np.testing.assert_allclose(
    synthetic.gold_reward(world, CFG, tokens, mask), expected, rtol=1e-4, atol=1e-4
  )


def test_gold_components_match_numpy_formula_and_sum_to_gold(world):
  tokens, mask = _samples(world, 256, 25)
  raw = np.asarray(synthetic.RewardModel(CFG.gold_config()).apply(world.gold_params, tokens, mask))
  s = jax.tree.map(float, world.stats)
  count = (np.asarray(tokens)[:, CFG.prompt_len :] == CFG.feature_token).sum(1).astype(np.float64)
  rest = (raw - s.raw_mean) / s.raw_std / s.std
  feature = (
    CFG.feature_coef * (count - s.count_mean) / s.count_std
    - CFG.feature_penalty * np.maximum(count - s.count_threshold, 0) ** CFG.feature_penalty_power
    - s.mean
  ) / s.std
  parts = synthetic.gold_components(world, CFG, tokens, mask)
  np.testing.assert_allclose(parts["rest"], rest, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(parts["feature"], feature, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(
    parts["rest"] + parts["feature"],
    synthetic.gold_reward(world, CFG, tokens, mask),
    rtol=1e-5,
    atol=1e-5,
  )


def test_gold_at_a_new_batch_size_is_one_compiled_program(world):
  """Called outside ``jit``, gold (and its parts) compile one program per batch size, not
  one per op (161 before they were jitted)."""
  tokens, mask = _samples(world, 8, 30)
  tokens, mask = np.asarray(tokens)[:7], np.asarray(mask)[:7]  # a batch size no other test uses
  with run_helpers.recorded(run_helpers.BACKEND_COMPILE) as compiles:
    gold = synthetic.gold_reward(world, CFG, tokens, mask)
    parts = synthetic.gold_components(world, CFG, tokens, mask)
  # One program for both (none where the persistent compilation cache already holds it).
  assert len(compiles) <= 1, len(compiles)
  np.testing.assert_allclose(parts["rest"] + parts["feature"], gold, rtol=1e-5, atol=1e-5)


def test_gold_falls_past_the_feature_threshold(world):
  """The planted feature has negative returns beyond its pi_init quantile."""
  tokens, mask = _samples(world, 64, 30)
  base = np.array(tokens)
  threshold = int(world.stats.count_threshold)
  counts = [threshold, threshold + 2, threshold + 4]
  gold = []
  for c in counts:
    t = base.copy()
    t[:, CFG.prompt_len : CFG.prompt_len + c] = CFG.feature_token
    t[:, CFG.prompt_len + c :][t[:, CFG.prompt_len + c :] == CFG.feature_token] = (
      CFG.feature_token + 1
    )
    gold.append(float(synthetic.gold_reward(world, CFG, jnp.asarray(t), mask).mean()))
  assert gold[0] > gold[1] > gold[2]


def test_pi_init_is_not_uniform(world):
  tokens, _ = _samples(world, 1024, 40)
  freq = np.bincount(np.asarray(tokens)[:, CFG.prompt_len :].ravel(), minlength=CFG.vocab_size)
  freq = freq / freq.sum()
  assert freq.max() > 3 / CFG.vocab_size


def test_world_is_a_function_of_its_key():
  a = synthetic.init_world(CFG, jax.random.key(3))
  b = synthetic.init_world(CFG, jax.random.key(3))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_deterministic_labels_choose_the_higher_gold(world):
  comp = synthetic.make_comparisons(world, CFG, jax.random.key(5), num=512)
  assert np.all(np.asarray(comp.gold_chosen) >= np.asarray(comp.gold_rejected))
  np.testing.assert_allclose(
    synthetic.gold_reward(world, CFG, comp.chosen, comp.mask),
    comp.gold_chosen,
    rtol=1e-5,
    atol=1e-5,
  )


def test_label_noise_flips_the_requested_fraction(world):
  comp = synthetic.make_comparisons(world, CFG, jax.random.key(6), num=4000, label_noise=0.25)
  wrong = np.mean(np.asarray(comp.gold_chosen) < np.asarray(comp.gold_rejected))
  assert abs(wrong - 0.25) < 4 * np.sqrt(0.25 * 0.75 / 4000)


def test_bradley_terry_labels_follow_the_sigmoid(world):
  comp = synthetic.make_comparisons(world, CFG, jax.random.key(7), num=4000, labels="bradley_terry")
  gap = np.abs(np.asarray(comp.gold_chosen) - np.asarray(comp.gold_rejected))
  expected = np.mean(1 / (1 + np.exp(-gap)))  # P(the higher-gold side is chosen)
  right = np.mean(np.asarray(comp.gold_chosen) > np.asarray(comp.gold_rejected))
  assert abs(right - expected) < 4 * np.sqrt(expected * (1 - expected) / 4000)


@pytest.mark.parametrize(
  "kwargs, match",
  [(dict(labels="coin"), "labels"), (dict(label_noise=0.7), "label_noise"), (dict(num=0), "num")],
)
def test_make_comparisons_rejects_bad_arguments(world, kwargs, match):
  args = dict(num=8) | kwargs
  with pytest.raises(ValueError, match=match):
    synthetic.make_comparisons(world, CFG, jax.random.key(0), **args)
  with pytest.raises(ValueError, match="key must be a JAX PRNG key"):
    synthetic.make_comparisons(world, CFG, 0, num=8)


def test_world_config_rejects_bad_fields():
  with pytest.raises(ValueError, match="feature_token"):
    dataclasses.replace(CFG, feature_token=CFG.vocab_size)
  with pytest.raises(ValueError, match="feature_quantile"):
    dataclasses.replace(CFG, feature_quantile=1.0)


def test_gold_rejects_sequences_of_another_length_naming_the_shape(world):
  tokens, mask = jnp.zeros((2, 5), jnp.int32), jnp.ones((2, 5), bool)
  for fn in (synthetic.gold_reward, synthetic.gold_components):
    with pytest.raises(ValueError, match=rf"tokens must have shape \[batch, {CFG.seq_len}\]"):
      fn(world, CFG, tokens, mask)
  good = jnp.zeros((2, CFG.seq_len), jnp.int32)
  with pytest.raises(ValueError, match="mask must have the shape of tokens"):
    synthetic.gold_reward(world, CFG, good, mask)


def test_sample_responses_rejects_wrong_prompt_shape(world):
  with pytest.raises(ValueError, match="prompts"):
    synthetic.sample_responses(
      world, CFG, jnp.zeros((2, CFG.prompt_len + 1), jnp.int32), jax.random.key(0)
    )
