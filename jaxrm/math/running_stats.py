"""Running mean and variance (Chan et al.'s parallel update), for reward normalisation in RL.

A :class:`RunningMoments` state accumulates the count, mean and sum of squared deviations of
every value seen; :func:`running_moments_update` merges a batch (the global batch under
``axis_name``) exactly, so the statistics after ``T`` batches equal the population mean and
variance of all ``T`` batches together, in any sharding. :func:`normalize` standardises with
them. The state is a pytree of scalars, checkpointed with the run (``RLState.reward_stats``).

References:
  Chan, Golub and LeVeque, "Updating Formulae and a Pairwise Algorithm for Computing Sample
  Variances", 1979.
"""

from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxrm.math._arrays import as_float


class RunningMoments(NamedTuple):
  """Count, mean and sum of squared deviations of the values seen so far."""

  count: jax.Array  # shape=(), float32
  mean: jax.Array  # shape=(), float32
  m2: jax.Array  # shape=(), float32; sum of squared deviations from the mean


def running_moments_init() -> RunningMoments:
  """The empty state (count 0, mean 0, variance 0)."""
  zero = jnp.zeros((), jnp.float32)
  return RunningMoments(count=zero, mean=zero, m2=zero)


def running_moments_update(
  state: RunningMoments, x: ArrayLike, *, axis_name: str | None = None
) -> RunningMoments:
  """Merges the values ``x`` (any shape; all of them, global under ``axis_name``) into ``state``.

  With ``n``, ``m`` and ``M2`` the batch's count, mean and sum of squared deviations,
  ``delta = m - mean``: ``count' = count + n``, ``mean' = mean + delta n / count'``,
  ``M2' = M2 + M2_b + delta^2 count n / count'`` (Chan et al. 1979).
  """
  x = as_float(x).astype(jnp.float32)
  if x.size == 0:
    raise ValueError("x must be non-empty")

  def total(v):
    return v if axis_name is None else lax.psum(v, axis_name)

  n = total(jnp.asarray(x.size, jnp.float32))
  batch_mean = total(jnp.sum(x)) / n
  batch_m2 = total(jnp.sum(jnp.square(x - batch_mean)))
  count = state.count + n
  delta = batch_mean - state.mean
  mean = state.mean + delta * n / count
  m2 = state.m2 + batch_m2 + jnp.square(delta) * state.count * n / count
  return RunningMoments(count=count, mean=mean, m2=m2)


def variance(state: RunningMoments) -> jax.Array:
  """Population variance ``M2 / count`` of the values seen (0 before any)."""
  return state.m2 / jnp.maximum(state.count, 1.0)


def normalize(
  x: ArrayLike, state: RunningMoments, *, eps: float = 1e-8, shift_mean: bool = True
) -> jax.Array:
  """``(x - mean) / sqrt(var + eps)`` with the running statistics (``shift_mean=False``: the
  mean is kept and only the scale changes)."""
  x = as_float(x)
  scaled = (x - state.mean) * lax.rsqrt(variance(state) + eps)
  return scaled + state.mean if not shift_mean else scaled
