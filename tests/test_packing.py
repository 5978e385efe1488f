"""Tests of packed preference pairs (jaxrm.data.packing, the backbone's ``segments``).

* :func:`pack_pairs` against a plain-Python layout: each row is the longest common token
  prefix, then chosen's rest, then rejected's rest; left- and right-padded inputs; bad input;
* the backbone's hidden states of both packed sequences and the reward model's rewards equal
  those of the two-row layout (rotary and learned positions, GPT-2 and Llama blocks, causal
  query blocks), including pairs where one sequence is a prefix of the other;
* the reward-model step on a packed batch gives the two-row step's loss, metrics and
  gradients (within 1e-5), and names a malformed packed batch.

``tests/test_train_reward_model.py`` checks a training run with ``model.pack_pairs`` under
``shard_map`` (8 forced host devices) against the two-row run, and the config field.
"""

import jax
import jax.numpy as jnp
from model_helpers import assert_same_sgd_step, bt_loss
import numpy as np
import optax
import pytest

from jaxrm.data import packing
from jaxrm.models import transformer
from jaxrm.models.reward_model import RewardModel
from jaxrm.steps import rm_step
from jaxrm.steps import train_state as ts

pytestmark = pytest.mark.usefixtures("xla_optimized")  # tests/conftest.py

VOCAB, SEQ = 40, 16
# Rows: prompt of 3, both continue; chosen all shared then rejected continues; one shared
# token; identical; rejected a strict prefix of chosen; right-padded to different lengths.
PREFIX = [3, 8, 1, 9, 6, 4]
CHOSEN_LEN = [10, 8, 4, 9, 14, 16]
REJECTED_LEN = [12, 13, 7, 9, 6, 11]


def _pairs(left_pad_rows=()):
  rng = np.random.default_rng(0)
  n = len(PREFIX)
  chosen = rng.integers(1, VOCAB, (n, SEQ))
  rejected = rng.integers(1, VOCAB, (n, SEQ))
  for i, p in enumerate(PREFIX):
    rejected[i, :p] = chosen[i, :p]
    rejected[i, p] = (chosen[i, p] % (VOCAB - 1)) + 1  # the first token that differs
  rejected[3] = chosen[3]  # identical (to their length 9)
  rejected[4, :6] = chosen[4, :6]  # rejected (6 tokens) is a prefix of chosen
  batch = {}
  for name, tokens, lengths in (
    ("chosen", chosen, CHOSEN_LEN),
    ("rejected", rejected, REJECTED_LEN),
  ):
    mask = np.arange(SEQ)[None] < np.asarray(lengths)[:, None]
    tokens = np.where(mask, tokens, 0)
    for i in left_pad_rows:
      tokens[i], mask[i] = np.roll(tokens[i], SEQ - lengths[i]), np.roll(mask[i], SEQ - lengths[i])
    batch[name], batch[f"{name}_mask"] = tokens.astype(np.int32), mask
  batch["weight"] = np.linspace(0.5, 1.5, n).astype(np.float32)
  batch["label"] = np.linspace(0.9, 0.2, n).astype(np.float32)
  return batch


def _real(tokens, mask):
  return [int(t) for t, m in zip(tokens, mask) if m]


