"""Training state and a non-finite-safe optimizer update shared by all training steps.

A :class:`TrainState` holds everything a step changes (parameters, optimizer state, step
counter, count of skipped updates) plus the run's base PRNG key. :func:`apply_if_finite` is the
one place where an optax update is applied; it refuses an update unless the loss, the
gradients, the update itself, the new parameters and the new optimizer state are all finite,
entirely inside ``jit`` (no host synchronisation), so neither a bad batch nor a bad
hyperparameter (``learning_rate=inf``, an overflowing step) can poison the parameters. The host loop reads ``metrics['nonfinite']`` after the step and, in ``'raise'``
mode, calls :func:`raise_if_nonfinite`.

Example::

  state = create_train_state(params, optax.adamw(1e-3), jax.random.key(0))
  loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
  state, nonfinite = apply_if_finite(state, grads, loss, optimizer)
"""

import functools
from typing import Any, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax

NONFINITE_MODES = ("skip", "raise")


class TrainState(NamedTuple):
  """State of a gradient-based training run.

  Attributes:
    step: number of steps taken (including skipped ones).  # shape=(), int32
    params: model parameters pytree.
    opt_state: optax optimizer state for ``params``.
    key: base PRNG key of the run; step ``t`` uses ``jax.random.fold_in(key, t)``.
    num_skipped: number of updates not applied because the loss, a gradient, the update or
      the new parameters or optimizer state were not finite.  # shape=(), int32
  """

  step: jax.Array  # shape=(), int32
  params: Any
  opt_state: Any
  key: jax.Array
  num_skipped: jax.Array  # shape=(), int32


def create_train_state(
  params: Any,
  optimizer: optax.GradientTransformation,
  key: jax.Array,
) -> TrainState:
  """Creates a :class:`TrainState` at step 0.

  Args:
    params: model parameters pytree.
    optimizer: optax gradient transformation; its state is initialised from ``params``.
    key: PRNG key, typed (``jax.random.key``) or raw ``uint32[2]`` (``jax.random.PRNGKey``).

  Returns:
    A ``TrainState`` with ``step = 0`` and ``num_skipped = 0`` (int32 scalars).
  """
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and (
    key.dtype != jnp.uint32 or key.ndim != 1
  ):
    raise ValueError(
      "key must be a typed PRNG key (jax.random.key) or a raw uint32 key "
      f"(jax.random.PRNGKey), got dtype {key.dtype} and shape {key.shape}"
    )
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=optimizer.init(params),
    key=key,
    num_skipped=jnp.zeros((), jnp.int32),
  )


def step_key(state: Any) -> jax.Array:
  """Returns the PRNG key of the current step, ``fold_in(state.key, state.step)``."""
  return jax.random.fold_in(state.key, state.step)


# Leaves of at most this many elements are checked together (see tree_all_finite). Small, so
# that a sharded model's weight matrices are checked where they lie, not gathered to be joined.
CHECK_TOGETHER_MAX_SIZE = 1 << 16


def tree_all_finite(tree: Any) -> jax.Array:
  """Returns a bool scalar: True iff every inexact leaf of ``tree`` is finite everywhere.

  The leaves of at most :data:`CHECK_TOGETHER_MAX_SIZE` elements are flattened and checked as
  one array per dtype; larger leaves are checked in one reduction per shape, over the
  elementwise ``and`` of their ``isfinite``, so no large leaf is copied. XLA compiles a kernel
  per reduction, and a training step checks many small leaves (146 at the README HH model):
  checked one by one, they added about 4 s to that step's first call (BUILD_NOTES.md, "The
  non-finite guard's compile cost"). One reduction per shape reads a parameter, its gradient,
  update and optimizer moments in one pass, into which XLA fuses the computation of the
  values it checks (:func:`apply_if_finite`).
  """
  small: dict[Any, list[jax.Array]] = {}
  large: dict[tuple[int, ...], list[jax.Array]] = {}
  for x in jax.tree.leaves(tree):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
      continue
    if x.size <= CHECK_TOGETHER_MAX_SIZE:
      small.setdefault(x.dtype, []).append(jnp.ravel(x))
    else:
      large.setdefault(x.shape, []).append(jnp.isfinite(x))
  flags = [jnp.all(functools.reduce(jnp.logical_and, xs)) for xs in large.values()]
  flags += [jnp.all(jnp.isfinite(jnp.concatenate(xs))) for xs in small.values()]
  if not flags:
    return jnp.array(True)
  # Combined as integers: XLA:CPU rewrites a boolean reduction over stacked flags into a chain
  # of ``and``s and copies that chain into the fusion of every leaf that the flag selects, a
  # program quadratic in the number of flags (220,000 of the 268,000 instructions of an RM step
  # at GPT-2 small's shape), which costs compile and load time. An integer minimum stays one
  # reduction (BUILD_NOTES.md, "session 41").
  return jnp.min(jnp.stack(flags).astype(jnp.int32)) > 0


def _replace(state: Any, **fields: Any) -> Any:
  if hasattr(state, "_replace"):  # NamedTuple
    return state._replace(**fields)
  if hasattr(state, "replace"):  # flax.struct.dataclass
    return state.replace(**fields)
  raise TypeError(
    "state must be a NamedTuple or flax.struct.dataclass with fields step, params, "
    f"opt_state, num_skipped; got {type(state).__name__}"
  )


