"""Tests for jaxrm.steps.rollout and jaxrm.steps.rl: rollouts, advantage targets, PPO/REINFORCE/RLOO/GRPO."""

import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrm.math import advantages as adv_lib
from jaxrm.math import running_stats
from jaxrm.models.policy import PolicyModel, apply_fn_policy, transformer_policy
from jaxrm.models.transformer import TransformerConfig
from jaxrm.steps import parallel, rl
from jaxrm.steps import rollout as rollout_lib

VOCAB, PROMPT_LEN, NEW = 8, 3, 6
TARGET_TOKEN = 5
CFG = TransformerConfig(
  vocab_size=VOCAB, num_layers=1, width=16, num_heads=2, max_len=PROMPT_LEN + NEW
)
# eps=1e-5: Adam turns rounding noise in mathematically-zero gradients (e.g. the attention key
# bias, to which the softmax is invariant) into +-lr updates whose sign depends on the
# summation order; a larger eps keeps those updates negligible in the parallel comparison.
OPT = optax.adam(3e-3, eps=1e-5)
BATCH = 32
POLICY = transformer_policy(CFG)
POLICY_V = transformer_policy(CFG, value_head=True)


def toy_reward(params, tokens, mask):
  """Fraction of response tokens equal to params['token'], plus params['offset']."""
  response = mask & (jnp.arange(tokens.shape[1]) >= PROMPT_LEN)[None, :]
  hits = jnp.sum(response & (tokens == params["token"]), axis=1, dtype=jnp.float32)
  return hits / jnp.maximum(jnp.sum(response, axis=1), 1) + params["offset"]


def reward_params(offset=0.0):
  return {"token": jnp.int32(TARGET_TOKEN), "offset": jnp.float32(offset)}


def make_prompts(seed, b=BATCH, left_pad=True):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1 if left_pad else PROMPT_LEN, PROMPT_LEN + 1, size=b)
  mask = np.arange(PROMPT_LEN)[None, :] >= (PROMPT_LEN - lengths)[:, None]
  prompts = np.where(mask, rng.integers(3, VOCAB, size=(b, PROMPT_LEN)), 0).astype(np.int32)
  return {"prompts": prompts, "prompt_mask": mask}


INIT = jax.jit(PolicyModel(CFG).init)


@functools.cache
def policy_params(seed=0):
  dummy = jnp.zeros((1, PROMPT_LEN + NEW), jnp.int32)
  return INIT(jax.random.key(seed), dummy, jnp.ones(dummy.shape, bool))


def ppo_config(**kw):
  base = dict(max_new_tokens=NEW, eos_id=None, num_epochs=2, num_minibatches=2)
  base.update(kw)
  return rl.RLConfig(**base)


PPO_CONFIG = ppo_config()
PPO_STEP = functools.partial(
  rl.ppo_step,
  policy=POLICY_V,
  config=PPO_CONFIG,
  reward_fn=toy_reward,
  optimizer=OPT,
  return_rollout=True,
)
PPO_JIT = jax.jit(PPO_STEP)  # one compilation shared by the PPO tests


def ppo_state(kl_coef, seed=1):
  return rl.create_rl_state(ppo_params(), OPT, jax.random.key(seed), kl_coef=kl_coef)


def run(step, state, num_steps, *, seed0=100, b=BATCH, rp=None):
  rp = reward_params() if rp is None else rp
  history = []
  for i in range(num_steps):
    state, metrics = step(state, make_prompts(seed0 + i, b), rp, policy_params())[:2]
    history.append(metrics)
  history = jax.device_get(history)
  return state, {k: np.array([h[k] for h in history]) for k in history[0]}


# ----------------------------------------------------------------------------- rollout
def test_token_frequency_matches_numpy_and_ignores_prompt_and_padding():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB, size=(5, 9)).astype(np.int32)
  mask = rng.random((5, 9)) < 0.8
  got = jax.jit(functools.partial(rollout_lib.token_frequency, token_id=4, prompt_len=3))(
    tokens, mask
  )
  resp = mask & (np.arange(9) >= 3)
  want = ((tokens == 4) & resp).sum(1) / np.maximum(resp.sum(1), 1)
  np.testing.assert_allclose(got, want, rtol=1e-6)


# One compilation for the rollout tests: temperature and example_offset are traced arguments.
ROLLOUT_JIT = jax.jit(
  functools.partial(
    rollout_lib.rollout,
    policy=POLICY_V,
    reward_fn=toy_reward,
    max_new_tokens=NEW,
    eos_id=2,
    kl_estimator="k3",
    value_head=True,
  )
)


def rollout(params, ref, rp, batch, key, *, temperature=1.0, offset=0):
  return ROLLOUT_JIT(
    params,
    ref,
    rp,
    batch["prompts"],
    batch["prompt_mask"],
    key,
    temperature=jnp.float32(temperature),
    example_offset=jnp.int32(offset),
  )


