"""Tests for jaxrm.data.hidden_context against NumPy references."""

import jax
import numpy as np
import pytest

from jaxrm.data import hidden_context as hc_lib
from jaxrm.data import synthetic

CFG = synthetic.WorldConfig(num_calibration=2048, gold_width=32, policy_width=16)


@pytest.fixture(scope="module")
def world():
  return synthetic.init_world(CFG, jax.random.key(0))


def _np_label(golds_a, golds_b, group, u, labels):
  out = []
  for ga, gb, g, x in zip(golds_a, golds_b, group, u):
    a, b = ga[g], gb[g]
    p = 1 / (1 + np.exp(-(a - b))) if labels == "bradley_terry" else (0.5 if a == b else a > b)
    out.append(x < p)
  return np.array(out)


@pytest.mark.parametrize("labels", hc_lib.LABELS)
def test_label_pairs_matches_numpy(labels):
  rng = np.random.default_rng(0)
  golds_a, golds_b = rng.normal(size=(50, 2)), rng.normal(size=(50, 2))
  golds_b[:5] = golds_a[:5]  # ties: a coin
  group, u = rng.integers(0, 2, 50), rng.uniform(size=50)
  got = hc_lib.label_pairs(
    golds_a.astype(np.float32), golds_b.astype(np.float32), group, u, labels=labels
  )
  np.testing.assert_array_equal(np.asarray(got), _np_label(golds_a, golds_b, group, u, labels))


def test_group_golds_are_the_worlds_gold_and_the_reweighted_feature(world):
  hc = hc_lib.HiddenContextConfig(group2_feature_weight=-0.5)
  prompts = synthetic.sample_prompts(CFG, jax.random.key(1), 256)
  tokens, mask = synthetic.sample_responses(world, CFG, prompts, jax.random.key(2))
  golds = np.asarray(hc_lib.group_golds(world, CFG, hc, tokens, mask), np.float64)
  parts = {
    k: np.asarray(v, np.float64)
    for k, v in synthetic.gold_components(world, CFG, tokens, mask).items()
  }
  gold = np.asarray(synthetic.gold_reward(world, CFG, tokens, mask), np.float64)
  np.testing.assert_allclose(golds[:, 0], gold, atol=1e-5)
  np.testing.assert_allclose(golds[:, 1], parts["rest"] - 0.5 * parts["feature"], atol=1e-5)
  # The groups disagree exactly where the feature term is non-zero.
  np.testing.assert_allclose(golds[:, 0] - golds[:, 1], 1.5 * parts["feature"], atol=1e-5)


def test_utility_moments_match_the_two_point_mixture():
  golds = np.array([[1.0, -1.0], [0.5, 0.5], [2.0, 0.0]])
  m = hc_lib.utility_moments(golds, group2_prob=0.25)
  for i, (g1, g2) in enumerate(golds):
    mean = 0.75 * g1 + 0.25 * g2
    np.testing.assert_allclose(m["mean"][i], mean, rtol=1e-6)
    np.testing.assert_allclose(
      m["std"][i], np.sqrt(0.75 * (g1 - mean) ** 2 + 0.25 * (g2 - mean) ** 2), rtol=1e-6
    )


def test_comparisons_are_labelled_by_the_drawn_group(world):
  hc = hc_lib.HiddenContextConfig(group2_prob=0.3)
  data = hc_lib.make_comparisons(world, CFG, hc, jax.random.key(3), num=4000)
  group = np.asarray(data.group)
  gc, gr = np.asarray(data.golds_chosen), np.asarray(data.golds_rejected)
  # Deterministic labels: the labelling group's gold of chosen >= rejected, on every pair.
  rows = np.arange(len(group))
  assert np.all(gc[rows, group] >= gr[rows, group])
  # Group frequency: binomial(4000, 0.3), sd 0.0072; 5 sd.
  assert abs(group.mean() - 0.3) < 0.036
  # The other group disagrees on some pairs (the hidden context is real).
  assert np.mean(gc[rows, 1 - group] < gr[rows, 1 - group]) > 0.02
  # The batch is the ordinary preference batch.
  batch = data.as_batch()
  assert batch["chosen"].shape == (4000, CFG.seq_len) and batch["rejected_mask"].dtype == bool
  # (jit vs eager: float rounding only)
  np.testing.assert_allclose(
    np.asarray(hc_lib.group_golds(world, CFG, hc, data.chosen, data.mask)), gc, atol=1e-5
  )


def test_group2_prob_zero_is_the_worlds_own_labels(world):
  data = hc_lib.make_comparisons(
    world, CFG, hc_lib.HiddenContextConfig(group2_prob=0.0), jax.random.key(4), num=500
  )
  assert not np.asarray(data.group).any()
  g = np.asarray(synthetic.gold_reward(world, CFG, data.chosen, data.mask))
  h = np.asarray(synthetic.gold_reward(world, CFG, data.rejected, data.mask))
  assert np.all(g >= h - 1e-5)


def test_bad_settings_raise_naming_the_field():
  with pytest.raises(ValueError, match=r"group2_prob must lie in \[0, 1\], got 1.5"):
    hc_lib.HiddenContextConfig(group2_prob=1.5)
  with pytest.raises(ValueError, match="labels must be one of"):
    hc_lib.HiddenContextConfig(labels="majority")
  with pytest.raises(ValueError, match="group2_feature_weight must be finite"):
    hc_lib.HiddenContextConfig(group2_feature_weight=float("nan"))
  with pytest.raises(ValueError, match=r"golds must have shape \[batch, 2\], got \(3,\)"):
    hc_lib.utility_moments(np.zeros(3), group2_prob=0.5)
  with pytest.raises(ValueError, match=r"group2_prob must lie in \[0, 1\], got 1.5"):
    hc_lib.utility_moments(np.zeros((3, 2)), group2_prob=1.5)
  with pytest.raises(ValueError, match="num must be an int >= 1, got 0"):
    hc_lib.make_comparisons(None, CFG, hc_lib.HiddenContextConfig(), jax.random.key(0), num=0)
