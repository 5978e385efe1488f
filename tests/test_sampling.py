"""Tests for jaxrm.models.sampling: KV-cached sampler vs full forward, filtering, EOS, randomness.

Compile budget: the cached sampler is compiled for two static settings only (A: no
filtering, ``eos_id=None``; B: ``top_k=5, top_p=0.9, eos_id=EOS_ID``) at one batch shape;
temperature is traced and params vary freely, so every test reuses one of the two programs.
"""

import functools

import jax
import jax.numpy as jnp
from model_helpers import random_params
import numpy as np
import pytest

from jaxrm.models.policy import PolicyModel, token_logprobs
from jaxrm.models.sampling import (
  EOS_ID,
  PAD_ID,
  SampleOutput,
  filter_logits,
  sample,
  sample_with_apply_fn,
)
from jaxrm.models.transformer import TransformerConfig

VOCAB = 41
CFG = TransformerConfig(vocab_size=VOCAB, num_layers=2, width=32, num_heads=2, max_len=16)
B, P, N = 16, 6, 8  # batch, prompt length, new tokens
SETTING_A = dict(top_k=0, top_p=1.0, eos_id=None)
SETTING_B = dict(top_k=5, top_p=0.9, eos_id=EOS_ID)


PARAMS_VALUE_HEAD = random_params(PolicyModel(CFG, value_head=True), (B, P), seed=1)
PARAMS = random_params(PolicyModel(CFG), (B, P), seed=2)


def _prompts(seed=0):
  """Left-padded prompts of lengths 1..P (BOS first)."""
  rng = np.random.default_rng(seed)
  lengths = 1 + np.arange(B) % P
  mask = np.arange(P)[None, :] >= (P - lengths)[:, None]
  tokens = rng.integers(3, VOCAB, size=(B, P))
  tokens[np.arange(B), P - lengths] = 1  # BOS
  return np.where(mask, tokens, PAD_ID).astype(np.int32), mask


def _unigram(params, logits):
  """Params whose policy ignores the context: next-token logits == ``logits`` everywhere."""
  params = jax.tree.map(lambda x: x, params)
  head = dict(params["params"]["lm_head"])
  head["kernel"] = jnp.zeros_like(head["kernel"])
  head["bias"] = jnp.asarray(logits, jnp.float32)
  params["params"] = dict(params["params"], lm_head=head)
  return params


@functools.cache
def _full_apply(value_head):
  return jax.jit(PolicyModel(CFG, value_head=value_head).apply)


def _np_filter(logits, temperature, top_k, top_p):
  """Float64 NumPy reference of temperature / top-k / top-p: the kept set and its probs."""
  x = np.asarray(logits, np.float64) / temperature
  keep = np.ones(x.shape, bool)
  if top_k:
    keep &= x >= np.sort(x)[::-1][top_k - 1]
  p = np.where(keep, np.exp(x - x.max()), 0.0)
  p /= p.sum()
  if top_p < 1:
    order = np.argsort(-p, kind="stable")
    mass, nucleus = 0.0, np.zeros_like(keep)
    for i in order:
      if mass >= top_p:
        break
      nucleus[i] = True
      mass += p[i]
    keep &= nucleus
    p = np.where(keep, p, 0.0)
    p /= p.sum()
  return keep, p


# ----------------------------------------------------------------------------- equivalences


@pytest.mark.parametrize(
  "setting, temperature, value_head",
  [(SETTING_A, 0.7, True), (SETTING_B, 1.3, False)],
  ids=["temp", "temp-topk-topp"],
)
def test_cached_sampler_logprobs_equal_a_full_forward_pass(setting, temperature, value_head):
  params = PARAMS_VALUE_HEAD if value_head else PARAMS
  tokens, mask = _prompts()
  out = sample(
    params,
    tokens,
    mask,
    jax.random.key(3),
    config=CFG,
    max_new_tokens=N,
    temperature=temperature,
    **setting,
  )
  assert isinstance(out, SampleOutput)
  for field in out:
    assert field.shape == (B, P + N)
  np.testing.assert_array_equal(out.tokens[:, :P], tokens)
  np.testing.assert_array_equal(out.mask[:, :P], mask)
  assert not np.asarray(out.response_mask[:, :P]).any()
  logits, _ = _full_apply(value_head)(params, out.tokens, out.mask)
  filtered = filter_logits(
    logits, temperature=temperature, top_k=setting["top_k"], top_p=setting["top_p"]
  )
  want = np.where(out.response_mask, token_logprobs(filtered, out.tokens), 0.0)
  assert np.isfinite(want).all()
  np.testing.assert_allclose(out.logprobs, want, atol=1e-5, rtol=0)
  assert np.asarray(out.response_mask).sum() > B  # responses were actually sampled


