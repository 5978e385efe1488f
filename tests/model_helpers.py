"""Helpers shared by the model tests."""

import jax
import jax.numpy as jnp
import numpy as np


def random_params(model, shape, seed=0, scale=0.2):
  """Random parameters with the model's tree (eval_shape: no init compile, keeps tests fast).

  LayerNorm scales are drawn around 1, every other leaf around 0.
  """
  tree = jax.eval_shape(
    model.init, jax.random.key(0), jnp.ones(shape, jnp.int32), jnp.ones(shape, bool)
  )
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    x = rng.normal(size=leaf.shape) * scale
    return jnp.asarray(1.0 + x if path[-1].key == "scale" else x, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, tree)


def bt_loss(rc, rr, *, weights=None, labels=None):
  """Bradley–Terry loss, weighted mean sum(w * l) / sum(w) (the jaxrm.math.preference convention).

  l = -[y log s(d) + (1 - y) log s(-d)], d = rc - rr.
  """
  d = rc - rr
  y = jnp.ones_like(d) if labels is None else labels
  w = jnp.ones_like(d) if weights is None else weights
  losses = -(y * jax.nn.log_sigmoid(d) + (1 - y) * jax.nn.log_sigmoid(-d))
  return jnp.sum(w * losses) / jnp.sum(w)


def assert_same_sgd_step(params, want, got):
  """Two ``(state, metrics)`` results of an ``optax.sgd(1.0)`` reward-model step from
  ``params``: the same loss, accuracy, margin and gradient norm (rtol 1e-5), and the same
  gradients (the update is minus the gradient; within 1e-5 of the largest entry)."""
  (want_state, want_metrics), (got_state, got_metrics) = want, got
  for key in ("loss", "accuracy", "margin", "grad_norm"):
    np.testing.assert_allclose(got_metrics[key], want_metrics[key], rtol=1e-5, err_msg=key)
  grads = jax.tree.map(lambda a, b: np.asarray(a - b), params, want_state.params)
  got_grads = jax.tree.map(lambda a, b: np.asarray(a - b), params, got_state.params)
  scale = max(np.abs(g).max() for g in jax.tree.leaves(grads))
  assert scale > 1e-3  # the step moved the parameters
  for w, g in zip(jax.tree.leaves(grads), jax.tree.leaves(got_grads), strict=True):
    np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * scale)
