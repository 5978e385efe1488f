"""Tests for jaxrm.math.objectives: reward-ensemble objectives against NumPy references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrm.math import objectives as obj


def _rewards(shape=(5, 7), seed=0):
  return np.random.default_rng(seed).normal(size=shape)


def test_ensemble_mean_and_worst_case_match_numpy():
  rewards = _rewards()
  with jax.enable_x64(True):
    np.testing.assert_allclose(jax.jit(obj.ensemble_mean)(rewards), rewards.mean(0), rtol=1e-12)
    np.testing.assert_array_equal(jax.jit(obj.ensemble_worst_case)(rewards), rewards.min(0))


@pytest.mark.parametrize("coef", [0.0, 0.5, 3.0])
def test_uncertainty_weighted_is_mean_minus_coef_times_population_variance(coef):
  rewards = _rewards(seed=1)
  expected = rewards.mean(0) - coef * rewards.var(0, ddof=0)
  with jax.enable_x64(True):
    fn = jax.jit(functools.partial(obj.ensemble_uncertainty_weighted, coef=coef))
    np.testing.assert_allclose(fn(rewards), expected, rtol=1e-12, atol=1e-14)
  got32 = obj.ensemble_uncertainty_weighted(rewards.astype(np.float32), coef=coef)
  assert got32.dtype == jnp.float32 and got32.shape == (7,)
  np.testing.assert_allclose(got32, expected, rtol=1e-5, atol=1e-6)


def test_objectives_reduce_only_the_member_axis():
  rewards = _rewards(shape=(3, 4, 6), seed=2)
  np.testing.assert_allclose(obj.ensemble_mean(rewards), rewards.mean(0), rtol=1e-6)
  np.testing.assert_allclose(obj.ensemble_worst_case(rewards), rewards.min(0), rtol=1e-6)


def test_single_member_gives_its_reward_and_penalised_objectives_never_exceed_mean():
  rewards = _rewards(seed=3)
  # A single member: every objective is that member's reward.
  single = rewards[:1]
  for name, kw in [("mean", {}), ("worst_case", {}), ("uncertainty_weighted", {"coef": 2.0})]:
    np.testing.assert_allclose(obj.ensemble_objective(name, **kw)(single), single[0], rtol=1e-6)
  # Penalised objectives never exceed the mean.
  mean = np.asarray(obj.ensemble_mean(rewards))
  assert np.all(np.asarray(obj.ensemble_worst_case(rewards)) <= mean + 1e-6)
  assert np.all(np.asarray(obj.ensemble_uncertainty_weighted(rewards, coef=0.1)) <= mean + 1e-6)


def test_ensemble_objective_maps_names_to_functions():
  rewards = _rewards(seed=4)
  cases = {
    "mean": (obj.ensemble_objective("mean"), rewards.mean(0)),
    "worst_case": (obj.ensemble_objective("worst_case"), rewards.min(0)),
    "uncertainty_weighted": (
      obj.ensemble_objective("uncertainty_weighted", coef=0.7),
      rewards.mean(0) - 0.7 * rewards.var(0),
    ),
  }
  assert set(cases) == set(obj.OBJECTIVES)
  for name, (fn, expected) in cases.items():
    got = jax.jit(fn)(rewards.astype(np.float32))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=name)


def test_ensemble_objective_rejects_unknown_names_and_bad_hyperparameters():
  with pytest.raises(ValueError, match="name must be one of"):
    obj.ensemble_objective("median")
  with pytest.raises(ValueError, match=r"missing \['coef'\]"):
    obj.ensemble_objective("uncertainty_weighted")
  with pytest.raises(ValueError, match=r"unexpected \['coef'\]"):
    obj.ensemble_objective("mean", coef=1.0)


def test_objectives_reject_rewards_without_member_axis():
  with pytest.raises(ValueError, match=r"rewards must have shape \[k, batch, ...\]"):
    obj.ensemble_mean(jnp.float32(1.0))
  with pytest.raises(ValueError, match=r"rewards must have shape \[k, batch, ...\]"):
    obj.ensemble_worst_case(jnp.zeros((0, 3)))


@pytest.mark.parametrize(
  "name, kw", [("mean", {}), ("worst_case", {}), ("uncertainty_weighted", {"coef": 1.0})]
)
def test_objectives_reject_rank_1_rewards_naming_the_shape(name, kw):
  # [k] alone is ambiguous (k members of one example, or one member's batch): it used to
  # reduce to a scalar silently.
  with pytest.raises(ValueError, match=r"rewards must have shape \[k, batch, ...\].*got \(3,\)"):
    obj.ensemble_objective(name, **kw)(jnp.array([1.0, 2.0, 3.0]))
  np.testing.assert_allclose(
    obj.ensemble_objective(name, **kw)(jnp.array([[1.0], [1.0], [1.0]])), [1.0], rtol=1e-6
  )


def test_objectives_reject_string_rewards_naming_the_argument():
  with pytest.raises(ValueError, match="rewards must be a numeric array, got dtype <U1"):
    obj.ensemble_mean(np.array([["a", "b"]]))


# ----------------------------------------------------------------------------- normalisation
@pytest.mark.parametrize("name", ["mean", "worst_case", "uncertainty_weighted"])
def test_batch_normalised_objectives_match_numpy_and_ignore_member_offsets_and_scales(name):
  rng = np.random.default_rng(3)
  rewards = rng.normal(size=(4, 9))
  hyper = {"coef": 0.5} if name == "uncertainty_weighted" else {}
  z = (rewards - rewards.mean(1, keepdims=True)) / (rewards.std(1, keepdims=True) + 1e-8)
  want = {
    "mean": z.mean(0),
    "worst_case": z.min(0),
    "uncertainty_weighted": z.mean(0) - 0.5 * z.var(0),
  }[name]
  fn = obj.ensemble_objective(name, normalize="batch", **hyper)
  with jax.enable_x64(True):
    np.testing.assert_allclose(jax.jit(fn)(rewards), want, rtol=1e-10)
  # Bradley-Terry leaves each member's offset and scale free: they no longer matter.
  shifted = rewards * rng.uniform(0.5, 3.0, size=(4, 1)) + rng.normal(0, 10, size=(4, 1))
  np.testing.assert_allclose(fn(shifted), fn(rewards), rtol=1e-4, atol=1e-5)


def test_fixed_member_statistics_standardise_each_member():
  rewards = np.array([[1.0, 3.0], [10.0, 30.0]])
  mean, std = np.array([2.0, 20.0]), np.array([1.0, 10.0])
  got = obj.normalize_members(rewards, mean=mean, std=std, eps=0.0)
  np.testing.assert_allclose(got, [[-1.0, 1.0], [-1.0, 1.0]], rtol=1e-6)
  fn = obj.ensemble_objective("worst_case", normalize="fixed", member_mean=mean, member_std=std)
  np.testing.assert_allclose(fn(rewards), [-1.0, 1.0], rtol=1e-6)
  with pytest.raises(ValueError, match="needs both member_mean and member_std"):
    obj.ensemble_objective("mean", normalize="fixed", member_mean=mean)
  with pytest.raises(ValueError, match="normalize must be one of"):
    obj.ensemble_objective("mean", normalize="members")
  with pytest.raises(ValueError, match=r"mean must have shape \[k\] = \(2,\), got \(3,\)"):
    obj.normalize_members(rewards, mean=np.zeros(3), std=np.ones(3))