def ppo_params():
  return rl.init_value_head(policy_params(), jax.random.key(7), config=CFG)


def test_rollout_logprobs_and_tokens_equal_the_samplers_at_temperature_one():
  batch = make_prompts(0, b=8)
  keys = rollout_lib.example_keys(jax.random.key(3), 8)
  sample = jax.jit(functools.partial(POLICY.sample, max_new_tokens=NEW, temperature=1.0, eos_id=2))
  out = sample(policy_params(), batch["prompts"], batch["prompt_mask"], keys)
  ro = rollout(ppo_params(), policy_params(), reward_params(), batch, jax.random.key(3))
  np.testing.assert_array_equal(ro.tokens, out.tokens)
  np.testing.assert_array_equal(ro.response_mask, out.response_mask)
  assert not np.all(out.response_mask[:, PROMPT_LEN:]), "expected some EOS-terminated rows"
  np.testing.assert_allclose(ro.logprobs, out.logprobs, atol=2e-5)
  # Same policy as reference: every KL estimate is 0.
  np.testing.assert_allclose(ro.kl, 0.0, atol=1e-6)


def test_rollout_rows_depend_only_on_their_prompt_and_global_index():
  batch, other = make_prompts(1, b=8), make_prompts(2, b=8)
  key = jax.random.key(5)
  args = (ppo_params(), policy_params(), reward_params())
  full = rollout(*args, batch, key)
  # A "device" holding examples 4..7 (then others) at global offset 4 draws the same samples.
  shard = {k: np.concatenate([batch[k][4:], other[k][:4]]) for k in batch}
  half = rollout(*args, shard, key, offset=4)
  np.testing.assert_array_equal(half.tokens[:4], full.tokens[4:])
  np.testing.assert_allclose(half.scores[:4], full.scores[4:], rtol=1e-6)
  # Without the offset, the same prompts get other samples.
  moved = rollout(*args, shard, key)
  assert not np.array_equal(moved.tokens[:4], full.tokens[4:])


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_rollout_kl_values_and_scores_match_numpy():
  temperature, estimator = 0.7, "k3"
  params = ppo_params()
  # A value head with non-zero weights, to check the alignment of the values.
  params["params"]["value_head"] = jax.tree.map(
    lambda x: jax.random.normal(jax.random.key(2), x.shape), params["params"]["value_head"]
  )
  ref = policy_params(9)
  batch = make_prompts(2, b=6)
  ro = rollout(params, ref, reward_params(0.5), batch, jax.random.key(4), temperature=temperature)
  tokens, mask, resp = map(np.asarray, (ro.tokens, ro.mask, ro.response_mask))
  logits, values = jax.jit(PolicyModel(CFG, value_head=True).apply)(params, tokens, mask)
  ref_logits, _ = jax.jit(PolicyModel(CFG).apply)(ref, tokens, mask)
  pick = lambda lg: np.take_along_axis(
    np_log_softmax(np.asarray(lg)[:, :-1] / temperature), tokens[:, 1:, None], -1
  )[..., 0]
  logp = np.where(resp[:, 1:], pick(logits), 0.0)
  ref_logp = np.where(resp[:, 1:], pick(ref_logits), 0.0)
  log_rho = ref_logp - logp
  kl = {"k1": -log_rho, "k2": 0.5 * log_rho**2, "k3": np.expm1(log_rho) - log_rho}[estimator]
  np.testing.assert_allclose(ro.logprobs[:, 1:], logp, atol=1e-5)
  np.testing.assert_allclose(ro.ref_logprobs[:, 1:], ref_logp, atol=1e-5)
  np.testing.assert_allclose(ro.kl[:, 1:], np.where(resp[:, 1:], kl, 0.0), atol=1e-5)
  np.testing.assert_allclose(
    ro.values[:, 1:], np.where(resp[:, 1:], values[:, :-1], 0.0), atol=1e-5
  )
  want_scores = ((tokens == TARGET_TOKEN) & resp).sum(1) / resp.sum(1) + 0.5
  np.testing.assert_allclose(ro.scores, want_scores, rtol=1e-6)


# ----------------------------------------------------------------------------- targets
def fake_rollout(seed, b=6, s=8, prompt=2, values=True):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, s - prompt + 1, size=b)
  pos = np.arange(s)[None, :]
  resp = (pos >= prompt) & (pos < prompt + lengths[:, None])
  f = lambda: np.where(resp, rng.normal(size=(b, s)), 0.0).astype(np.float32)
  return rollout_lib.Rollout(
    tokens=np.zeros((b, s), np.int32),
    mask=resp | (pos < prompt),
    response_mask=resp,
    logprobs=f(),
    ref_logprobs=f(),
    entropy=f(),
    values=f() if values else None,
    kl=np.abs(f()),
    scores=rng.normal(size=b).astype(np.float32),
  )


