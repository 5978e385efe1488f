"""Tests for jaxrm.models.policy: PolicyModel outputs and the log-prob / entropy helpers."""

from flax import linen as nn
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
from model_helpers import random_params
import numpy as np
import pytest

from jaxrm.models.policy import (
  PolicyModel,
  apply_fn_policy,
  sequence_logprobs,
  token_entropy,
  token_logprobs,
  transformer_policy,
)
from jaxrm.models.transformer import TransformerConfig

VOCAB = 41
CFG = TransformerConfig(
  vocab_size=VOCAB, num_layers=2, width=32, num_heads=2, max_len=16, position="learned"
)
B, S = 2, 10


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_token_logprobs_matches_numpy_reference_and_alignment():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 7)) * 2
  tokens = rng.integers(0, 7, size=(3, 5))
  got = jax.jit(token_logprobs)(logits.astype(np.float32), tokens)
  want = np.zeros((3, 5))
  lp = _np_log_softmax(logits)
  for b in range(3):
    for t in range(1, 5):
      want[b, t] = lp[b, t - 1, tokens[b, t]]  # log p(tokens[t] | tokens[<t]) from logits[t-1]
  assert got.shape == (3, 5) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_token_logprobs_gradient_matches_finite_differences():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(2, 4, 5)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, 5, size=(2, 4)))
  check_grads(
    lambda x: token_logprobs(x, tokens), (logits,), order=1, modes=("rev",), atol=1e-2, rtol=1e-2
  )


def test_sequence_logprobs_sums_token_logprobs_over_the_mask():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(2, 6, 5)).astype(np.float32)
  tokens = rng.integers(0, 5, size=(2, 6))
  mask = np.array([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], bool)
  lp = _np_log_softmax(logits.astype(np.float64))
  want = [sum(lp[b, t - 1, tokens[b, t]] for t in range(6) if mask[b, t]) for b in range(2)]
  got = jax.jit(sequence_logprobs)(logits, tokens, mask)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_token_entropy_matches_numpy_reference_including_filtered_logits():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(2, 4, 6))
  logits[0, 1, :3] = -np.inf  # top-k style filtering: zero-probability entries
  got = jax.jit(token_entropy)(logits.astype(np.float32))
  p = np.exp(_np_log_softmax(logits))
  ent = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), -1)
  want = np.concatenate([np.zeros((2, 1)), ent[:, :-1]], 1)
  assert np.isfinite(np.asarray(got)).all()
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_helpers_reject_mismatched_shapes_naming_the_argument():
  with pytest.raises(ValueError, match=r"logits.*\[batch, seq, vocab\].*\(2, 3\)"):
    token_logprobs(np.zeros((2, 3)), np.zeros((2, 3), np.int32))
  with pytest.raises(ValueError, match=r"tokens.*\(2, 3\).*\(2, 4\)"):
    token_logprobs(np.zeros((2, 3, 5)), np.zeros((2, 4), np.int32))
  with pytest.raises(ValueError, match=r"mask.*\(2, 3\).*\(2, 2\)"):
    sequence_logprobs(np.zeros((2, 3, 5)), np.zeros((2, 3), np.int32), np.ones((2, 2)))
  with pytest.raises(ValueError, match=r"logits.*\(4,\)"):
    token_entropy(np.zeros((4,)))


def test_token_ids_out_of_range_are_refused_eagerly_and_give_nan_under_jit():
  logits = jax.random.normal(jax.random.key(0), (1, 3, 10))
  for bad in (12, 10, -1, -100):  # a negative id would otherwise wrap to the vocabulary's end
    tokens = jnp.array([[1, bad, 3]])
    with pytest.raises(ValueError, match=r"tokens must have ids in \[0, vocab_size=10\)"):
      token_logprobs(logits, tokens)
    got = np.asarray(jax.jit(token_logprobs)(logits, tokens))
    assert np.isnan(got[0, 1]) and np.isfinite(got[0, [0, 2]]).all()
  tokens = jnp.array([[1, 9, 3]])  # the largest id is in range
  assert np.isfinite(np.asarray(jax.jit(token_logprobs)(logits, tokens))).all()


def test_policy_sample_needs_one_key_per_prompt():
  fns = transformer_policy(CFG)
  params = random_params(PolicyModel(CFG), (B, S))
  prompts, mask = jnp.ones((B, 3), jnp.int32), jnp.ones((B, 3), bool)
  kw = dict(max_new_tokens=2, temperature=1.0, eos_id=None)
  with pytest.raises(
    ValueError, match=r"keys must be keys of shape \(2,\), got keys of shape \(\)"
  ):
    fns.sample(params, prompts, mask, jax.random.key(0), **kw)
  with pytest.raises(ValueError, match="keys must be a JAX PRNG key"):
    fns.sample(params, prompts, mask, np.arange(2), **kw)
  out = fns.sample(params, prompts, mask, jax.random.split(jax.random.key(0), B), **kw)
  assert out.tokens.shape == (B, 5)


