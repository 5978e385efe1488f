"""Matmuls with bfloat16 operands and float32 results, forward and backward.

``lax.dot_general(a, b, ..., preferred_element_type=jnp.float32)`` on bfloat16 operands is the
fast path of bfloat16 hardware (tensor cores, TPU MXUs, Intel AMX): bfloat16 products summed
in float32. Two things keep plain JAX off that path in a training step:

* a dot whose *result* is bfloat16 (what ``flax.linen.Dense(dtype=jnp.bfloat16)`` computes)
  is a different kernel; on XLA:CPU it runs below float32 speed;
* autodiff transposes a float32-result dot into dots of the float32 cotangent with the
  bfloat16 operand, which XLA runs in float32.

:func:`mixed_einsum` and :func:`mixed_dot_general` cast both operands to bfloat16, return
float32, and compute both gradients the same way (the cotangent cast to bfloat16), as
``torch.autocast`` does. ``benchmarks/peer_trl.py`` measures what this buys.
"""

from __future__ import annotations

import functools
import string

import jax
import jax.numpy as jnp

COMPUTE = jnp.bfloat16


def _mixed(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.einsum(spec, a.astype(COMPUTE), b.astype(COMPUTE), preferred_element_type=jnp.float32)


def mixed_einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """``jnp.einsum(spec, a, b)`` with bfloat16 operands and a float32 result.

  Args:
    spec: a two-operand spec ``"A,B->C"`` in which every index appears in exactly two of
      ``A``, ``B`` and ``C`` and at most once in each: no index summed or diagonalised within
      one operand, and no batch index (XLA:CPU has no kernel for some batched dots of this
      kind), e.g. ``"mk,kn->mn"`` or ``"btd,dhe->bthe"``.
    a: the first operand, any float dtype.
    b: the second operand.

  Returns:
    The float32 result. The gradients are the einsums ``"C,B->A"`` of the bfloat16
    cotangent with ``b`` and ``"A,C->B"`` with ``a``, bfloat16 operands and float32 results,
    cast to the operands' dtypes.

  Raises:
    ValueError: a spec outside that form, naming it.
  """
  operands, arrow, out = spec.partition("->")
  parts = operands.split(",")
  if not arrow or len(parts) != 2:
    raise ValueError(f"mixed_einsum needs a spec 'A,B->C' with two operands, got {spec!r}")
  for part in (*parts, out):
    if len(set(part)) != len(part):
      raise ValueError(f"mixed_einsum spec {spec!r}: an index repeats within {part!r}")
  for index in sorted(set(operands.replace(",", "") + out)):
    count = sum(index in part for part in (*parts, out))
    if count < 2:
      raise ValueError(
        f"mixed_einsum spec {spec!r}: index {index!r} appears in only one of A, B and C"
      )
    if count == 3:
      raise ValueError(
        f"mixed_einsum spec {spec!r}: index {index!r} is a batch index (in A, B and C); "
        "XLA:CPU has no kernel for some batched dots with bfloat16 operands and a float32 "
        "result"
      )
  return _mixed_einsum(spec, a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _mixed_einsum(spec, a, b):
  return _mixed(spec, a, b)


def _fwd(spec, a, b):
  return _mixed(spec, a, b), (a, b)


def _bwd(spec, res, g):
  a, b = res
  operands, out = spec.split("->")
  sa, sb = operands.split(",")
  da = _mixed(f"{out},{sb}->{sa}", g, b)
  db = _mixed(f"{sa},{out}->{sb}", a, g)
  return da.astype(a.dtype), db.astype(b.dtype)


_mixed_einsum.defvjp(_fwd, _bwd)


def mixed_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """``lax.dot_general`` with bfloat16 operands and a float32 result, as :func:`mixed_einsum`.

  A drop-in ``dot_general`` for ``flax.linen.Dense`` / ``DenseGeneral`` (their
  ``dot_general`` attribute); ``precision`` and ``preferred_element_type`` are ignored (the
  result is float32). The output axes are ``lax.dot_general``'s: ``lhs``'s free axes, then
  ``rhs``'s. No batch dimensions (:func:`mixed_einsum`).
  """
  del precision, preferred_element_type
  (lc, rc), (lb, rb) = dimension_numbers
  if len(lb) or len(rb):
    raise ValueError(
      f"mixed_dot_general: batch dimensions {tuple(lb)}, {tuple(rb)} are not supported "
      "(XLA:CPU has no kernel for some batched dots with bfloat16 operands and a float32 result)"
    )
  letters = iter(string.ascii_letters)
  sa = [""] * lhs.ndim
  sb = [""] * rhs.ndim
  for i, j in zip(lc, rc):
    sa[i] = sb[j] = next(letters)
  for axes in (sa, sb):
    for i, s in enumerate(axes):
      if not s:
        axes[i] = next(letters)
  free_a = "".join(s for i, s in enumerate(sa) if i not in lc)
  free_b = "".join(s for i, s in enumerate(sb) if i not in rc)
  return mixed_einsum(f"{''.join(sa)},{''.join(sb)}->{free_a}{free_b}", lhs, rhs)