def np_token_rewards(ro, beta):
  resp = np.asarray(ro.response_mask)
  r = np.where(resp, -beta * np.asarray(ro.kl, np.float64), 0.0)
  for i in range(r.shape[0]):
    r[i, np.nonzero(resp[i])[0][-1]] += ro.scores[i]
  return r


def np_discounted(r, v, resp, gamma, lam):
  adv = np.zeros_like(r)
  for i in range(r.shape[0]):
    a_next = v_next = 0.0
    for t in np.nonzero(resp[i])[0][::-1]:
      a_next = r[i, t] + gamma * v_next - v[i, t] + gamma * lam * a_next
      adv[i, t], v_next = a_next, v[i, t]
  return adv


@pytest.mark.parametrize("whiten", [True, False])
def test_ppo_targets_match_numpy_gae_with_kl_penalised_rewards(whiten):
  ro = fake_rollout(0)
  config = ppo_config(gamma=0.9, lam=0.8, whiten_advantages=whiten)
  adv, ret, rew = jax.jit(functools.partial(rl.ppo_targets, config=config))(ro, kl_coef=0.3)
  resp = np.asarray(ro.response_mask)
  r = np_token_rewards(ro, 0.3)
  v = np.asarray(ro.values, np.float64)
  want_adv = np_discounted(r, v, resp, 0.9, 0.8)
  want_ret = np.where(resp, want_adv + v, 0.0)
  if whiten:
    x = want_adv[resp]
    want_adv = np.where(resp, (want_adv - x.mean()) / np.sqrt(x.var() + 1e-8), 0.0)
  np.testing.assert_allclose(rew, r, atol=1e-6)
  np.testing.assert_allclose(adv, want_adv, atol=1e-5)
  np.testing.assert_allclose(ret, want_ret, atol=1e-5)


@pytest.mark.parametrize("baseline", ["moving_average", "batch", "none"])
def test_reinforce_targets_match_numpy_returns_minus_baseline(baseline):
  ro = fake_rollout(1, values=False)
  config = ppo_config(gamma=0.95, baseline=baseline, baseline_decay=0.8)
  state = adv_lib.ReinforceBaselineState(value=jnp.float32(0.3), count=jnp.int32(2))
  adv, episode, used, new = jax.jit(functools.partial(rl.reinforce_targets, config=config))(
    ro, state, kl_coef=0.2
  )
  resp = np.asarray(ro.response_mask)
  r = np_token_rewards(ro, 0.2)
  returns = np_discounted(r, np.zeros_like(r), resp, 0.95, 1.0)
  want_episode = np.array([returns[i, np.nonzero(resp[i])[0][0]] for i in range(len(r))])
  want_used = {"moving_average": 0.3, "batch": want_episode.mean(), "none": 0.0}[baseline]
  np.testing.assert_allclose(episode, want_episode, atol=1e-5)
  np.testing.assert_allclose(used, want_used, atol=1e-5)
  np.testing.assert_allclose(adv, np.where(resp, returns - want_used, 0.0), atol=1e-5)
  if baseline == "moving_average":
    np.testing.assert_allclose(new.value, 0.8 * 0.3 + 0.2 * want_episode.mean(), atol=1e-6)
    assert int(new.count) == 3
  else:
    np.testing.assert_allclose(new.value, 0.3)


def test_rloo_targets_are_leave_one_out_sequence_rewards_broadcast_over_the_response():
  ro = fake_rollout(2, b=6, values=False)
  config = ppo_config(num_samples=3)
  adv, reward = jax.jit(functools.partial(rl.rloo_targets, config=config))(ro, kl_coef=0.5)
  resp = np.asarray(ro.response_mask)
  want_r = ro.scores - 0.5 * np.where(resp, ro.kl, 0).sum(1)
  g = want_r.reshape(2, 3)
  want = (g - (g.sum(1, keepdims=True) - g) / 2).reshape(-1)
  np.testing.assert_allclose(reward, want_r, atol=1e-6)
  np.testing.assert_allclose(adv, np.where(resp, want[:, None], 0.0), atol=1e-5)


@pytest.mark.parametrize("grpo_kl", ["loss", "reward"])
def test_grpo_targets_are_group_normalised_and_kl_enters_the_reward_only_in_reward_mode(grpo_kl):
  ro = fake_rollout(3, b=8, values=False)
  config = ppo_config(num_samples=4, grpo_kl=grpo_kl)
  adv, reward = jax.jit(functools.partial(rl.grpo_targets, config=config))(ro, kl_coef=0.5)
  resp = np.asarray(ro.response_mask)
  want_r = np.asarray(ro.scores, np.float64)
  if grpo_kl == "reward":
    want_r = want_r - 0.5 * np.where(resp, ro.kl, 0).sum(1)
  g = want_r.reshape(2, 4)
  want = ((g - g.mean(1, keepdims=True)) / (g.std(1, keepdims=True) + 1e-6)).reshape(-1)
  np.testing.assert_allclose(reward, want_r, atol=1e-6)
  np.testing.assert_allclose(adv, np.where(resp, want[:, None], 0.0), atol=1e-4)


