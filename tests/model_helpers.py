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
