"""Tests for jaxrm.math.advantages against float64 NumPy references and their defining properties."""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from jaxrm.math import advantages as adv


# ----------------------------------------------------------------------------- references
def _np_gae(r, v, m, gamma, lam):
  """GAE on the compressed trajectory of real positions, by the explicit sum formula."""
  idx = np.flatnonzero(m)
  r_c, v_c = np.asarray(r, np.float64)[idx], np.asarray(v, np.float64)[idx]
  v_next = np.append(v_c[1:], 0.0)
  delta = r_c + gamma * v_next - v_c
  n = len(idx)
  a_c = np.array([sum((gamma * lam) ** l * delta[j + l] for l in range(n - j)) for j in range(n)])
  advantages, returns = np.zeros(len(m)), np.zeros(len(m))
  advantages[idx] = a_c
  returns[idx] = a_c + v_c
  return advantages, returns


def _np_reward_to_go(r, m, gamma):
  idx = np.flatnonzero(m)
  r_c = np.asarray(r, np.float64)[idx]
  g = [sum(gamma**l * r_c[j + l] for l in range(len(idx) - j)) for j in range(len(idx))]
  out = np.zeros(len(m))
  out[idx] = g
  return out


def _random_masks(rng, batch, seq):
  """Left prompt + response + right padding rows, random (non-contiguous) rows, edge cases."""
  masks = []
  for _ in range(batch):
    start = rng.integers(0, seq)
    end = rng.integers(start, seq + 1)
    row = np.zeros(seq, bool)
    row[start:end] = True
    masks.append(row)
  masks.append(rng.uniform(size=seq) < 0.5)
  masks.append(np.zeros(seq, bool))
  masks.append(np.ones(seq, bool))
  return np.stack(masks)


# ----------------------------------------------------------------------------- token rewards
def test_rlhf_token_rewards_match_numpy_and_put_score_at_last_response_token():
  rng = np.random.default_rng(0)
  mask = _random_masks(rng, 6, 9)
  b, s = mask.shape
  kl = rng.normal(size=(b, s)).astype(np.float32)
  score = rng.normal(size=b).astype(np.float32)
  expected = np.where(mask, -0.1 * kl.astype(np.float64), 0.0)
  for i in range(b):
    real = np.flatnonzero(mask[i])
    if real.size:
      expected[i, real[-1]] += score[i]
  poisoned_kl = np.where(mask, kl, np.nan).astype(np.float32)
  got = jax.jit(functools.partial(adv.rlhf_token_rewards, kl_coef=0.1))(score, poisoned_kl, mask)
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
  # With no KL penalty, each row's rewards sum to its score, located at its last real token.
  no_kl = adv.rlhf_token_rewards(score, kl, mask, kl_coef=0.0)
  for i in range(b):
    real = np.flatnonzero(mask[i])
    nonzero = np.flatnonzero(np.asarray(no_kl[i]))
    assert list(nonzero) == ([real[-1]] if real.size else [])


def test_rlhf_token_rewards_accept_traced_kl_coef_and_float_mask():
  mask = np.array([[0, 1, 1, 0], [1, 1, 1, 1]], np.float32)
  kl = np.ones((2, 4), np.float32)
  score = np.array([2.0, -1.0], np.float32)
  state = adv.adaptive_kl_init(init_kl_coef=0.5)
  got = jax.jit(lambda c: adv.rlhf_token_rewards(score, kl, mask, kl_coef=c))(state.kl_coef)
  np.testing.assert_allclose(got, [[0, -0.5, 1.5, 0], [-0.5, -0.5, -0.5, -1.5]])


def test_rlhf_token_rewards_reject_bad_shapes():
  with pytest.raises(ValueError, match=r"score must have shape \[batch\]"):
    adv.rlhf_token_rewards(jnp.zeros(3), jnp.zeros((2, 4)), jnp.ones((2, 4)), kl_coef=0.1)
  with pytest.raises(ValueError, match=r"mask must have the shape of kl \(2, 4\), got \(2, 5\)"):
    adv.rlhf_token_rewards(jnp.zeros(2), jnp.zeros((2, 4)), jnp.ones((2, 5)), kl_coef=0.1)