def test_minibatch_split_uses_every_example_once_and_does_not_depend_on_sharding():
  key = jax.random.key(0)
  full = np.asarray(rl.minibatch_indices(key, 16, 4))
  assert full.shape == (4, 4)
  np.testing.assert_array_equal(np.sort(full.ravel()), np.arange(16))
  # Each minibatch takes one example of each block of 4 consecutive examples.
  np.testing.assert_array_equal(np.sort(full // 4, axis=1), np.tile(np.arange(4), (4, 1)))
  # Two "devices" with 8 examples each hold exactly their half of every global minibatch.
  shards = [np.asarray(rl.minibatch_indices(key, 8, 4, offset=o)) + o for o in (0, 8)]
  for j in range(4):
    np.testing.assert_array_equal(np.sort(np.concatenate([s[j] for s in shards])), np.sort(full[j]))
  # Different epochs (keys) give different splits.
  assert not np.array_equal(full, np.asarray(rl.minibatch_indices(jax.random.key(1), 16, 4)))


# ----------------------------------------------------------------------------- steps
# Seeds (stacked states and reward params) in one program, as the studies run them.
PPO_VMAP = jax.jit(jax.vmap(PPO_STEP, in_axes=(0, None, 0, None)))


def stack(*trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree, i):
  return jax.tree.map(lambda x: x[i], tree)


def test_ppo_raises_token_frequency_reward_and_a_larger_kl_coef_ends_at_a_smaller_kl():
  steps, betas = 60, (0.01, 0.3)
  t0 = time.perf_counter()
  state = stack(*[ppo_state(b) for b in betas])  # same params and key, two coefficients
  rp = stack(reward_params(), reward_params())
  hist = []
  for i in range(steps):
    state, metrics, _ = PPO_VMAP(state, make_prompts(100 + i), rp, policy_params())
    hist.append(metrics)
  hist = {k: np.stack([h[k] for h in jax.device_get(hist)]) for k in hist[0]}  # [steps, 2]
  seconds = time.perf_counter() - t0
  np.testing.assert_array_equal(state.step, [steps, steps])
  np.testing.assert_array_equal(state.num_skipped, [0, 0])
  np.testing.assert_allclose(state.kl.kl_coef, betas, rtol=1e-6)  # fixed coefficients
  # Step 0 samples from the initial policy (same key and prompts for both coefficients).
  start = hist["score"][0, 0]
  assert start == hist["score"][0, 1]
  end = hist["score"][-20:].mean(0)
  kl = hist["kl_k1"][-20:].mean(0)
  print(
    f"\nPPO toy reward: start {start:.3f}, end {end} and final KL {kl} for kl_coef "
    f"{betas}, {steps} steps, {seconds:.1f}s (incl. compile)"
  )
  assert start < 0.1
  assert end[0] > start + 0.5
  assert kl[1] < 0.2 * kl[0]
  assert end[1] > start  # still optimises, just less far


def test_vmapped_step_over_seeds_matches_the_step_of_each_seed():
  states = [ppo_state(0.05, seed=s) for s in (1, 2)]
  rps = [reward_params(), {"token": jnp.int32(6), "offset": jnp.float32(0.0)}]
  batch = make_prompts(3)
  vstate, vmetrics, vrollout = PPO_VMAP(stack(*states), batch, stack(*rps), policy_params())
  for i in range(2):
    state, metrics, rollout = PPO_JIT(states[i], batch, rps[i], policy_params())
    np.testing.assert_array_equal(vrollout["tokens"][i], rollout["tokens"])
    np.testing.assert_allclose(vmetrics["score"][i], metrics["score"], rtol=1e-6)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
      unstack(vstate.params, i),
      state.params,
    )
  assert not np.array_equal(vrollout["tokens"][0], vrollout["tokens"][1])  # seeds differ


def test_nan_reward_is_skipped_counted_and_never_reaches_the_params():
  # Seed 0 gets a NaN reward, seed 1 a finite one, in the same vmapped step.
  state = stack(ppo_state(0.05), ppo_state(0.05))
  before = jax.device_get(state.params), jax.device_get(state.opt_state)
  rp = stack(reward_params(np.nan), reward_params())
  state, metrics, _ = PPO_VMAP(state, make_prompts(0), rp, policy_params())
  np.testing.assert_array_equal(metrics["nonfinite"], [True, False])
  updates = PPO_CONFIG.num_epochs * PPO_CONFIG.num_minibatches
  np.testing.assert_array_equal(state.num_skipped, [updates, 0])
  np.testing.assert_array_equal(state.step, [1, 1])
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(a[0], b[0]),
    jax.device_get((state.params, state.opt_state)),
    before,
  )
  lm_bias = lambda p: np.asarray(p["params"]["lm_head"]["bias"])
  assert not np.array_equal(lm_bias(state.params)[1], lm_bias(before[0])[1])
  # A finite batch afterwards trains the skipped seed normally.
  state, metrics, _ = PPO_VMAP(
    state, make_prompts(1), stack(reward_params(), reward_params()), policy_params()
  )
  assert not metrics["nonfinite"].any()
  np.testing.assert_array_equal(state.num_skipped, [updates, 0])
  assert not np.array_equal(lm_bias(state.params)[0], lm_bias(before[0])[0])


