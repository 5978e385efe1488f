"""Tests for jaxrm.models.lora: qwix LoRA adapters on imported models, trainable heads, merge."""

import functools
import os

import jax
from model_helpers import bt_loss
import numpy as np
import optax
import pytest

from jaxrm.io import hf
from jaxrm.models import lora
from jaxrm.models.reward_model import RewardModel
from jaxrm.steps import train_state as ts
from jaxrm.steps.rm_step import reward_model_step

DATA = os.path.join(os.path.dirname(__file__), "data", "hf")
RANK, ALPHA = 2, 4.0


@pytest.fixture(scope="module")
def setup():
  base = hf.import_reward_model(os.path.join(DATA, "llama_reward"))
  tokens = np.load(os.path.join(DATA, "llama_reward", "reference_tokens.npy"))
  mask = np.load(os.path.join(DATA, "llama_reward", "reference_mask.npy"))
  model = lora.lora_model(RewardModel(base.config), rank=RANK, alpha=ALPHA)
  variables = lora.init_lora(model, base.variables, jax.random.key(0), tokens, mask)
  return base, model, variables, tokens, mask


def _flat(tree):
  return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_adapters_wrap_every_projection_and_start_at_the_base_model(setup):
  base, model, variables, tokens, mask = setup
  flat = _flat(variables)
  adapters = [k for k in flat if "_lora_" in k]
  assert len(adapters) == 2 * 2 * 7  # 2 layers x 7 projections x (A, B)
  assert all(not np.asarray(v).any() for k, v in flat.items() if k.endswith("_lora_b']"))
  want = RewardModel(base.config).apply(base.variables, tokens, mask)
  np.testing.assert_array_equal(model.apply(variables, tokens, mask), want)


def test_merge_lora_folds_adapters_into_kernels_exactly(setup):
  base, model, variables, tokens, mask = setup
  rng = np.random.default_rng(0)
  noisy = jax.tree_util.tree_map_with_path(
    lambda p, v: v + rng.normal(size=v.shape).astype(v.dtype) * 0.3 if lora.is_adapter(p) else v,
    variables,
  )
  got = model.apply(noisy, tokens, mask)
  merged = lora.merge_lora(noisy, rank=RANK, alpha=ALPHA)
  assert jax.tree.structure(merged) == jax.tree.structure(base.variables)
  want = RewardModel(base.config).apply(merged, tokens, mask)
  assert np.abs(np.asarray(got) - np.asarray(model.apply(variables, tokens, mask))).max() > 1e-2
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_reward_model_step_trains_only_adapters_and_head(setup):
  base, model, variables, tokens, mask = setup
  opt = lora.lora_optimizer(optax.adam(1e-2), variables)
  step = jax.jit(
    functools.partial(
      reward_model_step,
      apply_fn=lora.freeze_apply_fn(model.apply, variables),
      loss_fn=bt_loss,
      optimizer=opt,
    )
  )
  state = ts.create_train_state(variables, opt, jax.random.key(1))
  rng = np.random.default_rng(2)
  chosen = rng.integers(3, 320, size=(4, 12)).astype(np.int32)
  rejected = rng.integers(3, 320, size=(4, 12)).astype(np.int32)
  full = np.ones((4, 12), bool)
  batch = {"chosen": chosen, "chosen_mask": full, "rejected": rejected, "rejected_mask": full}
  losses = []
  for _ in range(5):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0]
  before, after = _flat(variables), _flat(state.params)
  trainable = _flat(lora.trainable_mask(variables))
  assert sum(np.asarray(v).size for k, v in before.items() if trainable[k]) < 0.2 * sum(
    np.asarray(v).size for v in before.values()
  )
  for k in before:
    changed = not np.array_equal(before[k], after[k])
    if trainable[k] and ("_lora_b" in k or "head" in k):
      assert changed, k
    if not trainable[k]:
      assert not changed, k


def test_bad_rank_and_alpha_are_rejected():
  cfg = hf.import_reward_model(os.path.join(DATA, "gpt2_reward")).config
  with pytest.raises(ValueError, match="rank must be a positive int"):
    lora.lora_model(RewardModel(cfg), rank=0, alpha=1.0)
  with pytest.raises(ValueError, match="alpha must be positive"):
    lora.lora_model(RewardModel(cfg), rank=2, alpha=0.0)