@pytest.mark.parametrize("left_pad_rows", [(), (0, 2, 5)])
@pytest.mark.parametrize("multiple", [1, 8])
def test_pack_pairs_lays_out_the_common_prefix_then_both_rests(left_pad_rows, multiple):
  batch = _pairs(left_pad_rows)
  out = packing.pack_pairs(batch, multiple=multiple)
  longest = 0
  for i in range(len(PREFIX)):
    chosen = _real(batch["chosen"][i], batch["chosen_mask"][i])
    rejected = _real(batch["rejected"][i], batch["rejected_mask"][i])
    common = 0
    while common < min(len(chosen), len(rejected)) and chosen[common] == rejected[common]:
      common += 1
    expected = chosen + rejected[common:]
    segments = [0] * common + [1] * (len(chosen) - common) + [2] * (len(rejected) - common)
    assert common == PREFIX[i]  # the layouts the rows are meant to test
    n = len(expected)
    longest = max(longest, n)
    assert out["packed"][i, :n].tolist() == expected
    assert out["packed_segments"][i, :n].tolist() == segments
    assert out["packed_mask"][i, :n].all() and not out["packed_mask"][i, n:].any()
    assert (out["packed_segments"][i, n:] == -1).all() and (out["packed"][i, n:] == 0).all()
  assert out["packed"].shape[1] == -(-longest // multiple) * multiple
  assert out["packed"].dtype == out["packed_segments"].dtype == np.int32
  np.testing.assert_array_equal(out["weight"], batch["weight"])
  assert not set(out) & {"chosen", "chosen_mask", "rejected", "rejected_mask"}


def test_pack_pairs_pads_to_at_most_twice_the_input_length():
  batch = _pairs()
  out = packing.pack_pairs(batch, multiple=1000)
  assert out["packed"].shape == (len(PREFIX), 2 * SEQ)
  one = packing.pack_pairs(batch, multiple=1)
  np.testing.assert_array_equal(out["packed"][:, : one["packed"].shape[1]], one["packed"])


@pytest.mark.parametrize(
  "mutate, message",
  [
    (lambda b: b.pop("rejected_mask"), r"batch lacks \['rejected_mask'\]"),
    (lambda b: b.update(chosen=b["chosen"][:, :3]), r"batch\['chosen_mask'\] must have the shape"),
    (lambda b: b.update(rejected=b["rejected"][:2]), r"batch\['rejected'\] must have shape"),
  ],
)
def test_pack_pairs_rejects_a_malformed_batch(mutate, message):
  batch = _pairs()
  mutate(batch)
  with pytest.raises(ValueError, match=message):
    packing.pack_pairs(batch, multiple=8)


@pytest.mark.parametrize("multiple", [0, -8, True, 8.0])
def test_pack_pairs_rejects_a_bad_multiple(multiple):
  with pytest.raises(ValueError, match="multiple must be an int >= 1"):
    packing.pack_pairs(_pairs(), multiple=multiple)


BACKBONES = {
  "gpt2_learned": dict(position="learned", mlp="gelu", norm="layernorm"),
  "llama_gqa": dict(norm="rmsnorm", mlp="swiglu", num_kv_heads=1, qkv_bias=False),
  "rotary_blocks": dict(attention_query_block=8),
}


def _backbone(name):
  return transformer.TransformerConfig(
    vocab_size=VOCAB, width=32, num_layers=2, num_heads=2, max_len=SEQ, **BACKBONES[name]
  )


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_each_packed_sequence_has_its_two_row_hidden_states(name):
  batch = _pairs(left_pad_rows=(1,))
  model = transformer.Transformer(_backbone(name))
  params = model.init(jax.random.key(0), batch["chosen"], batch["chosen_mask"])
  out = packing.pack_pairs(batch, multiple=8)
  packed = model.apply(params, out["packed"], out["packed_mask"], segments=out["packed_segments"])
  seg = out["packed_segments"]
  for name_, branch in (("chosen", 1), ("rejected", 2)):
    rows = np.asarray(model.apply(params, batch[name_], batch[f"{name_}_mask"]))
    for i in range(len(PREFIX)):
      want = rows[i][batch[f"{name_}_mask"][i]]
      got = np.asarray(packed[i])[(seg[i] == 0) | (seg[i] == branch)]
      scale = np.abs(want).max()
      np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale, err_msg=f"{name_} {i}")


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_packed_rewards_equal_the_two_row_rewards(name):
  batch = _pairs()
  model = RewardModel(_backbone(name))
  params = model.init(jax.random.key(1), batch["chosen"], batch["chosen_mask"])
  out = packing.pack_pairs(batch, multiple=8)
  got = model.apply(params, out["packed"], out["packed_mask"], segments=out["packed_segments"])
  assert got.shape == (len(PREFIX), 2) and got.dtype == jnp.float32
  for column, name_ in enumerate(("chosen", "rejected")):
    want = model.apply(params, batch[name_], batch[f"{name_}_mask"])
    np.testing.assert_allclose(got[:, column], want, rtol=1e-5, atol=1e-6)


def test_packed_rewards_need_last_pooling_and_matching_segments():
  batch = _pairs()
  out = packing.pack_pairs(batch, multiple=8)
  model = RewardModel(_backbone("rotary_blocks"), pooling="mean")
  params = model.init(jax.random.key(1), batch["chosen"], batch["chosen_mask"])
  with pytest.raises(ValueError, match="packed pairs \\(segments\\) need pooling='last'"):
    model.apply(params, out["packed"], out["packed_mask"], segments=out["packed_segments"])
  model = RewardModel(_backbone("rotary_blocks"))
  with pytest.raises(ValueError, match="segments must have the shape of mask"):
    model.apply(params, out["packed"], out["packed_mask"], segments=out["packed_segments"][:, :4])
  with pytest.raises(ValueError, match="longer than 2 \\* max_len=32 \\(a packed row\\)"):
    long = jnp.zeros((2, 2 * SEQ + 1), jnp.int32)
    model.apply(params, long, long > -1, segments=long)
  with pytest.raises(ValueError, match="segments must be an integer array"):
    model.apply(params, out["packed"], out["packed_mask"], segments=out["packed_mask"] * 1.0)


def test_packed_step_gives_the_two_row_loss_metrics_and_gradients():
  # Without the identical pair: its tie (accuracy 1/2) holds in the packed layout, which reads
  # both rewards at one token, but two rows may round its rewards apart.
  batch = {k: np.delete(v, 3, axis=0) for k, v in _pairs().items()}
  model = RewardModel(_backbone("gpt2_learned"))
  params = model.init(jax.random.key(2), batch["chosen"], batch["chosen_mask"])
  step = jax.jit(
    lambda state, b: rm_step.reward_model_step(
      state, b, apply_fn=model.apply, loss_fn=bt_loss, optimizer=optax.sgd(1.0)
    )
  )
  state = ts.create_train_state(params, optax.sgd(1.0), jax.random.key(0))
  assert_same_sgd_step(
    params, step(state, batch), step(state, packing.pack_pairs(batch, multiple=8))
  )


def test_packed_step_names_a_malformed_packed_batch():
  pairs = _pairs()
  batch = packing.pack_pairs(pairs, multiple=8)
  del batch["packed_segments"]
  model = RewardModel(_backbone("rotary_blocks"))
  params = model.init(jax.random.key(2), pairs["chosen"], pairs["chosen_mask"])
  state = ts.create_train_state(params, optax.sgd(1.0), jax.random.key(0))
  with pytest.raises(ValueError, match="a packed batch needs"):
    rm_step.reward_model_step(
      state, batch, apply_fn=model.apply, loss_fn=bt_loss, optimizer=optax.sgd(1.0)
    )