@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_parallel_ppo_step_matches_single_device_step_on_the_global_batch(mode):
  pstep = parallel.make_parallel_step(rl.with_frozen_params(PPO_STEP), mode=mode)
  assert pstep.num_devices == 8
  state = ppo_state(0.05)
  ref_state = state
  carry = pstep.put_state((state, reward_params(), policy_params()))
  for i in range(2):
    batch = make_prompts(10 + i)
    ref_state, ref_metrics, ref_rollout = PPO_JIT(
      ref_state, batch, reward_params(), policy_params()
    )
    carry, metrics, rollout = pstep(carry, pstep.shard_batch(batch))
    metrics, rollout = pstep.unreplicate((metrics, rollout))
    if i == 0:
      np.testing.assert_array_equal(rollout["tokens"], ref_rollout["tokens"])
    for k in ("score", "kl_k1", "entropy", "loss", "clip_fraction", "value_loss"):
      np.testing.assert_allclose(metrics[k], ref_metrics[k], atol=1e-5, err_msg=k)
  got = jax.device_get(pstep.unreplicate(carry)[0])
  want = jax.device_get(ref_state)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), got.params, want.params)
  assert int(got.step) == 2


def test_reinforce_improves_toy_reward_adapts_kl_coef_and_raise_mode_keeps_the_state():
  config = ppo_config(baseline="moving_average", target_kl=0.2, kl_horizon=200.0, nonfinite="raise")
  opt = optax.adam(1e-2)
  step = jax.jit(
    functools.partial(
      rl.reinforce_step, policy=POLICY, config=config, reward_fn=toy_reward, optimizer=opt
    )
  )
  state = rl.create_rl_state(policy_params(), opt, jax.random.key(3), kl_coef=0.01)
  state, hist = run(step, state, 60)
  assert hist["score"][-10:].mean() > hist["score"][:5].mean() + 0.1
  # kl_coef[i + 1] = kl_coef[i] * (1 + clip(KL_i / target - 1, -0.2, 0.2) * n / horizon).
  error = np.clip(hist["kl_k1"][:-1] / 0.2 - 1.0, -0.2, 0.2)
  np.testing.assert_allclose(
    hist["kl_coef"][1:], hist["kl_coef"][:-1] * (1 + error * BATCH / 200.0), rtol=1e-5
  )
  assert hist["kl_k1"][-10:].mean() > 0.2 and float(state.kl.kl_coef) > 0.01
  assert int(state.baseline.count) == 60 and not hist["nonfinite"].any()
  # nonfinite='raise': a NaN reward returns the input state unchanged (step included).
  before = jax.device_get(state._replace(key=jax.random.key_data(state.key)))
  after, metrics = step(state, make_prompts(0), reward_params(np.nan), policy_params())
  assert bool(metrics["nonfinite"])
  after = jax.device_get(after._replace(key=jax.random.key_data(after.key)))
  jax.tree.map(np.testing.assert_array_equal, after, before)


@pytest.mark.parametrize("algo", ["rloo", "grpo"])
def test_group_algorithms_improve_toy_reward(algo):
  config = ppo_config(num_samples=4, num_epochs=2, num_minibatches=2, kl_estimator="k3")
  opt = optax.adam(1e-2)
  step = jax.jit(
    rl.make_step(algo, policy=POLICY, config=config, reward_fn=toy_reward, optimizer=opt)
  )
  state = rl.create_rl_state(policy_params(), opt, jax.random.key(4), kl_coef=0.01)
  state, hist = run(step, state, 40, b=8)
  assert hist["score"][-10:].mean() > hist["score"][:5].mean() + 0.1
  assert int(state.num_skipped) == 0


