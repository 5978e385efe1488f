"""Tests for jaxrm.steps.dpo: the DPO-family step, reference log-probs, the implicit reward."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrm.math import best_of_n
from jaxrm.math import dpo as dpo_lib
from jaxrm.models.policy import PolicyModel
from jaxrm.models.transformer import TransformerConfig
from jaxrm.steps import dpo, parallel, rm_step
from jaxrm.steps import train_state as ts

VOCAB, PROMPT, SEQ, TARGET = 8, 3, 8, 5
CFG = TransformerConfig(vocab_size=VOCAB, num_layers=1, width=16, num_heads=2, max_len=SEQ)
MODEL = PolicyModel(CFG)
APPLY = MODEL.apply
OPT = optax.adam(1e-2, eps=1e-5)


@functools.cache
def init_params(seed=0):
  dummy = jnp.zeros((1, SEQ), jnp.int32)
  return jax.jit(MODEL.init)(jax.random.key(seed), dummy, jnp.ones(dummy.shape, bool))


def sequences(rng, b):
  """Left-padded prompts of 1..3 tokens followed by a 5-token response; response mask."""
  lengths = rng.integers(1, PROMPT + 1, size=b)
  prompt_mask = np.arange(PROMPT)[None, :] >= (PROMPT - lengths)[:, None]
  mask = np.concatenate([prompt_mask, np.ones((b, SEQ - PROMPT), bool)], axis=1)
  tokens = np.where(mask, rng.integers(3, VOCAB, size=(b, SEQ)), 0).astype(np.int32)
  response = mask & (np.arange(SEQ) >= PROMPT)[None, :]
  return tokens, mask, response


def hits(tokens, response):
  return ((tokens == TARGET) & response).sum(1)


# The test batches' reference log-probs, compiled once per batch shape (eager code compiles
# every operation on its own).
_with_reference = jax.jit(functools.partial(dpo.add_reference_logps, apply_fn=APPLY))
_with_reference_kto = jax.jit(
  functools.partial(dpo.add_reference_logps, apply_fn=APPLY, loss="kto")
)


def paired_batch(seed, b=16, ref=None):
  """Pairs whose chosen response holds more TARGET tokens (ties: either order)."""
  rng = np.random.default_rng(seed)
  ta, ma, ra = sequences(rng, b)
  tb, mb, rb = sequences(rng, b)
  tb[:, :PROMPT], mb[:, :PROMPT] = ta[:, :PROMPT], ma[:, :PROMPT]  # same prompt
  swap = (hits(tb, rb) > hits(ta, ra))[:, None]
  batch = {
    "chosen": np.where(swap, tb, ta),
    "chosen_mask": np.where(swap, mb, ma),
    "chosen_response_mask": np.where(swap, rb, ra),
    "rejected": np.where(swap, ta, tb),
    "rejected_mask": np.where(swap, ma, mb),
    "rejected_response_mask": np.where(swap, ra, rb),
  }
  return _with_reference(batch, init_params() if ref is None else ref)


def kto_batch(seed, b=16):
  rng = np.random.default_rng(seed)
  tokens, mask, response = sequences(rng, b)
  batch = {
    "tokens": tokens,
    "mask": mask,
    "response_mask": response,
    "desirable": hits(tokens, response) >= 1,
    **dpo.mismatched_completions(tokens, mask, prompt_len=PROMPT),
  }
  return _with_reference_kto(batch, init_params())


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_sequence_logps(params, tokens, mask, response):
  logits, _ = jax.jit(APPLY)(params, tokens, mask)
  logp = np.take_along_axis(np_log_softmax(logits)[:, :-1], tokens[:, 1:, None], -1)[..., 0]
  return np.where(response[:, 1:], logp, 0.0).sum(1)


def test_sequence_logps_and_reference_logps_match_numpy():
  batch = paired_batch(0, b=6)
  want = np_sequence_logps(
    init_params(), batch["chosen"], batch["chosen_mask"], batch["chosen_response_mask"]
  )
  got = dpo.sequence_logps(
    APPLY, init_params(), batch["chosen"], batch["chosen_mask"], batch["chosen_response_mask"]
  )
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(batch["ref_chosen_logps"], want, rtol=1e-5)


@pytest.mark.parametrize("microbatch_size", [None, 2])
@pytest.mark.parametrize("loss", ["dpo", "ipo", "simpo"])
def test_step_loss_is_the_math_loss_of_the_policy_sequence_logps(loss, microbatch_size):
  config = dpo.DPOConfig(loss=loss, beta=0.5, label_smoothing=0.1, gamma=0.3)
  params = init_params(1)  # policy != reference
  batch = paired_batch(1, b=8)
  state = ts.create_train_state(params, OPT, jax.random.key(0))
  step = functools.partial(
    dpo.dpo_step, apply_fn=APPLY, config=config, optimizer=OPT, microbatch_size=microbatch_size
  )
  _, metrics = jax.jit(step)(state, batch)
  lc = np_sequence_logps(
    params, batch["chosen"], batch["chosen_mask"], batch["chosen_response_mask"]
  )
  lr = np_sequence_logps(
    params, batch["rejected"], batch["rejected_mask"], batch["rejected_response_mask"]
  )
  rc, rr = (np.asarray(batch[k], np.float64) for k in ("ref_chosen_logps", "ref_rejected_logps"))
  nc, nr = batch["chosen_response_mask"].sum(1), batch["rejected_response_mask"].sum(1)
  log_sig = lambda x: -np.logaddexp(0.0, -x)
  if loss == "dpo":
    z = 0.5 * ((lc - rc) - (lr - rr))
    want = np.mean(-0.9 * log_sig(z) - 0.1 * log_sig(-z))
  elif loss == "ipo":
    want = np.mean(((lc - rc) - (lr - rr) - 1 / (2 * 0.5)) ** 2)
  else:
    z = 0.5 * (lc / nc - lr / nr) - 0.3
    want = np.mean(-0.9 * log_sig(z) - 0.1 * log_sig(-z))
  np.testing.assert_allclose(metrics["loss"], want, rtol=1e-4)


def test_dpo_starts_at_log_two_and_learns_the_preferences():
  config = dpo.DPOConfig(loss="dpo", beta=0.5)
  step = jax.jit(functools.partial(dpo.dpo_step, apply_fn=APPLY, config=config, optimizer=OPT))
  state = ts.create_train_state(init_params(), OPT, jax.random.key(0))
  history = []
  for i in range(30):
    state, metrics = step(state, paired_batch(100 + i))
    history.append(jax.device_get(metrics))
  np.testing.assert_allclose(history[0]["loss"], np.log(2.0), rtol=1e-5)  # policy == reference
  held_out = paired_batch(999, b=64)
  _, metrics = step(state, held_out)
  print(
    f"\nDPO: loss {history[0]['loss']:.3f} -> {history[-1]['loss']:.3f}, "
    f"held-out implicit-reward accuracy {metrics['accuracy']:.2f}"
  )
  assert np.mean([h["loss"] for h in history[-5:]]) < 0.6
  assert metrics["accuracy"] > 0.75
  assert int(state.num_skipped) == 0
  # Best-of-n against the implicit reward model: responses of the reference policy, ranked by
  # beta * log pi/pi_ref of the trained policy, gain gold (TARGET hits) as n grows.
  tokens, mask, response = sequences(np.random.default_rng(7), 256)
  proxy = dpo.implicit_reward_fn(APPLY, beta=0.5, prompt_len=PROMPT)(
    (state.params, init_params()), tokens, mask
  )
  gold = hits(tokens, response).astype(np.float32)
  expected_gold, _ = best_of_n.best_of_n_expected_reward(proxy, gold, np.array([1, 16]))
  print(
    f"best-of-n on the implicit reward: gold {expected_gold[0]:.2f} (n=1) -> "
    f"{expected_gold[1]:.2f} (n=16)"
  )
  assert expected_gold[1] > expected_gold[0] + 0.5


@pytest.mark.parametrize("microbatch_size", [None, 1])
@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_shard_map_step_matches_single_device_step(loss, microbatch_size):
  # microbatch_size=1: each device's two examples one at a time, against the whole batch.
  config = dpo.DPOConfig(loss=loss, beta=0.5)
  step_fn = functools.partial(dpo.dpo_step, apply_fn=APPLY, config=config, optimizer=OPT)
  sliced_fn = functools.partial(step_fn, microbatch_size=microbatch_size)
  make = paired_batch if loss == "dpo" else kto_batch
  batches = [make(10 + i) for i in range(2)]
  results = {}
  for mode, fn in (("jit", step_fn), ("shard_map", sliced_fn)):
    pstep = parallel.make_parallel_step(fn, mode=mode)
    state = pstep.put_state(ts.create_train_state(init_params(1), OPT, jax.random.key(0)))
    for batch in batches:
      state, metrics = pstep(state, pstep.shard_batch(batch))
    results[mode] = jax.device_get(pstep.unreplicate((state, metrics)))
  assert parallel.make_parallel_step(step_fn, mode="shard_map").num_devices == 8
  (want, want_m), (got, got_m) = results["jit"], results["shard_map"]
  for k in want_m:
    np.testing.assert_allclose(got_m[k], want_m[k], atol=1e-5, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), got.params, want.params)


@pytest.mark.parametrize("loss", ["dpo", "ipo", "simpo", "kto"])
def test_microbatched_step_gives_the_whole_batch_metrics_and_update(loss):
  """Four slices of 2 of 8 examples, three Adam steps: the same metrics (KTO's reference
  point and class means are the whole batch's) and parameters as the whole batch."""
  size = 2
  config = dpo.DPOConfig(loss=loss, beta=0.5, label_smoothing=0.1)
  step = functools.partial(dpo.dpo_step, apply_fn=APPLY, config=config, optimizer=OPT)
  make = kto_batch if loss == "kto" else paired_batch
  batches = [make(20 + i, b=8) for i in range(3)]
  results = []
  for fn in (jax.jit(step), jax.jit(functools.partial(step, microbatch_size=size))):
    state = ts.create_train_state(init_params(1), OPT, jax.random.key(0))
    history = []
    for batch in batches:
      state, metrics = fn(state, batch)
      history.append(jax.device_get(metrics))
    results.append((jax.device_get(state.params), history))
  (want, want_m), (got, got_m) = results
  for w, g in zip(want_m, got_m):
    assert set(g) == set(w)
    for k in w:
      np.testing.assert_allclose(g[k], w[k], rtol=1e-5, atol=1e-6, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), got, want)