# ----------------------------------------------------------------------------- whitening
def test_whiten_matches_numpy_and_gives_zero_mean_unit_variance_over_mask():
  rng = np.random.default_rng(1)
  x = (3.0 + 2.0 * rng.normal(size=(5, 8))).astype(np.float32)
  mask = rng.uniform(size=(5, 8)) < 0.6
  vals = x[mask].astype(np.float64)
  expected = np.where(mask, (x - vals.mean()) / np.sqrt(vals.var() + 1e-8), 0.0)
  got = jax.jit(adv.whiten)(x, mask)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  w = np.asarray(got, np.float64)[mask]
  np.testing.assert_allclose([w.mean(), w.var()], [0.0, 1.0], atol=1e-5)
  # shift_mean=False keeps the mean and only rescales.
  kept = np.asarray(adv.whiten(x, mask, shift_mean=False), np.float64)[mask]
  np.testing.assert_allclose([kept.mean(), kept.std()], [vals.mean(), 1.0], rtol=1e-5)


def test_whiten_ignores_masked_values():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(4, 6)).astype(np.float32)
  mask = rng.uniform(size=(4, 6)) < 0.5
  poisoned = np.where(mask, x, np.nan).astype(np.float32)
  big = np.where(mask, x, 1e6).astype(np.float32)
  np.testing.assert_array_equal(adv.whiten(poisoned, mask), adv.whiten(x, mask))
  np.testing.assert_array_equal(adv.whiten(big, mask.astype(np.float32)), adv.whiten(x, mask))


def test_whiten_with_axis_name_uses_global_statistics_under_shard_map():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  rng = np.random.default_rng(3)
  x = rng.normal(size=(16, 5)).astype(np.float32) + np.arange(16)[:, None]
  mask = rng.uniform(size=(16, 5)) < 0.5
  sharded = jax.jit(
    jax.shard_map(
      lambda x, m: adv.whiten(x, m, axis_name="data"),
      mesh=mesh,
      in_specs=(P("data"), P("data")),
      out_specs=P("data"),
    )
  )
  np.testing.assert_allclose(sharded(x, mask), adv.whiten(x, mask), rtol=1e-5, atol=1e-5)


def test_clip_rewards_matches_numpy():
  x = np.array([-5.0, -1.0, 0.0, 0.5, 7.0])
  np.testing.assert_allclose(
    jax.jit(functools.partial(adv.clip_rewards, max_abs=2.0))(x), np.clip(x, -2.0, 2.0)
  )
  with pytest.raises(ValueError, match="max_abs"):
    adv.clip_rewards(x, max_abs=0.0)