# ----------------------------------------------------------------------------- errors
def test_bad_config_values_raise_naming_the_field():
  with pytest.raises(ValueError, match="RLConfig.kl_estimator"):
    ppo_config(kl_estimator="k4")
  with pytest.raises(ValueError, match="RLConfig.num_samples"):
    ppo_config(num_samples=1)
  with pytest.raises(ValueError, match="RLConfig.temperature"):
    ppo_config(temperature=0.0)
  with pytest.raises(ValueError, match="RLConfig.baseline"):
    ppo_config(baseline="ema")
  with pytest.raises(ValueError, match="algo must be one of"):
    rl.get_step("dpo")
  for bad in (-1.0, np.float32(-1.0), jnp.array(-1.0)):
    with pytest.raises(ValueError, match="kl_coef must be >= 0"):
      rl.create_rl_state(policy_params(), OPT, jax.random.key(0), kl_coef=bad)
  with pytest.raises(ValueError, match="RLConfig.num_epochs must be an int"):
    ppo_config(num_epochs=2.0)
  config = ppo_config(max_new_tokens=np.int64(3), num_samples=np.int32(2))  # e.g. from a sweep
  assert type(config.max_new_tokens) is int and type(config.num_samples) is int


def test_a_finite_score_that_overflows_the_running_statistics_is_a_skipped_step():
  # one score of 3e19 is finite, but its square overflows the running variance: the step is
  # refused and no side state (reward statistics, baseline) keeps an infinity
  config = rl.RLConfig(
    max_new_tokens=NEW, eos_id=None, num_epochs=1, reward_norm="running", baseline="moving_average"
  )

  def reward(params, tokens, mask):
    return toy_reward(params, tokens, mask).at[0].add(params["row0"])

  step = jax.jit(
    rl.make_step("reinforce", policy=POLICY, config=config, reward_fn=reward, optimizer=OPT)
  )
  state = rl.create_rl_state(policy_params(), OPT, jax.random.key(0), kl_coef=0.05)
  rp = dict(reward_params(), row0=jnp.float32(0.0))
  state, _ = step(state, make_prompts(0, b=8), rp, policy_params())
  after, metrics = step(
    state, make_prompts(1, b=8), dict(rp, row0=jnp.float32(3e19)), policy_params()
  )
  assert bool(metrics["nonfinite"]) and int(after.num_skipped) == 1
  for old, new in ((state.reward_stats, after.reward_stats), (state.baseline, after.baseline)):
    jax.tree.map(np.testing.assert_array_equal, old, new)
  jax.tree.map(np.testing.assert_array_equal, state.params, after.params)


def test_prompts_padded_on_the_right_are_refused_outside_jit():
  # sampling after the padding would put the response's first tokens behind pad tokens
  right = np.array([[1, 1, 0], [1, 1, 1]], bool)
  with pytest.raises(ValueError, match=r"prompt_mask \(shape \(2, 3\)\) must be left-padded"):
    rollout_lib.check_prompts(np.ones((2, 3), np.int32), right, max_len=16, max_new_tokens=2)
  rollout_lib.check_prompts(np.ones((2, 3), np.int32), right[:, ::-1], max_len=16, max_new_tokens=2)


def eval_step(step, state, batch, rp=None):
  return jax.eval_shape(step, state, batch, reward_params() if rp is None else rp, policy_params())


def test_bad_step_inputs_raise_clear_errors():
  state = ppo_state(0.1)
  batch = make_prompts(0)
  with pytest.raises(ValueError, match="'prompts' and 'prompt_mask'"):
    eval_step(PPO_STEP, state, {"prompts": batch["prompts"]})
  with pytest.raises(ValueError, match="prompts must have shape"):
    eval_step(
      PPO_STEP, state, {"prompts": batch["prompts"][0], "prompt_mask": batch["prompt_mask"][0]}
    )
  with pytest.raises(ValueError, match="prompt_mask must have the shape"):
    eval_step(
      PPO_STEP, state, {"prompts": batch["prompts"], "prompt_mask": batch["prompt_mask"][:, 1:]}
    )
  long = {"prompts": np.ones((4, 5), np.int32), "prompt_mask": np.ones((4, 5), bool)}
  with pytest.raises(ValueError, match="exceeds the policy's max_len"):
    eval_step(PPO_STEP, state, long)
  with pytest.raises(ValueError, match="divisible by num_minibatches"):
    eval_step(PPO_STEP, state, make_prompts(0, b=5))
  bad_reward = functools.partial(
    rl.ppo_step,
    policy=POLICY_V,
    config=PPO_CONFIG,
    optimizer=OPT,
    reward_fn=lambda p, t, m: toy_reward(p, t, m)[:, None],
  )
  with pytest.raises(ValueError, match="reward_fn must return rewards of shape"):
    eval_step(bad_reward, state, batch)
  no_head = rl.create_rl_state(policy_params(), OPT, jax.random.key(0), kl_coef=0.1)
  with pytest.raises(ValueError, match="value head"):
    eval_step(PPO_STEP, no_head, batch)


# ----------------------------------------------------------------------------- model-agnostic
class BigramLM(nn.Module):
  """A policy that is not jaxrm's: token embedding -> tanh MLP -> logits and a value."""

  vocab: int

  @nn.compact
  def __call__(self, tokens, mask):
    del mask  # each position sees only its own token
    h = jnp.tanh(nn.Dense(16)(nn.Embed(self.vocab, 16)(tokens)))
    values = nn.Dense(1, kernel_init=nn.initializers.zeros)(h)[..., 0]
    return nn.Dense(self.vocab)(h), values


