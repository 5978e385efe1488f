"""Array helpers shared by the math modules (private)."""

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


def as_float(x: ArrayLike) -> jax.Array:
  """Returns ``x`` as an inexact array, keeping float64 / float32 and upcasting the rest."""
  x = jnp.asarray(x)
  return x.astype(jnp.result_type(x.dtype, jnp.float32))