# ----------------------------------------------------------------------------- GAE, returns
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (0.7, 0.0)])
def test_gae_matches_numpy_with_random_masks(gamma, lam):
  rng = np.random.default_rng(4)
  mask = _random_masks(rng, 8, 11)
  r = rng.normal(size=mask.shape)
  v = rng.normal(size=mask.shape)
  with jax.enable_x64(True):
    fn = jax.jit(functools.partial(adv.batched_gae, gamma=gamma, lam=lam))
    got_a, got_r = fn(r, v, mask)
    for i in range(mask.shape[0]):
      exp_a, exp_r = _np_gae(r[i], v[i], mask[i], gamma, lam)
      np.testing.assert_allclose(got_a[i], exp_a, rtol=1e-12, atol=1e-12)
      np.testing.assert_allclose(got_r[i], exp_r, rtol=1e-12, atol=1e-12)
    # The one-trajectory function agrees with its batched version.
    one_a, one_r = adv.gae(r[0], v[0], mask[0], gamma=gamma, lam=lam)
    np.testing.assert_allclose(one_a, got_a[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(one_r, got_r[0], rtol=1e-12, atol=1e-12)


def test_gae_float32_matches_numpy():
  rng = np.random.default_rng(5)
  mask = _random_masks(rng, 4, 16)
  r, v = rng.normal(size=(2,) + mask.shape).astype(np.float32)
  got_a, got_r = jax.jit(functools.partial(adv.batched_gae, gamma=1.0, lam=0.95))(r, v, mask)
  assert got_a.dtype == jnp.float32
  for i in range(mask.shape[0]):
    exp_a, exp_r = _np_gae(r[i], v[i], mask[i], 1.0, 0.95)
    np.testing.assert_allclose(got_a[i], exp_a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_r[i], exp_r, rtol=1e-5, atol=1e-5)


def test_gae_is_invariant_to_prompt_and_padding_and_ignores_masked_values():
  rng = np.random.default_rng(6)
  r, v = rng.normal(size=(2, 5)).astype(np.float32)
  ones = np.ones(5, bool)
  base_a, base_r = adv.gae(r, v, ones, gamma=0.9, lam=0.9)
  # Same response behind a 3-token prompt and before 4 padding tokens, garbage elsewhere.
  r_pad = np.concatenate([np.full(3, np.nan), r, np.full(4, 1e6)]).astype(np.float32)
  v_pad = np.concatenate([np.full(3, 1e6), v, np.full(4, np.nan)]).astype(np.float32)
  m_pad = np.concatenate([np.zeros(3, bool), ones, np.zeros(4, bool)])
  got_a, got_r = adv.gae(r_pad, v_pad, m_pad, gamma=0.9, lam=0.9)
  np.testing.assert_allclose(got_a[3:8], base_a, rtol=1e-6)
  np.testing.assert_allclose(got_r[3:8], base_r, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(got_a)[~m_pad], 0.0)
  np.testing.assert_array_equal(np.asarray(got_r)[~m_pad], 0.0)


def test_gae_with_lambda_one_gives_reward_to_go_minus_value():
  rng = np.random.default_rng(7)
  mask = _random_masks(rng, 5, 10)
  r, v = rng.normal(size=(2,) + mask.shape)
  with jax.enable_x64(True):
    a, ret = adv.batched_gae(r, v, mask, gamma=0.95, lam=1.0)
    g = adv.batched_reinforce_returns(r, mask, gamma=0.95)
    np.testing.assert_allclose(ret, g, atol=1e-12)
    np.testing.assert_allclose(a, np.where(mask, g - v, 0.0), atol=1e-12)


def test_gae_rejects_bad_shapes():
  with pytest.raises(ValueError, match=r"r_t must have shape \[seq\]"):
    adv.gae(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.ones((2, 3)), gamma=1.0, lam=1.0)
  with pytest.raises(ValueError, match=r"v_t must have the shape of r_t \(3,\), got \(4,\)"):
    adv.gae(jnp.zeros(3), jnp.zeros(4), jnp.ones(3), gamma=1.0, lam=1.0)
  with pytest.raises(ValueError, match=r"mask must have the shape of r_t"):
    adv.gae(jnp.zeros(3), jnp.zeros(3), jnp.ones(2), gamma=1.0, lam=1.0)
  with pytest.raises(ValueError, match=r"r_t must have shape \[batch, seq\]"):
    adv.batched_gae(jnp.zeros(3), jnp.zeros(3), jnp.ones(3), gamma=1.0, lam=1.0)
  with pytest.raises(ValueError, match=r"v_t must have the shape of r_t \(4, 8\), got \(2, 8\)"):
    adv.batched_gae(jnp.ones((4, 8)), jnp.ones((2, 8)), jnp.ones((4, 8)), gamma=1.0, lam=0.9)
  with pytest.raises(ValueError, match=r"mask must have the shape of r_t \(4, 8\), got \(4, 7\)"):
    adv.batched_gae(jnp.ones((4, 8)), jnp.ones((4, 8)), jnp.ones((4, 7)), gamma=1.0, lam=0.9)
  with pytest.raises(ValueError, match=r"mask must have the shape of r_t \(4, 8\), got \(2, 8\)"):
    adv.batched_reinforce_returns(jnp.ones((4, 8)), jnp.ones((2, 8)))


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_returns_match_numpy_reward_to_go(gamma):
  rng = np.random.default_rng(8)
  mask = _random_masks(rng, 6, 9)
  r = rng.normal(size=mask.shape)
  with jax.enable_x64(True):
    got = jax.jit(functools.partial(adv.batched_reinforce_returns, gamma=gamma))(r, mask)
    for i in range(mask.shape[0]):
      np.testing.assert_allclose(got[i], _np_reward_to_go(r[i], mask[i], gamma), atol=1e-12)
    one = adv.reinforce_returns(r[0], mask[0], gamma=gamma)
    np.testing.assert_allclose(one, got[0], atol=1e-12)


def test_reinforce_baseline_is_moving_average_of_past_batches():
  rng = np.random.default_rng(9)
  batches = [rng.normal(loc=3.0, size=4).astype(np.float32) for _ in range(5)]
  update = jax.jit(functools.partial(adv.reinforce_baseline_update, decay=0.8))
  state = adv.reinforce_baseline_init()
  assert float(state.value) == 0.0 and int(state.count) == 0
  expected = None
  for batch in batches:
    state = update(state, batch)
    mean = float(np.mean(batch.astype(np.float64)))
    expected = mean if expected is None else 0.8 * expected + 0.2 * mean
    np.testing.assert_allclose(state.value, expected, rtol=1e-6)
  assert int(state.count) == 5 and state.value.dtype == jnp.float32
  # The state is a pytree (checkpointable): it round-trips through flatten / unflatten.
  leaves, treedef = jax.tree.flatten(state)
  assert jax.tree.unflatten(treedef, leaves) == state

  returns = rng.normal(size=(2, 5)).astype(np.float32)
  mask = np.array([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]], bool)
  got = jax.jit(adv.reinforce_advantages)(returns, mask, state)
  np.testing.assert_allclose(got, np.where(mask, returns - expected, 0.0), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"episode_returns must have shape \[batch\]"):
    adv.reinforce_baseline_update(state, jnp.zeros((2, 3)))


# ----------------------------------------------------------------------------- group baselines
def test_rloo_advantages_match_leave_one_out_numpy_and_sum_to_zero():
  rng = np.random.default_rng(10)
  scores = rng.normal(size=(6, 4))
  expected = np.array(
    [[row[i] - np.mean(np.delete(row, i)) for i in range(len(row))] for row in scores]
  )
  with jax.enable_x64(True):
    got = jax.jit(adv.rloo_advantages)(scores)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.sum(got, axis=1), 0.0, atol=1e-12)
  got32 = adv.rloo_advantages(scores.astype(np.float32))
  np.testing.assert_allclose(got32, expected, rtol=1e-5, atol=1e-5)