def test_policy_outputs_are_causal_and_padding_invariant_with_value_head():
  model = PolicyModel(CFG, value_head=True)
  params = random_params(model, (B, S))
  apply = jax.jit(model.apply)
  rng = np.random.default_rng(4)
  real = rng.integers(3, VOCAB, size=7)
  tokens = np.stack([np.concatenate([real, [5, 6, 7]]), np.concatenate([[8, 9, 10], real])])
  mask = np.stack([np.arange(S) < 7, np.arange(S) >= 3])
  logits, values = apply(params, tokens, mask)
  assert logits.shape == (B, S, VOCAB) and logits.dtype == jnp.float32
  assert values.shape == (B, S) and values.dtype == jnp.float32
  np.testing.assert_allclose(logits[1, 3:], logits[0, :7], atol=1e-5)  # left == right pad
  np.testing.assert_allclose(values[1, 3:], values[0, :7], atol=1e-5)
  changed = tokens.copy()
  changed[0, 4] += 1
  logits2, values2 = apply(params, changed, mask)
  np.testing.assert_array_equal(logits2[0, :4], logits[0, :4])
  np.testing.assert_array_equal(values2[0, :4], values[0, :4])
  assert np.abs(np.asarray(logits2[0, 4] - logits[0, 4])).max() > 1e-4
  _, no_values = jax.eval_shape(PolicyModel(CFG).apply, params, tokens, mask)
  assert no_values is None


def test_lm_bias_init_sets_the_initial_next_token_distribution():
  cfg = TransformerConfig(vocab_size=VOCAB, num_layers=1, width=8, num_heads=1, max_len=8)
  zipf = 1.0 / np.arange(1, VOCAB + 1)
  log_probs = np.log(zipf / zipf.sum()).astype(np.float32)
  model = PolicyModel(
    cfg, lm_bias_init=nn.initializers.constant(log_probs), lm_kernel_init=nn.initializers.zeros
  )
  tokens = np.full((1, 4), 5, np.int32)
  mask = np.ones((1, 4), bool)

  @jax.jit
  def init_and_apply(key):
    params = model.init(key, tokens, mask)
    return params, model.apply(params, tokens, mask)[0]

  params, logits = init_and_apply(jax.random.key(0))
  np.testing.assert_allclose(params["params"]["lm_head"]["bias"], log_probs)
  np.testing.assert_allclose(
    jax.nn.softmax(logits[0]), np.tile(zipf / zipf.sum(), (4, 1)), rtol=1e-5
  )


# ----------------------------------------------------------------------------- PolicyFns
def test_transformer_policy_reads_the_value_head_only_when_the_params_have_one():
  tokens = jnp.ones((B, S), jnp.int32)
  mask = jnp.ones((B, S), bool)
  with_head = PolicyModel(CFG, value_head=True).init(jax.random.key(0), tokens, mask)
  plain = {"params": {k: v for k, v in with_head["params"].items() if k != "value_head"}}
  policy = transformer_policy(CFG, value_head=True)
  logits, values = policy.apply(with_head, tokens, mask)
  want_logits, want_values = PolicyModel(CFG, value_head=True).apply(with_head, tokens, mask)
  np.testing.assert_array_equal(logits, want_logits)
  np.testing.assert_array_equal(values, want_values)
  ref_logits, ref_values = policy.apply(plain, tokens, mask)  # the reference has no head
  assert ref_values is None
  np.testing.assert_array_equal(ref_logits, want_logits)
  assert transformer_policy(CFG).apply(with_head, tokens, mask)[1] is None
  assert (policy.vocab_size, policy.max_len) == (VOCAB, 16)


def test_apply_fn_policy_accepts_logits_only_models_and_samples_rows_independently():
  class Unigram(nn.Module):
    @nn.compact
    def __call__(self, tokens, mask):
      bias = self.param("bias", nn.initializers.normal(1.0), (VOCAB,))
      return jnp.broadcast_to(bias, tokens.shape + (VOCAB,))

  model = Unigram()
  params = model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), bool))
  policy = apply_fn_policy(model.apply, vocab_size=VOCAB)
  logits, values = policy.apply(params, jnp.ones((2, 4), jnp.int32), jnp.ones((2, 4), bool))
  assert logits.shape == (2, 4, VOCAB) and values is None
  prompts = jnp.array([[3, 4], [5, 6], [3, 4]], jnp.int32)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(1), i))(jnp.array([0, 1, 0]))
  out = policy.sample(
    params, prompts, jnp.ones((3, 2), bool), keys, max_new_tokens=5, temperature=1.0, eos_id=None
  )
  assert out.tokens.shape == (3, 7)
  np.testing.assert_array_equal(out.tokens[0], out.tokens[2])  # same prompt and key
  assert not np.array_equal(out.tokens[0, 2:], out.tokens[1, 2:])
  with pytest.raises(ValueError, match="apply_fn must be callable"):
    apply_fn_policy(None)
