"""Tests for jaxrm.models.ensemble: stacked-parameter ensembles equal k separate models."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrm.models.ensemble import apply_ensemble, ensemble_size, init_ensemble, member_params
from jaxrm.models.reward_model import RewardModel
from jaxrm.models.transformer import TransformerConfig

CFG = TransformerConfig(vocab_size=41, num_layers=1, width=16, num_heads=2, max_len=16)


def _linear_init(key, x):
  return {"w": jax.random.normal(key, (x.shape[-1], 3)), "b": jnp.zeros(3)}


def _linear_apply(params, x):
  return x @ params["w"] + params["b"]


def test_reward_model_ensemble_apply_equals_k_separate_applies():
  model = RewardModel(CFG)
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 41, size=(4, 9)).astype(np.int32)
  mask = np.arange(9)[None] >= np.array([[0], [2], [5], [1]])
  keys = jax.random.split(jax.random.key(0), 3)
  params = jax.jit(lambda k: init_ensemble(model.init, k, tokens, mask))(keys)
  assert ensemble_size(params) == 3
  rewards = jax.jit(functools.partial(apply_ensemble, model.apply))(params, tokens, mask)
  assert rewards.shape == (3, 4) and rewards.dtype == jnp.float32
  single = jax.jit(model.apply)
  for i in range(3):
    np.testing.assert_allclose(
      rewards[i], single(member_params(params, i), tokens, mask), atol=1e-5, rtol=1e-5
    )
  # members come from different keys, so they disagree
  assert np.abs(np.asarray(rewards[0] - rewards[1])).max() > 1e-3


@pytest.mark.parametrize("raw_keys", [False, True], ids=["typed", "raw"])
def test_init_ensemble_equals_stacked_separate_inits(raw_keys):
  keys = jax.random.split(jax.random.key(1), 4)
  if raw_keys:
    keys = jax.random.key_data(keys)
  x = np.random.default_rng(1).normal(size=(5, 2)).astype(np.float32)
  params = jax.jit(lambda k: init_ensemble(_linear_init, k, x))(keys)
  for i in range(4):
    key = keys[i] if not raw_keys else jax.random.wrap_key_data(keys[i])
    want = _linear_init(key, x)
    np.testing.assert_array_equal(params["w"][i], want["w"])
  out = jax.jit(functools.partial(apply_ensemble, _linear_apply))(params, x)
  want = np.einsum("nd,kdo->kno", x.astype(np.float64), np.asarray(params["w"], np.float64))
  assert out.shape == (4, 5, 3)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_member_params_selects_one_member_and_checks_the_index():
  params = {"w": jnp.arange(6.0).reshape(3, 2), "b": jnp.arange(3.0)}
  member = member_params(params, 1)
  np.testing.assert_array_equal(member["w"], [2.0, 3.0])
  assert float(member["b"]) == 1.0
  np.testing.assert_array_equal(member_params(params, -1)["w"], [4.0, 5.0])
  with pytest.raises(ValueError, match=r"index must be in \[-3, 3\), got 3"):
    member_params(params, 3)
  for index in (np.int64(7), jnp.asarray(-4)):  # e.g. from np.argmax: checked, not clamped
    with pytest.raises(ValueError, match=r"index must be in \[-3, 3\)"):
      member_params(params, index)
  np.testing.assert_array_equal(member_params(params, np.int64(2))["w"], [4.0, 5.0])


def test_ensemble_rejects_bad_keys_and_ragged_params():
  with pytest.raises(ValueError, match=r"keys.*\(2, 3\)"):
    init_ensemble(_linear_init, jnp.zeros((2, 3), jnp.uint32), np.ones((1, 2)))
  with pytest.raises(ValueError, match=r"keys.*\(2, 2\)"):
    init_ensemble(
      _linear_init, jax.random.split(jax.random.key(0), 4).reshape(2, 2), np.ones((1, 2))
    )
  with pytest.raises(ValueError, match="stacked_params.*leading"):
    apply_ensemble(
      _linear_apply, {"w": jnp.zeros((3, 2, 3)), "b": jnp.zeros((2, 3))}, np.ones((1, 2))
    )