@pytest.mark.parametrize("size", [3, 0, 2.0])
def test_microbatch_size_that_does_not_divide_the_batch_is_refused(size):
  state = ts.create_train_state(init_params(), OPT, jax.random.key(0))
  step = functools.partial(
    dpo.dpo_step, apply_fn=APPLY, config=dpo.DPOConfig(), optimizer=OPT, microbatch_size=size
  )
  with pytest.raises(
    ValueError, match="microbatch_size must be a positive int dividing the batch of 8 pairs"
  ):
    jax.eval_shape(step, state, paired_batch(0, b=8))


def test_nan_reference_logps_skip_the_update_and_never_reach_the_params():
  config = dpo.DPOConfig()
  step = jax.jit(functools.partial(dpo.dpo_step, apply_fn=APPLY, config=config, optimizer=OPT))
  state = ts.create_train_state(init_params(), OPT, jax.random.key(0))
  batch = paired_batch(3)
  batch["ref_chosen_logps"] = np.asarray(batch["ref_chosen_logps"]).copy()
  batch["ref_chosen_logps"][2] = np.nan
  new, metrics = step(state, batch)
  assert bool(metrics["nonfinite"]) and int(new.num_skipped) == 1
  jax.tree.map(
    np.testing.assert_array_equal, jax.device_get(new.params), jax.device_get(state.params)
  )