def apply_if_finite(
  state: Any,
  grads: Any,
  loss: jax.typing.ArrayLike,
  optimizer: optax.GradientTransformation,
  *,
  nonfinite: str = "skip",
  axis_name: Any = None,
) -> tuple[Any, jax.Array]:
  """Applies an optax update unless anything it would write is not finite.

  The update is refused when the loss, a gradient, the optax update, a new parameter or a
  new optimizer-state leaf is NaN/inf. Checking the update and its results, not only the
  inputs, catches bad hyperparameters (``learning_rate=inf`` turns finite gradients into an
  infinite update) and float overflow (a finite update that carries a parameter past the
  dtype's largest value).

  Pure and jit-compatible: the decision is a traced boolean (no host synchronisation). When
  every parameter leaf is small (at most :data:`CHECK_TOGETHER_MAX_SIZE` elements) the update
  is computed once and selected with ``jnp.where``. With a larger leaf (an embedding of a
  subword vocabulary) it is computed twice: once for the checks, which XLA fuses into their
  reductions (:func:`tree_all_finite`: one pass over each shape's inputs, nothing stored),
  and again under ``lax.cond`` where it is applied, so the large leaves' new state is written
  once and never selected element by element; there the checks and the selection had cost
  twice the update itself (BUILD_NOTES.md, "Issue 14, session 51"). Both give the same
  state; under ``vmap`` the cond becomes a select of its two branches.

  Behaviour when the update is refused:

  * ``nonfinite='skip'``: params and opt_state are left unchanged, ``num_skipped`` is
    incremented and ``step`` advances, so training continues with the next batch (and the
    next step key).
  * ``nonfinite='raise'``: the whole input state is returned unchanged (``step`` included,
    so ``state.step`` names the failing step and re-running it is exactly reproducible). The
    host loop must check the returned flag (``metrics['nonfinite']``) and raise, e.g. with
    :func:`raise_if_nonfinite`.

  When everything is finite both modes apply the update, advance ``step`` and leave
  ``num_skipped``.

  Args:
    state: a ``TrainState`` or any NamedTuple / ``flax.struct.dataclass`` with fields
      ``step``, ``params``, ``opt_state`` and ``num_skipped``; other fields pass through.
    grads: gradients, same structure as ``state.params``; already averaged over devices.
    loss: scalar loss (already averaged over devices).
    optimizer: optax gradient transformation whose state is ``state.opt_state``.
    nonfinite: ``'skip'`` or ``'raise'`` (see above).
    axis_name: optional mapped axis name(s). When given, the finite flag is combined with
      ``lax.pmin`` over it, so that every device takes the same decision even if the caller
      did not average some input (or its shard of the new parameters overflowed alone).

  Returns:
    ``(new_state, is_nonfinite)`` with ``is_nonfinite`` a bool scalar.
  """
  if nonfinite not in NONFINITE_MODES:
    raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
  loss = jnp.asarray(loss)
  if loss.shape != ():
    raise ValueError(f"loss must be a scalar, got shape {loss.shape}")

  def update():
    updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
    return updates, optax.apply_updates(state.params, updates), new_opt_state

  updates, new_params, new_opt_state = update()
  finite = tree_all_finite((loss, grads, updates, new_params, new_opt_state))
  if axis_name is not None:
    finite = lax.pmin(finite.astype(jnp.int32), axis_name).astype(bool)
  old = (state.params, state.opt_state)
  if any(jnp.size(x) > CHECK_TOGETHER_MAX_SIZE for x in jax.tree.leaves(state.params)):
    params, opt_state = lax.cond(finite, lambda: update()[1:], lambda: old)
  else:
    select = lambda new, old: jnp.where(finite, new, old)
    params, opt_state = jax.tree.map(select, (new_params, new_opt_state), old)
  skipped = jnp.logical_not(finite).astype(jnp.int32)
  if nonfinite == "skip":
    step = state.step + 1
    num_skipped = state.num_skipped + skipped
  else:
    step = state.step + finite.astype(state.step.dtype)
    num_skipped = state.num_skipped
  new_state = _replace(
    state, step=step, params=params, opt_state=opt_state, num_skipped=num_skipped
  )
  return new_state, jnp.logical_not(finite)


def raise_if_nonfinite(metrics: Any, *, step: Any) -> None:
  """Host-side check: raises ``FloatingPointError`` if ``metrics['nonfinite']`` is set.

  This transfers one scalar from the device (a synchronisation point); call it after every
  step in ``'raise'`` mode, or after each metrics fetch to amortise the cost.

  Args:
    metrics: metrics dict returned by a step (unreplicated; e.g. via
      ``ParallelStep.unreplicate``), containing a bool ``'nonfinite'``.
    step: the step the metrics belong to (the input ``state.step``), named in the error.
  """
  flag = np.asarray(jax.device_get(metrics["nonfinite"]))
  if flag.any():
    loss = metrics.get("loss")
    loss_str = "" if loss is None else f" (loss={np.asarray(jax.device_get(loss))})"
    raise FloatingPointError(
      "non-finite loss, gradient, update or new parameters at step "
      f"{int(np.asarray(jax.device_get(step)).ravel()[0])}{loss_str}; the update was not applied"
    )
