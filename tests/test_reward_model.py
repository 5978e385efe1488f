"""Tests for jaxrm.models.reward_model: padding invariance, pooling, shapes and gradients."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from model_helpers import random_params
import numpy as np
import pytest

from jaxrm.models.reward_model import RewardModel, pool_hidden
from jaxrm.models.transformer import Transformer, TransformerConfig

VOCAB = 41
CFG = TransformerConfig(vocab_size=VOCAB, num_layers=2, width=32, num_heads=2, max_len=16)
LEARNED = dataclasses.replace(CFG, position="learned")
B, S = 3, 10


@functools.cache
def _setup(cfg, pooling):
  model = RewardModel(cfg, pooling=pooling)
  params = random_params(model, (B, S))
  return model, params, jax.jit(model.apply)


@pytest.mark.parametrize("pooling", ["last", "mean"])
@pytest.mark.parametrize("cfg", [CFG, LEARNED], ids=["rotary", "learned"])
def test_reward_is_invariant_to_padding(cfg, pooling):
  _, params, apply = _setup(cfg, pooling)
  rng = np.random.default_rng(0)
  real = rng.integers(3, VOCAB, size=5)
  junk = rng.integers(0, VOCAB, size=(3, S - 5))  # arbitrary pad ids
  tokens = np.stack(
    [
      np.concatenate([real, junk[0]]),  # right-padded
      np.concatenate([junk[1], real]),  # left-padded
      np.concatenate([junk[2][:2], real, junk[2][2:]]),  # padded on both sides
    ]
  ).astype(np.int32)
  mask = np.stack(
    [np.arange(S) < 5, np.arange(S) >= S - 5, (np.arange(S) >= 2) & (np.arange(S) < 7)]
  )
  rewards = np.asarray(apply(params, tokens, mask))
  assert rewards.shape == (B,) and rewards.dtype == np.float32
  np.testing.assert_allclose(rewards, rewards[0], atol=1e-5)
  # and the reward does depend on the real tokens
  other = tokens.copy()
  other[0, 4] = (other[0, 4] + 1) % VOCAB
  assert abs(float(apply(params, other, mask)[0]) - rewards[0]) > 1e-4


def test_last_pooling_reads_the_last_real_token_only():
  _, params, apply = _setup(CFG, "last")
  rng = np.random.default_rng(1)
  tokens = rng.integers(3, VOCAB, size=(B, S)).astype(np.int32)
  mask = np.ones((B, S), bool)
  mask[1, 7:] = False
  rewards = np.asarray(apply(params, tokens, mask))
  # the full-length reward of row 1's prefix equals a reward read at position 6
  model = Transformer(CFG)
  hidden = jax.jit(model.apply)({"params": params["params"]["backbone"]}, tokens, mask)
  head = params["params"]["head"]
  want = np.asarray(hidden)[[0, 1, 2], [9, 6, 9]] @ np.asarray(head["kernel"])[:, 0]
  np.testing.assert_allclose(rewards, want + float(head["bias"][0]), atol=1e-5)


def test_pool_hidden_matches_numpy_reference():
  rng = np.random.default_rng(2)
  hidden = rng.normal(size=(4, 6, 3))
  mask = np.array(
    [[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1], [0, 1, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0]], bool
  )
  last = jax.jit(functools.partial(pool_hidden, pooling="last"))(hidden, mask)
  mean = jax.jit(functools.partial(pool_hidden, pooling="mean"))(hidden, mask)
  want_last = np.stack([hidden[0, 2], hidden[1, 5], hidden[2, 4], np.zeros(3)])
  want_mean = np.stack(
    [hidden[0, :3].mean(0), hidden[1, 2:].mean(0), hidden[2, [1, 3, 4]].mean(0), np.zeros(3)]
  )
  np.testing.assert_allclose(last, want_last, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(mean, want_mean, rtol=1e-6, atol=1e-6)


def test_reward_gradients_are_finite_with_an_all_padding_row():
  model, params, _ = _setup(CFG, "last")
  tokens = np.ones((B, S), np.int32)
  mask = np.ones((B, S), bool)
  mask[2] = False
  grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply(p, tokens, mask))))(params)
  leaves = jax.tree.leaves(grads)
  assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
  assert any(np.abs(np.asarray(g)).max() > 0 for g in leaves)


def test_reward_model_rejects_bad_input_naming_the_argument():
  model, params, _ = _setup(CFG, "last")
  with pytest.raises(ValueError, match=r"mask.*\(3, 10\).*\(3, 9\)"):
    model.apply(params, np.ones((B, S), np.int32), np.ones((B, 9), bool))
  with pytest.raises(ValueError, match=r"tokens.*vocab_size=41"):
    model.apply(params, np.full((B, S), 99, np.int32), np.ones((B, S), bool))
  with pytest.raises(ValueError, match="pooling"):
    RewardModel(CFG, pooling="max").init(
      jax.random.key(0), np.ones((1, 2), np.int32), np.ones((1, 2), bool)
    )
  with pytest.raises(ValueError, match=r"hidden.*\[batch, seq, width\].*\(2, 3\)"):
    pool_hidden(np.ones((2, 3)), np.ones((2, 3), bool))