def test_implicit_reward_fn_is_beta_log_ratio_and_plugs_into_the_reward_model_eval_step():
  beta = 0.2
  policy, ref = init_params(1), init_params(0)
  batch = paired_batch(4, b=6)
  reward_fn = dpo.implicit_reward_fn(APPLY, beta=beta, prompt_len=PROMPT)
  got = jax.jit(reward_fn)((policy, ref), batch["chosen"], batch["chosen_mask"])
  args = (batch["chosen"], batch["chosen_mask"], batch["chosen_response_mask"])
  want = beta * (np_sequence_logps(policy, *args) - np_sequence_logps(ref, *args))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  # A reward model's evaluation step scores pairs with it unchanged.
  out = rm_step.reward_model_eval_step((policy, ref), batch, apply_fn=reward_fn)
  np.testing.assert_allclose(out["rewards_chosen"], want, rtol=1e-4, atol=1e-6)
  # Without prompt_len the prompt's log-ratio is added, the same for both responses of a pair.
  full = dpo.implicit_reward_fn(APPLY, beta=beta)
  out_full = rm_step.reward_model_eval_step((policy, ref), batch, apply_fn=full)
  np.testing.assert_allclose(
    out_full["rewards_chosen"] - out_full["rewards_rejected"],
    out["rewards_chosen"] - out["rewards_rejected"],
    atol=1e-5,
  )
  np.testing.assert_allclose(
    dpo_lib.implicit_reward(np.zeros(2), np.ones(2), beta=beta), [-beta, -beta], rtol=1e-6
  )