def test_cached_sampler_matches_the_policy_agnostic_sampler():
  tokens, mask = _prompts(1)
  kwargs = dict(max_new_tokens=N, temperature=0.8, **SETTING_A)
  cached = sample(PARAMS_VALUE_HEAD, tokens, mask, jax.random.key(4), config=CFG, **kwargs)
  full = sample_with_apply_fn(
    PolicyModel(CFG, value_head=True).apply,
    PARAMS_VALUE_HEAD,
    tokens,
    mask,
    jax.random.key(4),
    max_len=CFG.max_len,
    **kwargs,
  )
  np.testing.assert_array_equal(cached.tokens, full.tokens)
  np.testing.assert_array_equal(cached.mask, full.mask)
  np.testing.assert_allclose(cached.logprobs, full.logprobs, atol=1e-5)


def test_same_key_gives_same_samples_and_different_keys_differ():
  tokens, mask = _prompts(2)
  run = lambda key: sample(
    PARAMS_VALUE_HEAD, tokens, mask, key, config=CFG, max_new_tokens=N, temperature=1.0, **SETTING_A
  )
  first, again, other = run(jax.random.key(7)), run(jax.random.key(7)), run(jax.random.key(8))
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  assert np.mean(np.asarray(first.tokens[:, P:] != other.tokens[:, P:])) > 0.5


def test_per_example_keys_make_each_sample_independent_of_the_rest_of_the_batch():
  tokens, mask = _prompts(3)
  keys = jax.random.split(jax.random.key(9), B)
  kwargs = dict(config=CFG, max_new_tokens=N, temperature=1.0, **SETTING_B)
  whole = sample(PARAMS, tokens, mask, keys, **kwargs)
  # Rows 3 and 10 sampled alone, with their own keys: the same tokens as in the batch.
  for b in (3, 10):
    alone = sample(PARAMS, tokens[b : b + 1], mask[b : b + 1], keys[b : b + 1], **kwargs)
    np.testing.assert_array_equal(alone.tokens[0], whole.tokens[b])
    np.testing.assert_array_equal(alone.mask[0], whole.mask[b])
    np.testing.assert_allclose(alone.logprobs[0], whole.logprobs[b], atol=1e-5)
  # Raw uint32 key data per example is accepted too; other keys give other samples.
  raw = jax.vmap(jax.random.key_data)(keys)
  np.testing.assert_array_equal(sample(PARAMS, tokens, mask, raw, **kwargs).tokens, whole.tokens)
  other = sample(PARAMS, tokens, mask, jax.random.split(jax.random.key(10), B), **kwargs)
  assert np.mean(np.asarray(other.tokens[:, P:] != whole.tokens[:, P:])) > 0.5


def test_per_example_keys_give_the_same_samples_without_the_cache():
  tokens, mask = _prompts(4)
  keys = jax.random.split(jax.random.key(11), B)
  kwargs = dict(max_new_tokens=N, temperature=0.8, **SETTING_A)
  cached = sample(PARAMS, tokens, mask, keys, config=CFG, **kwargs)
  full = sample_with_apply_fn(_full_apply(False), PARAMS, tokens, mask, keys, **kwargs)
  np.testing.assert_array_equal(cached.tokens, full.tokens)
  np.testing.assert_allclose(cached.logprobs, full.logprobs, atol=1e-5)


@pytest.mark.parametrize("groups", [2, 4])
def test_thread_groups_give_the_samples_of_one_call(groups):
  tokens, mask = _prompts(5)
  keys = jax.random.split(jax.random.key(12), B)
  kwargs = dict(config=CFG, max_new_tokens=N, temperature=1.0, **SETTING_B)
  one = sample(PARAMS, tokens, mask, keys, **kwargs)
  split = sample(PARAMS, tokens, mask, keys, thread_groups=groups, **kwargs)
  np.testing.assert_array_equal(split.tokens, one.tokens)
  np.testing.assert_array_equal(split.mask, one.mask)
  np.testing.assert_array_equal(split.response_mask, one.response_mask)
  np.testing.assert_allclose(split.logprobs, one.logprobs, atol=1e-5)


