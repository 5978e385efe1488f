"""Tests for jaxrm.models.reward_model: padding invariance, pooling, shapes and gradients, and its
training step in microbatches (the whole batch's loss and gradients)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from model_helpers import assert_same_sgd_step, bt_loss, random_params
import numpy as np
import optax
import pytest

from jaxrm.models.reward_model import RewardModel, last_positions, pool_hidden
from jaxrm.models.transformer import Transformer, TransformerConfig, init_cache
from jaxrm.steps import rm_step
from jaxrm.steps import train_state as ts

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


def _full_pass_rewards(params, tokens, mask, cfg):
  """The reward of the whole backbone's hidden states pooled at the last real token (every
  layer at every position): what the last layer's read-only-one-token pass must equal."""
  hidden = Transformer(cfg).apply({"params": params["params"]["backbone"]}, tokens, mask)
  pooled = pool_hidden(hidden, mask, pooling="last")
  head = params["params"]["head"]
  return pooled @ head["kernel"][:, 0] + head["bias"][0]


@pytest.mark.parametrize(
  "cfg",
  [
    CFG,
    LEARNED,
    dataclasses.replace(CFG, num_kv_heads=1, num_heads=2),
    dataclasses.replace(CFG, attention_query_block=4),
  ],
  ids=["rotary", "learned", "gqa", "query_blocks"],
)
def test_last_pooling_reading_one_token_matches_the_full_pass_and_its_gradients(cfg):
  """Rows right-, left- and both-side padded, full, and all padding; rewards and every
  parameter's gradient (float32) within 1e-5 of the full pass's."""
  model = RewardModel(cfg, pooling="last")
  params = random_params(model, (5, S), seed=3)
  rng = np.random.default_rng(4)
  tokens = rng.integers(0, VOCAB, size=(5, S)).astype(np.int32)
  idx = np.arange(S)
  mask = np.stack([idx < 6, idx >= 3, (idx >= 2) & (idx < 8), idx >= 0, idx < 0])
  fast = lambda p: model.apply(p, tokens, mask)  # noqa: E731
  full = lambda p: _full_pass_rewards(p, tokens, mask, cfg)  # noqa: E731
  np.testing.assert_allclose(jax.jit(fast)(params), jax.jit(full)(params), rtol=1e-5, atol=1e-5)
  weights = jnp.asarray(rng.normal(size=5), jnp.float32)
  grad = lambda f: jax.jit(jax.grad(lambda p: jnp.vdot(f(p), weights)))(params)  # noqa: E731
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), grad(fast), grad(full)
  )


def test_backbone_rows_equal_the_full_hidden_states_at_those_positions():
  model = Transformer(CFG)
  params = random_params(model, (B, S), seed=5)
  rng = np.random.default_rng(6)
  tokens = rng.integers(0, VOCAB, size=(B, S)).astype(np.int32)
  mask = np.ones((B, S), bool)
  mask[1, :3] = False
  rows = np.array([[0, 9], [4, 4], [7, 2]], np.int32)
  full = np.asarray(jax.jit(model.apply)(params, tokens, mask))
  got = jax.jit(lambda p, r: model.apply(p, tokens, mask, rows=r))(params, rows)
  assert got.shape == (B, 2, CFG.width)
  np.testing.assert_allclose(got, np.take_along_axis(full, rows[..., None], 1), atol=1e-5)


def test_backbone_rows_reject_bad_input_naming_the_argument():
  model = Transformer(CFG)
  params = random_params(model, (B, S))
  tokens, mask = np.ones((B, S), np.int32), np.ones((B, S), bool)
  with pytest.raises(
    ValueError, match=r"rows must have shape \[batch, n\] with batch 3, got \(2, 1\)"
  ):
    model.apply(params, tokens, mask, rows=np.zeros((2, 1), np.int32))
  with pytest.raises(ValueError, match="rows must be an integer array, got dtype float32"):
    model.apply(params, tokens, mask, rows=np.zeros((B, 1), np.float32))
  cache = init_cache(CFG, batch_size=B, cache_len=S)
  with pytest.raises(ValueError, match="rows is for a pass without a cache"):
    model.apply(params, tokens[:, :2], mask[:, :2], cache, rows=np.zeros((B, 1), np.int32))


def test_last_positions_are_each_rows_last_real_token():
  mask = np.array([[1, 1, 0, 0], [0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 0]], bool)
  np.testing.assert_array_equal(last_positions(mask), [1, 3, 3, 0])


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


def _preference_batch(*, b, s):
  """``b`` random pairs of up to ``s`` tokens, right-padded, with unequal weights."""
  rng = np.random.default_rng(5)
  batch = {}
  for name in ("chosen", "rejected"):
    mask = np.arange(s)[None] < rng.integers(1, s + 1, size=b)[:, None]
    batch[name] = np.where(mask, rng.integers(3, VOCAB, size=(b, s)), 0).astype(np.int32)
    batch[f"{name}_mask"] = mask
  batch["weight"] = rng.uniform(0.5, 1.5, size=b).astype(np.float32)
  return batch


def test_microbatched_transformer_step_gives_the_whole_batch_loss_metrics_and_gradients():
  # The README HH model's settings (rotary positions, causal query blocks, last-token
  # pooling) at a small shape, 8 pairs in slices of 2.
  backbone = TransformerConfig(
    vocab_size=VOCAB, width=32, num_layers=1, num_heads=2, max_len=16, attention_query_block=8
  )
  model = RewardModel(backbone)
  batch = _preference_batch(b=8, s=16)
  params = model.init(jax.random.key(2), batch["chosen"], batch["chosen_mask"])
  state = ts.create_train_state(params, optax.sgd(1.0), jax.random.key(0))
  step = functools.partial(
    rm_step.reward_model_step, apply_fn=model.apply, loss_fn=bt_loss, optimizer=optax.sgd(1.0)
  )
  whole = jax.jit(step)(state, batch)
  sliced = jax.jit(functools.partial(step, microbatch_size=2))(state, batch)
  assert_same_sgd_step(params, whole, sliced)
