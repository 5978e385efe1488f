"""Microbatches: a step's forward and backward passes over consecutive slices of its batch.

The steps that take ``microbatch_size`` (:func:`jaxrm.steps.rm_step.reward_model_step`,
:func:`jaxrm.steps.dpo.dpo_step`, :func:`jaxrm.steps.sft.sft_step`) split each device's batch
into ``k`` slices of ``microbatch_size`` examples and run the forward and backward passes over
them one after another in a ``lax.scan`` (:func:`accumulate`), summing the gradients. Each
slice's loss is scaled by its share of the whole batch's loss (for a mean over examples,
``1 / k``), so the sum is the whole batch's loss and gradient up to float rounding, with the
activations of one slice alive at a time: gradient accumulation for a model whose batch does
not fit in an accelerator's memory, and on a CPU a step whose activations can stay in cache.
"""

from collections.abc import Callable
import functools
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp


def mark_varying(tree: Any, axis_name: Any) -> Any:
  """Marks device-invariant leaves as varying over ``axis_name`` (``lax.pcast``).

  Under ``shard_map`` with ``check_vma=True``, the gradient with respect to an invariant
  input is implicitly summed over the axis; marking the parameters varying first keeps the
  gradients per-device, exactly as under ``pmap``, so the explicit ``pmean`` is correct in
  every mode.
  """
  if axis_name is None:
    return tree
  axes = axis_name if isinstance(axis_name, tuple) else (axis_name,)

  def cast(x):
    varying = getattr(getattr(jax.typeof(x), "mat", None), "varying", frozenset())
    missing = tuple(a for a in axes if a not in varying)
    return lax.pcast(x, missing, to="varying") if missing else x

  return jax.tree.map(cast, tree)


def is_valid_size(size: int, batch: int) -> bool:
  """Whether slices of ``size`` examples (an int >= 0) run a (per-device) batch of ``batch``:
  0 (the whole batch, as the loops' configs write it), at least the batch, or a divisor."""
  return size == 0 or size >= batch or batch % size == 0


def num_slices(size: Any, batch: int, *, unit: str) -> int:
  """How many slices of ``size`` examples a step runs over its ``batch`` (per device) of
  ``unit`` (``'pairs'``, ``'sequences'``): 1 for ``None`` or a size of at least the batch.

  Raises:
    ValueError: naming ``microbatch_size`` unless it is ``None`` or a positive int that
      divides the batch or is at least that batch.
  """
  if size is None:
    return 1
  is_size = isinstance(size, int) and not isinstance(size, bool) and size >= 1
  if not (is_size and is_valid_size(size, batch)):
    raise ValueError(
      f"microbatch_size must be a positive int dividing the batch of {batch} {unit} (on each "
      f"device) or at least that batch, got {size!r}"
    )
  return 1 if size >= batch else batch // size


def split(tree: Any, k: int) -> Any:
  """Every leaf ``[b, ...]`` as ``[k, b // k, ...]``: ``k`` consecutive slices."""
  return jax.tree.map(lambda x: jnp.reshape(x, (k, jnp.shape(x)[0] // k, *jnp.shape(x)[1:])), tree)


def join(tree: Any) -> Any:
  """The inverse of :func:`split`: every leaf ``[k, m, ...]`` as ``[k * m, ...]``."""
  return jax.tree.map(lambda x: jnp.reshape(x, (-1, *jnp.shape(x)[2:])), tree)


def accumulate(
  grad_fn: Callable[..., Any],
  params: Any,
  parts: Any,
  shares: jax.Array,
  keys: jax.Array | None = None,
  *,
  axis_name: Any = None,
) -> tuple[jax.Array, Any, Any]:
  """Runs ``grad_fn`` over slices one after another and sums losses and gradients.

  Args:
    grad_fn: ``grad_fn(params, part, share, key) -> ((loss, out), grads)``, e.g.
      ``jax.value_and_grad(objective, has_aux=True)`` of an objective that scales a slice's
      loss by ``share``.
    params: the parameters (closed over: the same for every slice).
    parts: pytree of ``[k, ...]`` slices (:func:`split`).
    shares: ``[k]``, each slice's share of the whole batch's loss.
    keys: optional ``[k, ...]`` per-slice PRNG keys (``None``: ``grad_fn`` gets ``None``).
    axis_name: the mapped axis the step runs under (the accumulator is marked varying over
      it, the gradients' type under ``shard_map``'s ``check_vma``).

  Returns:
    ``(loss, outs, grads)``: the summed (scaled) losses, each slice's ``out`` stacked
    ``[k, ...]``, and the gradients summed in float32 or wider, in the parameters' dtypes.
  """

  def body(grad_sum, xs):
    part, share, key = xs
    (loss, out), grads = grad_fn(params, part, share, key)
    return jax.tree.map(lambda a, g: a + g.astype(a.dtype), grad_sum, grads), (loss, out)

  zeros = jax.tree.map(
    lambda p: jnp.zeros(jnp.shape(p), jnp.promote_types(p.dtype, jnp.float32)), params
  )
  zeros = mark_varying(zeros, axis_name)
  grads, (losses, outs) = lax.scan(body, zeros, (parts, shares, keys))
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
  return jnp.sum(losses), outs, grads


def slice_keys(key: jax.Array | None, k: int) -> jax.Array | None:
  """Slice ``i``'s key ``fold_in(key, i)`` for ``i < k`` (``None`` stays ``None``)."""
  if key is None:
    return None
  return jax.vmap(functools.partial(jax.random.fold_in, key))(jnp.arange(k))
