"""Model ensembles as stacked parameters: k members initialised and applied with ``jax.vmap``.

Generic over any pure ``init_fn(key, *args) -> params`` and ``apply_fn(params, *args)``
(flax ``model.init`` / ``model.apply``, haiku, equinox, hand-written). Members differ only
in their initialisation key; every leaf of the stacked parameters has a leading axis of
size k, so one jitted ``apply_ensemble`` evaluates all members in one program, and a
training step can ``vmap`` over the same axis.

Example::

  model = RewardModel(config)
  keys = jax.random.split(key, 4)
  params = init_ensemble(model.init, keys, tokens, mask)      # leaves [4, ...]
  apply = jax.jit(functools.partial(apply_ensemble, model.apply))
  rewards = apply(params, tokens, mask)                       # [4, batch]

References:
  Coste et al. 2023, "Reward Model Ensembles Help Mitigate Overoptimization".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxrm.math._arrays import is_concrete


def init_ensemble(init_fn: Callable[..., Any], keys: jax.Array, *args: Any) -> Any:
  """Initialises one member per key and stacks them.

  Args:
    init_fn: ``init_fn(key, *args) -> params``.
    keys: ``[k]`` typed PRNG keys (``jax.random.key``) or ``[k, 2]`` raw uint32 keys.
    *args: example inputs passed unchanged to every member's ``init_fn``.

  Returns:
    A params pytree whose leaves have a leading axis of size ``k``.
  """
  keys = jnp.asarray(keys)
  typed = jnp.issubdtype(keys.dtype, jax.dtypes.prng_key)
  message = f"keys must have shape [k] (typed keys) or [k, 2] (raw keys), got {keys.shape}"
  if keys.ndim != (1 if typed else 2):
    raise ValueError(message)
  if not typed:
    try:
      jax.random.wrap_key_data(keys)  # validates the raw key layout of the default PRNG
    except TypeError as e:
      raise ValueError(message) from e
  return jax.vmap(lambda key: init_fn(key, *args))(keys)


def ensemble_size(stacked_params: Any) -> int:
  """The number of members k (the leading axis shared by every leaf)."""
  sizes = {leaf.shape[0] if jnp.ndim(leaf) else None for leaf in jax.tree.leaves(stacked_params)}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(
      f"stacked_params leaves must share one leading axis, got leading sizes {sizes}"
    )
  return sizes.pop()


def apply_ensemble(apply_fn: Callable[..., Any], stacked_params: Any, *args: Any) -> Any:
  """Applies every member to the same inputs.

  Args:
    apply_fn: ``apply_fn(params, *args) -> outputs`` for one member.
    stacked_params: output of :func:`init_ensemble` (leaves ``[k, ...]``).
    *args: inputs shared by all members (not mapped).

  Returns:
    ``apply_fn``'s outputs with a leading axis ``k`` (e.g. rewards ``[k, batch]``).
  """
  ensemble_size(stacked_params)
  return jax.vmap(apply_fn, in_axes=(0,) + (None,) * len(args))(stacked_params, *args)


def member_params(stacked_params: Any, index: int | jax.Array) -> Any:
  """Parameters of member ``index`` (leaves without the leading ensemble axis).

  A concrete index (Python or NumPy int, or a concrete JAX scalar) is range-checked; a traced
  index is not (it is clamped by indexing).
  """
  k = ensemble_size(stacked_params)
  if is_concrete(index) and jnp.ndim(index) == 0 and not -k <= int(index) < k:
    raise ValueError(f"index must be in [-{k}, {k}), got {index}")
  return jax.tree.map(lambda leaf: leaf[index], stacked_params)