def test_thread_groups_refuse_a_single_key_and_a_batch_they_do_not_divide():
  tokens, mask = _prompts(5)
  keys = jax.random.split(jax.random.key(12), B)
  kwargs = dict(config=CFG, max_new_tokens=N)
  with pytest.raises(ValueError, match=r"thread_groups=2 needs \[batch\] keys"):
    sample(PARAMS, tokens, mask, jax.random.key(0), thread_groups=2, **kwargs)
  for groups in (3, 0, 2.0):
    with pytest.raises(ValueError, match=f"thread_groups must be .* batch of {B}, got {groups}"):
      sample(PARAMS, tokens, mask, keys, thread_groups=groups, **kwargs)
  with pytest.raises(
    ValueError, match="thread_groups=2 runs host threads: call sample outside jit"
  ):
    jax.jit(lambda t: sample(PARAMS, t, mask, keys, thread_groups=2, **kwargs))(tokens)


# ----------------------------------------------------------------------------- filtering


def test_top_k_and_top_p_never_emit_an_excluded_token():
  # Probabilities 0.40, 0.30, 0.20, 0.05, 0.03 on tokens 10..14, 0.02 spread over the rest.
  # top_k=5 excludes all but 10..14; top_p=0.9 on the renormalised top 5 keeps 10, 11, 12.
  probs = np.full(VOCAB, 0.02 / (VOCAB - 5))
  probs[10:15] = [0.40, 0.30, 0.20, 0.05, 0.03]
  params = _unigram(PARAMS, np.log(probs))
  tokens, mask = _prompts(3)
  out = sample(
    params,
    tokens,
    mask,
    jax.random.key(5),
    config=CFG,
    max_new_tokens=N,
    temperature=1.0,
    **SETTING_B,
  )
  emitted = np.asarray(out.tokens)[np.asarray(out.response_mask)]
  assert set(emitted.tolist()) == {10, 11, 12}  # every kept token appears, no other does
  keep, p = _np_filter(np.log(probs), 1.0, 5, 0.9)
  assert set(np.flatnonzero(keep)) == {10, 11, 12}
  np.testing.assert_allclose(
    np.asarray(out.logprobs)[np.asarray(out.response_mask)], np.log(p[emitted]), atol=1e-5
  )


def _unigram_apply(params, tokens, mask):
  """A context-free 'model' for the policy-agnostic sampler: logits == params everywhere."""
  del mask
  return jnp.broadcast_to(params, tokens.shape + params.shape), None


@pytest.mark.parametrize("top_k, top_p, allowed", [(2, 1.0, {4, 7}), (0, 0.75, {4, 7, 9})])
def test_top_k_alone_and_top_p_alone_never_emit_an_excluded_token(top_k, top_p, allowed):
  probs = np.full(12, 0.1 / 9)
  probs[[4, 7, 9]] = [0.35, 0.3, 0.25]
  tokens, mask = np.ones((64, 1), np.int32), np.ones((64, 1), bool)
  out = sample_with_apply_fn(
    _unigram_apply,
    jnp.log(jnp.asarray(probs, jnp.float32)),
    tokens,
    mask,
    jax.random.key(6),
    max_new_tokens=6,
    top_k=top_k,
    top_p=top_p,
    eos_id=None,
  )
  assert set(np.asarray(out.tokens[:, 1:]).ravel().tolist()) == allowed


@pytest.mark.parametrize(
  "temperature, top_k, top_p",
  [
    (1.0, 0, 1.0),
    (0.5, 0, 1.0),
    (1.0, 3, 1.0),
    (2.0, 0, 0.6),
    (0.7, 4, 0.8),
    (1.0, 1, 1.0),
    (1.0, 0, 0.01),
  ],
)
def test_filter_logits_matches_numpy_reference(temperature, top_k, top_p):
  rng = np.random.default_rng(7)
  logits = rng.normal(size=(5, 9)) * 2
  got = jax.jit(functools.partial(filter_logits, top_k=top_k, top_p=top_p))(
    logits.astype(np.float32), temperature=temperature
  )
  got_p = np.asarray(jax.nn.softmax(got, axis=-1))
  for row in range(5):
    keep, p = _np_filter(logits[row], temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isfinite(np.asarray(got[row])), keep)
    np.testing.assert_allclose(got_p[row], p, atol=1e-6)


# ----------------------------------------------------------------------------- EOS


def _eos_heavy_logits():
  probs = np.full(VOCAB, 0.05 / (VOCAB - 3))
  probs[[EOS_ID, 10, 11]] = [0.3, 0.4, 0.25]
  return np.log(probs)