def test_rloo_advantages_require_two_samples_per_prompt():
  with pytest.raises(ValueError, match=r"at least k=2.*\(3, 1\)"):
    adv.rloo_advantages(jnp.zeros((3, 1)))
  with pytest.raises(ValueError, match=r"scores must have shape \[num_prompts, k\]"):
    adv.rloo_advantages(jnp.zeros(4))


def test_grpo_advantages_have_zero_mean_unit_std_per_group():
  rng = np.random.default_rng(11)
  scores = 5.0 + 3.0 * rng.normal(size=(5, 8))
  mean = scores.mean(1, keepdims=True)
  std = scores.std(1, keepdims=True)
  with jax.enable_x64(True):
    got = jax.jit(adv.grpo_advantages)(scores)
    np.testing.assert_allclose(got, (scores - mean) / (std + 1e-6), rtol=1e-12)
    np.testing.assert_allclose(np.mean(got, 1), 0.0, atol=1e-12)
    np.testing.assert_allclose(np.std(got, 1), 1.0, rtol=1e-5)
    unscaled = jax.jit(functools.partial(adv.grpo_advantages, scale=False))(scores)
    np.testing.assert_allclose(unscaled, scores - mean, rtol=1e-12)
  got32 = adv.grpo_advantages(scores.astype(np.float32))
  np.testing.assert_allclose(got32, (scores - mean) / (std + 1e-6), rtol=1e-4, atol=1e-5)


def test_grpo_advantages_are_zero_for_a_group_of_equal_scores():
  scores = np.array([[1.0, 1.0, 1.0], [0.0, 1.0, 2.0]], np.float32)
  got = np.asarray(adv.grpo_advantages(scores))
  np.testing.assert_array_equal(got[0], 0.0)
  np.testing.assert_allclose(got[1], [-np.sqrt(1.5), 0.0, np.sqrt(1.5)], rtol=1e-5)


