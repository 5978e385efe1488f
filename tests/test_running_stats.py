"""Tests for jaxrm.math.running_stats: running mean/variance against NumPy, exact in any sharding."""

import functools

import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from jaxrm.math import running_stats as rs


def test_running_moments_equal_the_population_moments_of_everything_seen():
  rng = np.random.default_rng(0)
  batches = [rng.normal(3.0, 2.0, size=n) for n in (5, 1, 17, 8)]
  state = rs.running_moments_init()
  update = jax.jit(rs.running_moments_update)
  for i, b in enumerate(batches):
    state = update(state, b.astype(np.float32))
    seen = np.concatenate(batches[: i + 1])
    np.testing.assert_allclose(state.count, seen.size)
    np.testing.assert_allclose(state.mean, seen.mean(), rtol=1e-5)
    np.testing.assert_allclose(rs.variance(state), seen.var(), rtol=1e-5)
  x = rng.normal(size=4)
  seen = np.concatenate(batches)
  np.testing.assert_allclose(
    rs.normalize(x, state), (x - seen.mean()) / np.sqrt(seen.var() + 1e-8), rtol=1e-5
  )
  np.testing.assert_allclose(
    rs.normalize(x, state, shift_mean=False),
    (x - seen.mean()) / np.sqrt(seen.var() + 1e-8) + seen.mean(),
    rtol=1e-5,
  )


def test_sharded_update_equals_the_global_batch_update():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  x = np.random.default_rng(1).normal(size=(16,)).astype(np.float32)
  state = rs.running_moments_update(rs.running_moments_init(), np.array([1.0, 4.0], np.float32))
  sharded = jax.jit(
    jax.shard_map(
      functools.partial(rs.running_moments_update, axis_name="data"),
      mesh=mesh,
      in_specs=(P(), P("data")),
      out_specs=P(),
      check_vma=False,
    )
  )
  got, want = sharded(state, x), rs.running_moments_update(state, x)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_empty_batch_is_rejected():
  with pytest.raises(ValueError, match="x must be non-empty"):
    rs.running_moments_update(rs.running_moments_init(), np.zeros((0,)))