def test_eos_ends_sequences_and_everything_after_is_masked_padding():
  tokens, mask = _prompts(4)
  out = sample(
    _unigram(PARAMS, _eos_heavy_logits()),
    tokens,
    mask,
    jax.random.key(9),
    config=CFG,
    max_new_tokens=N,
    temperature=1.0,
    **SETTING_B,
  )
  resp = np.asarray(out.tokens[:, P:])
  rmask = np.asarray(out.response_mask[:, P:])
  np.testing.assert_array_equal(np.asarray(out.mask[:, P:]), rmask)
  ended, padded = 0, 0
  for row in range(B):
    eos = np.flatnonzero(resp[row] == EOS_ID)
    stop = eos[0] + 1 if eos.size else N  # the EOS token itself is part of the response
    ended += bool(eos.size)
    padded += stop < N
    assert rmask[row, :stop].all() and not rmask[row, stop:].any()
    assert (resp[row, stop:] == PAD_ID).all()
    assert (np.asarray(out.logprobs)[row, P + stop :] == 0).all()
    assert (np.asarray(out.logprobs)[row, P : P + stop] < 0).all()
  assert ended > B // 2 and padded > B // 2  # P(no EOS in 8 steps) = 0.68**8: most end


def test_eos_id_none_gives_fixed_length_responses():
  tokens, mask = _prompts(5)
  out = sample(
    _unigram(PARAMS_VALUE_HEAD, _eos_heavy_logits()),
    tokens,
    mask,
    jax.random.key(10),
    config=CFG,
    max_new_tokens=N,
    temperature=1.0,
    **SETTING_A,
  )
  assert (np.asarray(out.tokens[:, P:]) == EOS_ID).sum() > B  # EOS is sampled ...
  assert np.asarray(out.response_mask[:, P:]).all()  # ... but never ends a sequence
  assert np.asarray(out.mask[:, P:]).all()


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
  "tokens, mask, kwargs, pattern",
  [
    (
      np.ones((2, 3), np.int32),
      np.array([[1, 1, 0], [1, 1, 1]], bool),
      {},
      r"prompt_mask.*left-padded",
    ),
    (
      np.ones((2, 3), np.int32),
      np.array([[0, 0, 0], [1, 1, 1]], bool),
      {},
      r"prompt_mask.*at least one real token",
    ),
    (np.ones((3,), np.int32), np.ones((3,), bool), {}, r"prompt_tokens.*\(3,\)"),
    (np.ones((2, 3), np.int32), np.ones((2, 4), bool), {}, r"prompt_mask.*\(2, 3\).*\(2, 4\)"),
    (
      np.ones((2, 10), np.int32),
      np.ones((2, 10), bool),
      {},
      r"prompt_tokens length 10.*max_new_tokens 8.*max_len=16",
    ),
    (np.full((2, 3), VOCAB, np.int32), np.ones((2, 3), bool), {}, r"prompt_tokens.*vocab_size"),
    (np.ones((2, 3), np.int32), np.ones((2, 3), bool), dict(temperature=0.0), "temperature"),
    (np.ones((2, 3), np.int32), np.ones((2, 3), bool), dict(top_k=VOCAB + 1), "top_k"),
    (np.ones((2, 3), np.int32), np.ones((2, 3), bool), dict(top_p=0.0), "top_p"),
  ],
)
def test_sample_rejects_bad_input_naming_the_argument(tokens, mask, kwargs, pattern):
  with pytest.raises(ValueError, match=pattern):
    sample(PARAMS, tokens, mask, jax.random.key(0), config=CFG, max_new_tokens=N, **kwargs)


def test_sample_rejects_a_bad_key_naming_it():
  tokens, mask = np.ones((2, 3), np.int32), np.ones((2, 3), bool)
  for key, pattern in (
    (0, "key must be a JAX PRNG key .*got int"),
    (
      jax.random.split(jax.random.key(0), 3),
      r"key must be one key, got keys of shape \(3,\) \(or \[batch\] keys, .*shape \(2,\)\)",
    ),
    (np.zeros(2, np.float32), "key must be a JAX PRNG key"),
  ):
    with pytest.raises(ValueError, match=pattern):
      sample(PARAMS, tokens, mask, key, config=CFG, max_new_tokens=N)
  raw = jax.random.PRNGKey(0)  # legacy uint32 key data is accepted
  assert sample(PARAMS, tokens, mask, raw, config=CFG, max_new_tokens=N).tokens.shape == (2, 3 + N)