@pytest.mark.parametrize("k", [3, 5, 8])
@pytest.mark.parametrize(
  "fn",
  [
    adv.rloo_advantages,
    functools.partial(adv.grpo_advantages, scale="group"),
    functools.partial(adv.grpo_advantages, scale="batch"),
    functools.partial(adv.grpo_advantages, scale="none"),
  ],
  ids=["rloo", "grpo_group", "grpo_batch", "grpo_none"],
)
def test_group_advantages_are_exactly_zero_for_equal_float32_scores(fn, k):
  """Equal scores that float32 cannot average exactly (the rounded mean of k copies is an ulp
  off for 10-66% of them) still get zero advantages: a residue would be scaled by
  the group's ~1e-7 standard deviation into advantages of up to 0.2, and its sign decides
  PPO's clip indicator."""
  rng = np.random.default_rng(k)
  equal = np.repeat(rng.uniform(-3, 3, size=(64, 1)), k, axis=1)
  scores = np.concatenate([equal, rng.uniform(-3, 3, size=(64, k))]).astype(np.float32)
  for got in (fn(scores), jax.jit(fn)(scores)):
    np.testing.assert_array_equal(np.asarray(got)[:64], 0.0)
    assert np.all(np.asarray(got)[64:] != 0)  # groups of distinct scores are not zeroed.


def test_group_advantages_treat_scores_an_ulp_apart_as_ties():
  """A reward normalisation that XLA computes in two fusions can give one score two values an
  ulp apart; within ``TIE_ULPS`` ulps of the group's largest score they are ties (zero
  advantages; the formula without the tolerance gives -0.057 to two of them after the group
  scaling), and a difference beyond that is kept."""
  x = np.float32(-0.5773497)
  up = np.nextafter(x, np.float32(1), dtype=np.float32)
  far = x + np.float32(2 * adv.TIE_ULPS) * np.finfo(np.float32).eps
  scores = np.array([[x, up, up, x], [x, far, x, x]], np.float32)
  for fn in (adv.grpo_advantages, adv.rloo_advantages):
    got = np.asarray(jax.jit(fn)(scores))
    np.testing.assert_array_equal(got[0], 0.0)
    assert got[1, 1] > 0 > got[1, 0], got[1]


# ----------------------------------------------------------------------------- adaptive KL
def test_adaptive_kl_controller_matches_numpy_recursion():
  kls = [0.5, 12.0, 6.5, 5.9, 0.0, 30.0]
  update = jax.jit(functools.partial(adv.adaptive_kl_update, target_kl=6.0, horizon=10_000))
  state = adv.adaptive_kl_init(init_kl_coef=0.2)
  coef = 0.2
  for kl_value in kls:
    state = update(state, kl_value, 256)
    coef *= 1.0 + np.clip(kl_value / 6.0 - 1.0, -0.2, 0.2) * 256 / 10_000
    np.testing.assert_allclose(state.kl_coef, coef, rtol=1e-6)
  assert state.kl_coef.shape == () and state.kl_coef.dtype == jnp.float32


def test_adaptive_kl_controller_raises_coef_above_target_and_lowers_it_below():
  state = adv.adaptive_kl_init(init_kl_coef=0.1)
  up = adv.adaptive_kl_update(state, 8.0, 100, target_kl=6.0, horizon=1000)
  down = adv.adaptive_kl_update(state, 4.0, 100, target_kl=6.0, horizon=1000)
  same = adv.adaptive_kl_update(state, 6.0, 100, target_kl=6.0, horizon=1000)
  assert float(up.kl_coef) > 0.1 > float(down.kl_coef)
  np.testing.assert_allclose(same.kl_coef, 0.1, rtol=1e-7)
  # The proportional error is clipped to +-0.2.
  huge = adv.adaptive_kl_update(state, 1e6, 100, target_kl=6.0, horizon=1000)
  np.testing.assert_allclose(huge.kl_coef, 0.1 * (1 + 0.2 * 0.1), rtol=1e-6)


def test_adaptive_kl_controller_rejects_missing_target():
  state = adv.adaptive_kl_init(init_kl_coef=0.1)
  with pytest.raises(ValueError, match="target_kl is None"):
    adv.adaptive_kl_update(state, 1.0, 1, target_kl=None, horizon=100)
  with pytest.raises(ValueError, match="horizon"):
    adv.adaptive_kl_update(state, 1.0, 1, target_kl=1.0, horizon=0)