def test_ppo_trains_a_non_jaxrm_flax_policy_with_the_generic_sampler():
  model = BigramLM(VOCAB)
  policy = apply_fn_policy(model.apply, vocab_size=VOCAB)
  dummy = jnp.zeros((1, PROMPT_LEN + NEW), jnp.int32)
  params = model.init(jax.random.key(0), dummy, jnp.ones(dummy.shape, bool))
  opt = optax.adam(1e-2)
  config = ppo_config(num_epochs=2, num_minibatches=2)
  step = jax.jit(
    rl.make_step("ppo", policy=policy, config=config, reward_fn=toy_reward, optimizer=opt)
  )
  state = rl.create_rl_state(params, opt, jax.random.key(2), kl_coef=0.01)
  hist = []
  for i in range(40):
    state, metrics = step(state, make_prompts(200 + i, b=16), reward_params(), params)
    hist.append(metrics)
  score = np.array([float(m["score"]) for m in jax.device_get(hist)])
  print(f"\nnon-jaxrm policy PPO: score {score[:5].mean():.3f} -> {score[-5:].mean():.3f}")
  assert score[:5].mean() < 0.25
  assert score[-5:].mean() > score[:5].mean() + 0.3
  assert int(state.num_skipped) == 0


def test_generic_sampler_policy_steps_like_transformer_policy():
  """apply_fn_policy over PolicyModel.apply (full-forward sampler) draws the same samples as
  transformer_policy (KV cache) and makes the same PPO update, up to float rounding."""
  generic = apply_fn_policy(
    PolicyModel(CFG, value_head=True).apply, vocab_size=VOCAB, max_len=CFG.max_len
  )
  step = jax.jit(
    functools.partial(
      rl.ppo_step,
      policy=generic,
      config=PPO_CONFIG,
      reward_fn=toy_reward,
      optimizer=OPT,
      return_rollout=True,
    )
  )
  batch = make_prompts(12)
  got, got_metrics, got_ro = step(ppo_state(0.05), batch, reward_params(), ppo_params())
  want, want_metrics, want_ro = PPO_JIT(ppo_state(0.05), batch, reward_params(), ppo_params())
  np.testing.assert_array_equal(got_ro["tokens"], want_ro["tokens"])
  for k in ("score", "kl_k1", "loss", "value_loss"):
    np.testing.assert_allclose(got_metrics[k], want_metrics[k], atol=1e-5, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), got.params, want.params)


def test_eos_id_outside_the_policys_vocabulary_raises_naming_it():
  config = ppo_config(eos_id=VOCAB)
  step = functools.partial(
    rl.ppo_step, policy=POLICY_V, config=config, reward_fn=toy_reward, optimizer=OPT
  )
  with pytest.raises(ValueError, match=r"eos_id must be None or in \[0, vocab_size=8\)"):
    eval_step(step, ppo_state(0.1), make_prompts(0))
  with pytest.raises(ValueError, match="policy must be a PolicyFns"):
    rl.make_step("ppo", policy=CFG, config=config, reward_fn=toy_reward, optimizer=OPT)


def test_transformer_policy_ppo_reproduces_the_numbers_of_the_model_specific_steps():
  """Two PPO steps as run before the steps took PolicyFns (values recorded from commit
  5b3ef7f, whose steps built PolicyModel from RLConfig.policy; bitwise equal on CPU)."""
  state = ppo_state(0.05)
  for i in range(2):
    state, metrics, ro = PPO_JIT(state, make_prompts(10 + i), reward_params(), policy_params())
  metrics = jax.device_get(metrics)
  params = jax.tree.leaves(jax.device_get(state.params))
  assert int(np.asarray(ro["tokens"]).sum()) == 915
  np.testing.assert_allclose(metrics["score"], 0.078125, rtol=1e-6)
  np.testing.assert_allclose(metrics["kl_k1"], 1.2911161184310913, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], -0.0048882076516747475, rtol=1e-4)
  np.testing.assert_allclose(metrics["value_loss"], 0.004922034218907356, rtol=1e-4)
  abs_sum = sum(np.abs(np.asarray(x, np.float64)).sum() for x in params)
  np.testing.assert_allclose(abs_sum, 598.6132519002422, rtol=1e-6)


