"""Tests of jaxrm.steps.rl_diagnostics: the RL metrics (KL by estimator, exact KL, response
length, logged-only diagnostics such as gold) against a NumPy float64 recomputation from the
samples the step returns, and the data-parallel step against the single-device one."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrm.models.policy import PolicyModel, transformer_policy
from jaxrm.models.transformer import TransformerConfig
from jaxrm.steps import parallel, rl

VOCAB, PROMPT_LEN, NEW, EOS = 8, 3, 6, 2
CFG = TransformerConfig(
  vocab_size=VOCAB, num_layers=1, width=16, num_heads=2, max_len=PROMPT_LEN + NEW
)
POLICY = transformer_policy(CFG)
OPT = optax.adam(1e-3)
CONFIG = rl.RLConfig(max_new_tokens=NEW, eos_id=EOS, kl_estimator="k3", temperature=0.9)
GOLD_W = np.linspace(-1.0, 2.0, VOCAB).astype(np.float32)  # a stand-in "gold" reward


def proxy(params, tokens, mask):
  """The optimised reward: the fraction of response tokens equal to 5."""
  response = mask & (jnp.arange(tokens.shape[1]) >= PROMPT_LEN)[None, :]
  hits = jnp.sum(response & (tokens == 5), axis=1, dtype=jnp.float32)
  return hits / jnp.maximum(jnp.sum(response, axis=1), 1)


def gold_diagnostics(params, tokens, mask):
  """Logged only: a per-token score summed over the response, and a constant."""
  response = mask & (jnp.arange(tokens.shape[1]) >= PROMPT_LEN)[None, :]
  gold = jnp.sum(jnp.where(response, params["w"][tokens], 0.0), axis=1)
  return {"gold": gold, "two": jnp.full(tokens.shape[:1], 2.0)}


def gold_numpy(tokens, mask):
  response = mask & (np.arange(tokens.shape[1]) >= PROMPT_LEN)[None, :]
  return np.where(response, GOLD_W[tokens], 0.0).sum(1)


@functools.cache
def params(seed):
  dummy = jnp.zeros((1, PROMPT_LEN + NEW), jnp.int32)
  return jax.jit(PolicyModel(CFG).init)(jax.random.key(seed), dummy, jnp.ones(dummy.shape, bool))


def prompts(b, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, PROMPT_LEN + 1, size=b)
  mask = np.arange(PROMPT_LEN)[None, :] >= (PROMPT_LEN - lengths)[:, None]
  tokens = np.where(mask, rng.integers(3, VOCAB, size=(b, PROMPT_LEN)), 0).astype(np.int32)
  return {"prompts": tokens, "prompt_mask": mask}


STEP = functools.partial(
  rl.reinforce_step,
  policy=POLICY,
  config=CONFIG,
  reward_fn=lambda p, t, m: proxy(None, t, m),
  optimizer=OPT,
  diagnostics_fn=gold_diagnostics,
)
REWARD_PARAMS = {"w": jnp.asarray(GOLD_W)}


def log_softmax64(logits):
  x = np.asarray(logits, np.float64) / CONFIG.temperature
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_metrics_equal_a_numpy_recomputation_from_the_returned_samples():
  state = rl.create_rl_state(params(0), OPT, jax.random.key(7), kl_coef=0.1)
  ref = params(1)  # a different reference, so every KL is far from 0
  step = jax.jit(functools.partial(STEP, return_rollout=True))
  _, metrics, ro = step(state, prompts(16), REWARD_PARAMS, ref)
  metrics, ro = jax.device_get((metrics, ro))
  tokens, mask, resp = ro["tokens"], ro["mask"], ro["response_mask"]

  # Response length: the tokens up to and including the first EOS, else the whole budget.
  gen = tokens[:, PROMPT_LEN:]
  first_eos = np.where((gen == EOS).any(1), (gen == EOS).argmax(1) + 1, NEW)
  np.testing.assert_array_equal(resp.sum(1), first_eos)
  assert len(set(first_eos.tolist())) > 1  # lengths vary, so the check can fail
  np.testing.assert_allclose(metrics["response_length"], first_eos.mean(), rtol=1e-6)

  # KLs from the full distributions (float64): k1, k3 (the chosen estimator) and exact.
  lp = log_softmax64(POLICY.apply(state.params, tokens, mask)[0])[:, :-1]
  lq = log_softmax64(POLICY.apply(ref, tokens, mask)[0])[:, :-1]
  nxt = tokens[:, 1:, None]
  logp = np.take_along_axis(lp, nxt, -1)[..., 0]
  logq = np.take_along_axis(lq, nxt, -1)[..., 0]
  r = resp[:, 1:]
  k1 = np.where(r, logp - logq, 0).sum(1)
  k3 = np.where(r, np.exp(logq - logp) - 1 - (logq - logp), 0).sum(1)
  exact = np.where(r, (np.exp(lp) * (lp - lq)).sum(-1), 0).sum(1)
  np.testing.assert_allclose(metrics["kl_k1"], k1.mean(), rtol=1e-4)
  np.testing.assert_allclose(metrics["kl_k3"], k3.mean(), rtol=1e-4)
  np.testing.assert_allclose(metrics["kl_exact"], exact.mean(), rtol=1e-4)
  assert "kl_estimate" not in metrics and "kl" not in metrics and "kl_k2" not in metrics

  # The logged-only diagnostics and the optimised score, from the same samples.
  np.testing.assert_allclose(metrics["gold"], gold_numpy(tokens, mask).mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["two"], 2.0)
  np.testing.assert_allclose(metrics["score"], ro["scores"].mean(), rtol=1e-6)


def test_exact_kl_is_off_when_disabled_and_diagnostics_change_no_parameter():
  # Plain SGD, so the update is lr times the gradient: a diagnostic that leaked into the loss
  # would change it (Adam's first step is lr times the gradient's sign). The two programs may
  # round differently, so each update may differ by float32 rounding: of the gradient (relative
  # to the largest entry) and of the new parameter (one ulp).
  sgd = optax.sgd(0.1)
  step = functools.partial(STEP, optimizer=sgd)
  state = rl.create_rl_state(params(0), sgd, jax.random.key(7), kl_coef=0.1)
  batch = prompts(8, seed=3)
  with_diag = jax.jit(step)(state, batch, REWARD_PARAMS, params(1))
  plain_step = functools.partial(
    step, diagnostics_fn=None, config=dataclasses.replace(CONFIG, exact_kl=False)
  )
  plain = jax.jit(plain_step)(state, batch, REWARD_PARAMS, params(1))
  assert "kl_exact" not in plain[1] and "gold" not in plain[1]

  def check(new_a, new_b, old):
    a, b = np.asarray(new_a) - old, np.asarray(new_b) - old
    assert np.abs(b).max() > 0
    bound = 1e-6 * np.abs(b).max() + np.spacing(np.abs(np.asarray(new_b)))
    assert np.all(np.abs(a - b) <= bound), np.max(np.abs(a - b) / bound)

  jax.tree.map(check, with_diag[0].params, plain[0].params, state.params)


def test_shard_map_diagnostics_equal_the_single_device_ones():
  state = rl.create_rl_state(params(0), OPT, jax.random.key(7), kl_coef=0.1)
  batch = prompts(16, seed=5)
  _, want = jax.jit(STEP)(state, batch, REWARD_PARAMS, params(1))
  pstep = parallel.make_parallel_step(rl.with_frozen_params(STEP), mode="shard_map")
  carry = pstep.put_state((state, REWARD_PARAMS, params(1)))
  _, got = pstep(carry, pstep.shard_batch(batch))
  got = pstep.unreplicate(got)
  for k in ("gold", "kl_k1", "kl_k3", "kl_exact", "response_length", "score"):
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize(
  "bad, match",
  [
    (lambda p, t, m: {"score": jnp.zeros(t.shape[0])}, "'score'"),
    (lambda p, t, m: {"gold": jnp.zeros((t.shape[0], 2))}, r"shape \(4, 2\)"),
  ],
)
def test_bad_diagnostics_output_is_rejected_naming_it(bad, match):
  state = rl.create_rl_state(params(0), OPT, jax.random.key(7), kl_coef=0.1)
  step = functools.partial(STEP, diagnostics_fn=bad)
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(step, state, prompts(4), REWARD_PARAMS, params(1))
