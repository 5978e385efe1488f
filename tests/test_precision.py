"""Mixed-precision matmuls (jaxrm.models.precision) against float64 NumPy references."""

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrm.models import precision

SPECS = [
  ("mk,kn->mn", (6, 5), (5, 7)),
  ("btd,dhe->bthe", (2, 3, 4), (4, 2, 5)),  # a DenseGeneral projection
  ("bthe,hed->btd", (2, 3, 2, 5), (2, 5, 4)),  # the attention output projection
  ("nk,mk->mn", (6, 5), (7, 5)),  # a transposed operand and result
]


def _bf16(x) -> np.ndarray:
  """``x`` rounded to bfloat16, as float64."""
  return np.asarray(x, np.float32).astype(jnp.bfloat16).astype(np.float64)


def _operands(shape_a, shape_b, seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=shape_a).astype(np.float32), rng.normal(size=shape_b).astype(np.float32)


@pytest.mark.parametrize("spec, shape_a, shape_b", SPECS, ids=[s[0] for s in SPECS])
def test_mixed_einsum_is_the_float64_einsum_of_bfloat16_rounded_operands(spec, shape_a, shape_b):
  a, b = _operands(shape_a, shape_b)
  out = precision.mixed_einsum(spec, a, b)
  assert out.dtype == jnp.float32
  ref = np.einsum(spec, _bf16(a), _bf16(b))
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
  # ... and not the float32 einsum: the operands really were rounded.
  assert np.abs(np.einsum(spec, a.astype(np.float64), b.astype(np.float64)) - ref).max() > 1e-4


@pytest.mark.parametrize("spec, shape_a, shape_b", SPECS, ids=[s[0] for s in SPECS])
def test_mixed_einsum_gradients_use_the_bfloat16_cotangent_and_operands(spec, shape_a, shape_b):
  a, b = _operands(shape_a, shape_b)
  out_shape = np.einsum(spec, a, b).shape
  weights = np.random.default_rng(1).normal(size=out_shape).astype(np.float32)
  da, db = jax.grad(
    lambda a, b: jnp.sum(jnp.asarray(weights) * precision.mixed_einsum(spec, a, b)), (0, 1)
  )(a, b)
  assert da.dtype == db.dtype == jnp.float32
  operands, out = spec.split("->")
  sa, sb = operands.split(",")
  g = _bf16(weights)  # the cotangent of the sum is the weights, rounded to bfloat16
  np.testing.assert_allclose(
    np.asarray(da), np.einsum(f"{out},{sb}->{sa}", g, _bf16(b)), rtol=1e-5, atol=1e-5
  )
  np.testing.assert_allclose(
    np.asarray(db), np.einsum(f"{sa},{out}->{sb}", _bf16(a), g), rtol=1e-5, atol=1e-5
  )


DOT_GENERALS = [
  ((3, 4, 5), (5, 6), (((2,), (0,)), ((), ()))),  # flax Dense
  ((3, 4, 2, 5), (2, 5, 6), (((2, 3), (0, 1)), ((), ()))),  # DenseGeneral over two axes
  ((5, 3), (6, 5), (((0,), (1,)), ((), ()))),  # contracting axes in other positions
]


@pytest.mark.parametrize("shape_a, shape_b, dims", DOT_GENERALS)
def test_mixed_dot_general_matches_lax_dot_general_on_rounded_operands(shape_a, shape_b, dims):
  a, b = _operands(shape_a, shape_b)
  out = precision.mixed_dot_general(a, b, dims)
  ref = lax.dot_general(
    jnp.asarray(_bf16(a), jnp.float32),
    jnp.asarray(_bf16(b), jnp.float32),
    dims,
    precision=lax.Precision.HIGHEST,
  )
  assert out.dtype == jnp.float32 and out.shape == ref.shape
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
  # Gradients of the same quantity agree with autodiff of the float32 reference within
  # bfloat16 rounding of the cotangent (one part in 2^8).
  grads = jax.grad(lambda a, b: jnp.sum(jnp.sin(precision.mixed_dot_general(a, b, dims))), (0, 1))
  ref_grads = jax.grad(
    lambda a, b: jnp.sum(jnp.sin(lax.dot_general(a, b, dims, precision=lax.Precision.HIGHEST))),
    (0, 1),
  )
  for got, want in zip(grads(a, b), ref_grads(jnp.asarray(_bf16(a)), jnp.asarray(_bf16(b)))):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0.02, atol=0.05)


@pytest.mark.parametrize(
  "spec, message",
  [
    ("mk,kn", "two operands"),
    ("mk->m", "two operands"),
    ("mk,kn,np->mp", "two operands"),
    ("mk,kn->m", "index 'n' appears in only one"),
    ("mkk,kn->mn", "repeats within 'mkk'"),
    ("bmk,bkn->bmn", "index 'b' is a batch index"),
  ],
)
def test_bad_specs_are_named(spec, message):
  a = b = jnp.ones((2, 2))
  with pytest.raises(ValueError, match=message):
    precision.mixed_einsum(spec, a, b)


def test_batch_dimensions_are_refused_by_name():
  a = b = jnp.ones((4, 3, 3))
  with pytest.raises(ValueError, match=r"batch dimensions \(0,\), \(0,\)"):
    precision.mixed_dot_general(a, b, (((2,), (1,)), ((0,), (0,))))