def test_adaptive_kl_controller_keeps_the_coefficient_non_negative():
  # 1 + e * n / horizon with e = -0.2 is <= 0 once n >= 5 * horizon: refused, not a negative
  # coefficient that would reward moving away from the reference
  state = adv.adaptive_kl_init(init_kl_coef=0.1)
  with pytest.raises(ValueError, match=r"horizon \(100.0\) must exceed 0.2 \* n_steps \(512\)"):
    adv.adaptive_kl_update(state, 0.0, 512, target_kl=6.0, horizon=100.0)
  low = adv.adaptive_kl_update(state, 0.0, 400, target_kl=6.0, horizon=100.0)
  np.testing.assert_allclose(low.kl_coef, 0.1 * (1 - 0.2 * 4.0), rtol=1e-5)
  assert float(low.kl_coef) > 0
  for bad in (-0.1, np.float32(-0.1), jnp.array(-0.1)):
    with pytest.raises(ValueError, match="init_kl_coef must be >= 0"):
      adv.adaptive_kl_init(init_kl_coef=bad)
  with pytest.raises(ValueError, match="target_kl must be > 0"):
    adv.adaptive_kl_update(state, 1.0, 1, target_kl=jnp.array(-1.0), horizon=100)


@pytest.mark.parametrize(
  "call, message",
  [
    (lambda: adv.whiten(jnp.ones((2, 3)), jnp.ones((2, 3)), eps=0.0), "eps must be > 0"),
    (lambda: adv.grpo_advantages(jnp.ones((2, 2)), eps=-1e-6), "eps must be > 0"),
    (lambda: adv.clip_rewards(jnp.ones(2), max_abs=np.float32(-1)), "max_abs must be > 0"),
    (lambda: adv.clip_rewards(jnp.ones(2), max_abs=None), "max_abs must be a number"),
    (lambda: adv.whiten(["a"], jnp.ones(1)), "x must be a numeric array"),
    (lambda: adv.grpo_advantages([["a", "b"]]), "scores must be a numeric array"),
  ],
)
def test_bad_hyperparameters_and_inputs_raise_naming_them(call, message):
  with pytest.raises(ValueError, match=message):
    call()


# ----------------------------------------------------------------------------- variants
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_advantage_scales_match_numpy(scale):
  rng = np.random.default_rng(12)
  scores = 2.0 + rng.normal(size=(4, 6)) * rng.uniform(0.1, 3.0, size=(4, 1))
  centred = scores - scores.mean(1, keepdims=True)
  std = {"group": scores.std(1, keepdims=True), "batch": scores.std(), "none": None}[scale]
  want = centred if std is None else centred / (std + 1e-6)
  with jax.enable_x64(True):
    got = jax.jit(functools.partial(adv.grpo_advantages, scale=scale))(scores)
  np.testing.assert_allclose(got, want, rtol=1e-12)


def test_grpo_batch_scale_uses_the_global_batch_under_shard_map():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  scores = np.random.default_rng(13).normal(size=(16, 4)).astype(np.float32)
  fn = functools.partial(adv.grpo_advantages, scale="batch")
  sharded = jax.jit(
    jax.shard_map(
      lambda s: fn(s, axis_name="data"),
      mesh=mesh,
      in_specs=P("data"),
      out_specs=P("data"),
      check_vma=False,
    )
  )
  np.testing.assert_allclose(sharded(scores), fn(scores), rtol=1e-5, atol=1e-6)


def test_discounts_must_be_scalars_and_grpo_scale_must_be_known():
  r = np.zeros(5, np.float32)
  with pytest.raises(ValueError, match=r"gamma must be a scalar .* got shape \(5,\)"):
    adv.gae(r, r, np.ones(5, bool), gamma=np.full(5, 0.9), lam=0.95)
  with pytest.raises(ValueError, match=r"lam must be a scalar"):
    adv.batched_gae(r[None], r[None], np.ones((1, 5), bool), gamma=0.9, lam=np.ones(5))
  with pytest.raises(ValueError, match=r"gamma must be a scalar"):
    adv.reinforce_returns(r, np.ones(5, bool), gamma=np.ones(5))
  with pytest.raises(ValueError, match="scale must be one of"):
    adv.grpo_advantages(np.zeros((2, 3)), scale="global")
