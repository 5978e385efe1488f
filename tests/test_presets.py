"""Tests for jaxrm.models.presets: analytic parameter and FLOP counts against the real models."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrm.io import hf
from jaxrm.models import presets
from jaxrm.models.policy import PolicyModel
from jaxrm.models.presets import (
  PRESETS,
  flops_per_token,
  matmul_params,
  param_count,
  preset,
  preset_table,
)
from jaxrm.models.reward_model import RewardModel
from jaxrm.models.transformer import Transformer


def _tree(model, cfg):
  x = jnp.ones((1, 4), jnp.int32)
  return jax.eval_shape(model.init, jax.random.key(0), x, jnp.ones((1, 4), bool))["params"]


def _size(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("position", ["rotary", "learned"])
@pytest.mark.parametrize("name", list(PRESETS))
def test_param_count_matches_the_flax_parameter_tree(name, position):
  cfg = preset(name, position=position)
  assert param_count(cfg, head="reward") == _size(_tree(RewardModel(cfg), cfg))
  assert param_count(cfg, head="policy") == _size(_tree(PolicyModel(cfg), cfg))
  assert param_count(cfg, head="policy", value_head=True) == _size(
    _tree(PolicyModel(cfg, value_head=True), cfg)
  )
  assert param_count(cfg, head="none") == _size(_tree(Transformer(cfg), cfg))


@pytest.mark.parametrize("head", ["reward", "policy"])
def test_matmul_params_equal_the_kernel_sizes_of_the_tree(head):
  cfg = preset("small", vocab_size=97)
  model = RewardModel(cfg) if head == "reward" else PolicyModel(cfg)
  flat = jax.tree_util.tree_flatten_with_path(_tree(model, cfg))[0]
  kernels = sum(int(np.prod(leaf.shape)) for path, leaf in flat if path[-1].key == "kernel")
  assert matmul_params(cfg, head=head) == kernels


def _xla_flops(model, tokens, mask):
  params = jax.eval_shape(model.init, jax.random.key(0), tokens, mask)
  cost = jax.jit(model.apply).lower(params, tokens, mask).compile().cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]


def test_flops_per_token_agrees_with_xla_cost_analysis():
  """The formula counts every layer at every position: the work of a mean-pooled reward
  model. With last-token pooling the last layer computes only keys and values elsewhere, so
  XLA counts less (here, at least half of that layer's work is gone)."""
  cfg = preset("medium", max_len=64)
  tokens, mask = jnp.ones((2, 64), jnp.int32), jnp.ones((2, 64), bool)
  measured = _xla_flops(RewardModel(cfg, pooling="mean"), tokens, mask)
  analytic = flops_per_token(cfg, 64) * 2 * 64
  # XLA also counts element-wise work (norms, softmax, GELU): a few percent above the matmuls.
  assert analytic <= measured <= 1.1 * analytic, (measured, analytic)
  last = _xla_flops(RewardModel(cfg, pooling="last"), tokens, mask)
  assert last < (1 - 0.5 / cfg.num_layers) * measured, (last, measured)


def test_flops_per_token_formula():
  cfg = preset("tiny")
  w, L, T = cfg.width, cfg.num_layers, 100
  n = L * 12 * w * w + w
  assert flops_per_token(cfg, T) == 2 * n + 4 * L * T * w
  assert flops_per_token(cfg, T, backward=True) == 3 * (2 * n + 4 * L * T * w)
  assert (
    flops_per_token(cfg, T, head="policy") - flops_per_token(cfg, T, head="none")
    == 2 * w * cfg.vocab_size
  )


def test_module_docstring_table_is_current():
  assert preset_table() in presets.__doc__


def test_preset_sizes_and_overrides():
  cfg = preset("gpt2-small")
  assert (cfg.num_layers, cfg.width, cfg.num_heads, cfg.max_len) == (12, 768, 12, 1024)
  assert cfg.vocab_size == 259
  tiny = preset("tiny", vocab_size=16, max_len=12, position="learned", dtype=jnp.bfloat16)
  assert tiny == dataclasses.replace(
    preset("tiny"), vocab_size=16, max_len=12, position="learned", dtype=jnp.bfloat16
  )
  sizes = [param_count(preset(name)) for name in PRESETS]
  assert sizes == sorted(sizes)  # presets grow from tiny to gpt2-small


def test_presets_reject_unknown_names_and_fields():
  with pytest.raises(ValueError, match="name must be one of"):
    preset("huge")
  with pytest.raises(ValueError, match="unknown TransformerConfig fields.*layers"):
    preset("tiny", layers=3)
  with pytest.raises(ValueError, match="head must be one of"):
    param_count(preset("tiny"), head="value")
  with pytest.raises(ValueError, match="seq_len"):
    flops_per_token(preset("tiny"), 0)


def _family_configs():
  data = os.path.join(os.path.dirname(__file__), "data", "hf")
  return {n: hf.import_policy(os.path.join(data, n)).config for n in ("gpt2", "llama", "qwen2")}


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_param_count_matches_the_tree_for_checkpoint_families(family):
  cfg = _family_configs()[family]
  for mlp_bias in (False, True):
    c = dataclasses.replace(cfg, mlp_bias=mlp_bias, head_bias=mlp_bias)
    assert param_count(c, head="reward") == _size(_tree(RewardModel(c), c))
    assert param_count(c, head="policy", value_head=True) == _size(
      _tree(PolicyModel(c, value_head=True), c)
    )
  if not cfg.tie_embeddings:
    flat = jax.tree_util.tree_flatten_with_path(_tree(PolicyModel(cfg), cfg))[0]
    kernels = sum(int(np.prod(leaf.shape)) for path, leaf in flat if path[-1].key == "kernel")
    assert matmul_params(cfg, head="policy") == kernels
