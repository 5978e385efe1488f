"""Tests for jaxrm.models.distributional_rm: output layout, readouts, losses, padding, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrm.math import distributional as dist
from jaxrm.models.distributional_rm import DistributionalRewardModel, Head
from jaxrm.models.reward_model import RewardModel, pool_hidden
from jaxrm.models.transformer import Transformer, TransformerConfig

CFG = TransformerConfig(vocab_size=11, num_layers=1, width=16, num_heads=2, max_len=8)
TOKENS = jax.random.randint(jax.random.key(1), (4, 8), 0, 11)
MASK = jnp.ones((4, 8), bool)


@pytest.mark.parametrize(
  "head, width", [(Head("mean_variance"), 2), (Head("categorical", num_atoms=7), 7)]
)
def test_outputs_have_the_heads_layout_and_positive_std(head, width):
  model = DistributionalRewardModel(CFG, head=head)
  params = model.init(jax.random.key(0), TOKENS, MASK)
  out = model.apply(params, TOKENS, MASK)
  assert out.shape == (4, width) and out.dtype == jnp.float32
  assert params["params"]["head"]["kernel"].shape == (16, width)
  assert np.all(np.asarray(head.std(out)) > 0)
  assert head.mean(out).shape == head.quantile(out, alpha=0.01).shape == (4,)
  assert np.all(np.asarray(head.quantile(out, alpha=0.01)) <= np.asarray(head.mean(out)) + 1e-6)


def test_backbone_has_reward_models_layout():
  # The same backbone parameters work in both models (only the head differs).
  params = RewardModel(CFG).init(jax.random.key(0), TOKENS, MASK)
  dparams = DistributionalRewardModel(CFG, head=Head("mean_variance")).init(
    jax.random.key(0), TOKENS, MASK
  )
  shapes = lambda t: jax.tree.map(jnp.shape, t)
  assert shapes(params["params"]["backbone"]) == shapes(dparams["params"]["backbone"])


def test_mean_variance_outputs_are_mean_and_softplus_std():
  head = Head("mean_variance", min_std=0.05)
  model = DistributionalRewardModel(CFG, head=head)
  params = model.init(jax.random.key(0), TOKENS, MASK)
  out = model.apply(params, TOKENS, MASK)
  # Recompute the head by hand from the pooled features of the backbone.
  feats = Transformer(CFG).apply({"params": params["params"]["backbone"]}, TOKENS, MASK)
  pooled = np.asarray(pool_hidden(feats, MASK), np.float64)
  raw = pooled @ np.asarray(params["params"]["head"]["kernel"]) + np.asarray(
    params["params"]["head"]["bias"]
  )
  np.testing.assert_allclose(out[:, 0], raw[:, 0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out[:, 1], np.logaddexp(0, raw[:, 1]) + 0.05, rtol=1e-5)


def test_outputs_do_not_depend_on_padding():
  head = Head("categorical", num_atoms=5)
  model = DistributionalRewardModel(CFG, head=head)
  tokens, mask = TOKENS[:, :6], jnp.ones((4, 6), bool)
  params = model.init(jax.random.key(0), tokens, mask)
  padded = jnp.concatenate([tokens, jnp.zeros((4, 2), tokens.dtype)], axis=1)
  pmask = jnp.concatenate([mask, jnp.zeros((4, 2), bool)], axis=1)
  np.testing.assert_allclose(
    model.apply(params, tokens, mask), model.apply(params, padded, pmask), rtol=1e-5, atol=1e-6
  )


@pytest.mark.parametrize("kind", ["mean_variance", "categorical"])
def test_loss_fn_is_the_math_loss_and_training_lowers_it(kind):
  head = Head(kind, num_atoms=5)
  model = DistributionalRewardModel(CFG, head=head)
  params = model.init(jax.random.key(0), TOKENS, MASK)
  loss_fn = head.loss_fn(entropy_coef=0.1) if kind == "categorical" else head.loss_fn()
  out = model.apply(params, TOKENS, MASK)
  oc, orj = out[:2], out[2:]
  if kind == "mean_variance":
    want = dist.mean_variance_loss(oc[:, 0], oc[:, 1], orj[:, 0], orj[:, 1])
  else:
    want = dist.categorical_loss(oc, orj, atoms=head.atoms, entropy_coef=0.1)
  np.testing.assert_allclose(loss_fn(oc, orj), want, rtol=1e-6)

  def objective(p):
    o = model.apply(p, TOKENS, MASK)
    return loss_fn(o[:2], o[2:])

  opt = optax.adam(1e-2)

  @jax.jit
  def update(params, state):
    updates, state = opt.update(jax.grad(objective)(params), state)
    return optax.apply_updates(params, updates), state

  state = opt.init(params)
  first = float(objective(params))
  for _ in range(20):
    params, state = update(params, state)
  assert float(objective(params)) < first


def test_bad_settings_and_outputs_raise_clear_errors():
  with pytest.raises(ValueError, match="Head.kind must be one of"):
    Head("gaussian")
  with pytest.raises(ValueError, match="Head.num_atoms must be an int >= 2, got 1"):
    Head("categorical", num_atoms=1)
  with pytest.raises(ValueError, match="Head.atom_low must be < atom_high"):
    Head("categorical", atom_low=1.0, atom_high=1.0)
  with pytest.raises(ValueError, match=r"must have shape \[batch, 2\], got \(4, 3\)"):
    Head("mean_variance").mean(jnp.zeros((4, 3)))
  with pytest.raises(ValueError, match="entropy_coef applies to the categorical head only"):
    Head("mean_variance").loss_fn(entropy_coef=0.1)
  with pytest.raises(ValueError, match=r"outputs_rejected must have the shape of outputs_chosen"):
    Head("mean_variance").loss_fn()(jnp.ones((4, 2)), jnp.ones((3, 2)))