def test_mismatched_completions_pair_each_prompt_with_the_previous_response():
  rng = np.random.default_rng(5)
  tokens, mask, _ = sequences(rng, 4)
  out = dpo.mismatched_completions(tokens, mask, prompt_len=PROMPT)
  np.testing.assert_array_equal(out["kl_tokens"][:, :PROMPT], tokens[:, :PROMPT])
  np.testing.assert_array_equal(out["kl_tokens"][1:, PROMPT:], tokens[:-1, PROMPT:])
  np.testing.assert_array_equal(out["kl_tokens"][0, PROMPT:], tokens[-1, PROMPT:])
  assert not np.any(out["kl_response_mask"][:, :PROMPT])


def test_bad_config_and_batches_raise_naming_the_field():
  with pytest.raises(ValueError, match="DPOConfig.loss must be one of"):
    dpo.DPOConfig(loss="orpo")
  with pytest.raises(ValueError, match="DPOConfig.beta must be > 0"):
    dpo.DPOConfig(beta=0.0)
  with pytest.raises(ValueError, match=r"DPOConfig.label_smoothing must be in \[0, 0.5\]"):
    dpo.DPOConfig(label_smoothing=0.9)
  state = ts.create_train_state(init_params(), OPT, jax.random.key(0))
  step = functools.partial(dpo.dpo_step, apply_fn=APPLY, config=dpo.DPOConfig(), optimizer=OPT)
  batch = paired_batch(0, b=4)
  del batch["ref_rejected_logps"]
  with pytest.raises(ValueError, match=r"missing keys \['ref_rejected_logps'\]"):
    jax.eval_shape(step, state, batch)
  batch = paired_batch(0, b=4)
  batch["rejected_mask"] = batch["rejected_mask"][:, 1:]
  with pytest.raises(ValueError, match=r"batch\['rejected'\] and batch\['rejected_mask'\]"):
    jax.eval_shape(step, state, batch)
  with pytest.raises(ValueError, match="params must be the pair"):
    dpo.implicit_reward_fn(APPLY, beta=0.1)(init_params(), batch["chosen"], batch["chosen_mask"])
  batch = paired_batch(0, b=4)
  seq = batch["chosen"].shape[1]
  with pytest.raises(ValueError, match=f"prompt_len={seq} leaves no response tokens"):
    dpo.implicit_reward_fn(APPLY, beta=0.1, prompt_len=seq)(
      (init_params(), init_params()), batch["chosen"], batch["chosen_mask"]
    )
  with pytest.raises(ValueError, match="prompt_len must be None or a positive int, got 0"):
    dpo.implicit_reward_fn(APPLY, beta=0.1, prompt_len=0)
  # a response mask of the wrong shape is named (before it meets the sequence mask)
  batch["chosen_response_mask"] = batch["chosen_mask"][:, 1:]
  with pytest.raises(ValueError, match=r"batch\['chosen_response_mask'\] must have the shape"):
    jax.eval_shape(step, state, batch)