# ----------------------------------------------------------------------------- variants
def test_shape_scores_applies_the_missing_eos_penalty_then_the_reward_normalisation():
  ro = fake_rollout(5, b=6, values=False)
  tokens = np.zeros(ro.tokens.shape, np.int32)
  last = np.array([np.nonzero(r)[0][-1] for r in ro.response_mask])
  has_eos = np.array([True, False, True, False, False, True])
  tokens[np.arange(6)[has_eos], last[has_eos]] = 2
  ro = ro._replace(tokens=tokens)
  raw = np.asarray(ro.scores, np.float64)
  penalised = raw - np.where(has_eos, 0.0, 1.5)
  stats0 = running_stats.running_moments_init()
  for norm in ("none", "whiten", "running"):
    config = ppo_config(eos_id=2, missing_eos_penalty=1.5, reward_norm=norm)
    scores, stats = jax.jit(functools.partial(rl.shape_scores, config=config))(ro, stats0)
    if norm == "none":
      want = penalised
    else:
      want = (penalised - penalised.mean()) / np.sqrt(penalised.var() + 1e-8)
    np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-6, err_msg=norm)
    if norm == "running":
      np.testing.assert_allclose(stats.count, 6)
      np.testing.assert_allclose(stats.mean, penalised.mean(), rtol=1e-5)
      # A second batch is normalised with the statistics of both.
      scores2, stats2 = rl.shape_scores(ro._replace(scores=ro.scores + 1.0), stats, config=config)
      both = np.concatenate([penalised, penalised + 1.0])
      np.testing.assert_allclose(
        scores2, (penalised + 1.0 - both.mean()) / np.sqrt(both.var() + 1e-8), rtol=1e-5
      )
    else:
      assert float(stats.count) == 0.0


GRPO_VARIANTS = dict(
  num_samples=4,
  kl_estimator="k3",
  grpo_scale="batch",
  reward_norm="running",
  aggregation="constant_length",
  ratio_level="sequence",
  clip_eps=0.05,
  clip_eps_high=0.08,
  dual_clip=3.0,
)


def test_grpo_with_the_variants_learns_and_keeps_running_reward_statistics():
  config = ppo_config(**GRPO_VARIANTS)
  opt = optax.adam(1e-2)
  step = jax.jit(
    rl.make_step("grpo", policy=POLICY, config=config, reward_fn=toy_reward, optimizer=opt)
  )
  state = rl.create_rl_state(policy_params(), opt, jax.random.key(4), kl_coef=0.01)
  state, hist = run(step, state, 40, b=8)
  print(
    f"\nGRPO variants: score {hist['score'][:5].mean():.3f} -> {hist['score'][-10:].mean():.3f}"
  )
  assert hist["score"][-10:].mean() > hist["score"][:5].mean() + 0.1
  np.testing.assert_allclose(state.reward_stats.count, 40 * 8 * 4)
  np.testing.assert_allclose(state.reward_stats.mean, hist["score"].mean(), rtol=1e-4)
  assert int(state.num_skipped) == 0


def test_parallel_grpo_variants_match_the_single_device_step():
  """Batch-scaled advantages, running reward statistics and the constant-length normaliser
  take global statistics, so 8 devices give the single-device result."""
  config = ppo_config(**GRPO_VARIANTS)
  step = rl.make_step(
    "grpo", policy=POLICY, config=config, reward_fn=toy_reward, optimizer=OPT, return_rollout=True
  )
  state = rl.create_rl_state(policy_params(), OPT, jax.random.key(5), kl_coef=0.05)
  pstep = parallel.make_parallel_step(rl.with_frozen_params(step), mode="shard_map")
  carry = pstep.put_state((state, reward_params(), policy_params()))
  jstep = jax.jit(step)
  for i in range(2):
    batch = make_prompts(20 + i, b=8)
    state, want, want_ro = jstep(state, batch, reward_params(), policy_params())
    carry, got, got_ro = pstep(carry, pstep.shard_batch(batch))
    got, got_ro = pstep.unreplicate((got, got_ro))
    np.testing.assert_array_equal(got_ro["tokens"], want_ro["tokens"])
    for k in ("score", "shaped_score", "loss", "clip_fraction", "kl_loss"):
      np.testing.assert_allclose(got[k], want[k], atol=1e-5, err_msg=k)
  got_state = jax.device_get(pstep.unreplicate(carry)[0])
  for a, b in zip(got_state.reward_stats, jax.device_get(state.reward_stats)):
    np.testing.assert_allclose(a, b, rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), got_state.params, state.params
  )


def test_bad_variant_settings_raise_naming_the_field():
  with pytest.raises(ValueError, match="RLConfig.missing_eos_penalty must be None when eos_id"):
    ppo_config(eos_id=None, missing_eos_penalty=1.0)
  with pytest.raises(ValueError, match="RLConfig.dual_clip must be None or > 1"):
    ppo_config(dual_clip=1.0)
  with pytest.raises(ValueError, match="RLConfig.reward_norm must be one of"):
    ppo_config(reward_norm="batch")
  with pytest.raises(ValueError, match="RLConfig.grpo_scale must be one of"):
    ppo_config(grpo_scale="global")
  assert ppo_config(grpo_scale=False).grpo_scale == "none"
