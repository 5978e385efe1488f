"""Array helpers shared by the math modules (private): conversion and input validation.

Value checks (range, finiteness) can only run on concrete arrays: under ``jax.jit`` (or any
transformation) the values do not exist at trace time. The ``check_*`` helpers therefore raise
a one-line ``ValueError`` naming the argument when called eagerly and do nothing on tracers;
functions that must not return a silently wrong number under ``jit`` pair them with
:func:`nan_where_invalid`, so that an invalid entry turns its result into NaN (which the
training steps refuse, see :func:`jaxrm.steps.train_state.apply_if_finite`).
"""

from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import numpy as np

_NUMERIC_KINDS = "biufc"  # bool, signed, unsigned, float, complex


def is_concrete(x: Any) -> bool:
  """True when ``x`` holds actual values (not a tracer inside jit/vmap/grad/eval_shape)."""
  return not isinstance(x, jax.core.Tracer)


def is_int(x: Any) -> bool:
  """A Python or NumPy integer, not a bool."""
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def as_float(x: ArrayLike, name: str = "input") -> jax.Array:
  """Returns ``x`` as an inexact array, keeping float64 / float32 and upcasting the rest.

  Args:
    x: a numeric array-like (bool, integer or floating).
    name: the argument's name, used in the error message.

  Raises:
    ValueError: ``x`` is not numeric (strings, objects, ragged nested lists), naming ``name``.
  """
  if not isinstance(x, jax.Array):
    try:
      host = np.asarray(x)
    except (ValueError, TypeError) as e:
      raise ValueError(f"{name} must be a numeric array, got {type(x).__name__}: {e}") from None
    if host.dtype.kind not in _NUMERIC_KINDS:
      raise ValueError(f"{name} must be a numeric array, got dtype {host.dtype}")
  x = jnp.asarray(x)
  return x.astype(jnp.result_type(x.dtype, jnp.float32))


def check_in_range(
  x: jax.Array, name: str, *, low: float | None = None, high: float | None = None
) -> None:
  """Raises ``ValueError`` if concrete ``x`` has an entry outside ``[low, high]`` (or NaN).

  Tracers are not checked (see the module docstring).
  """
  if not is_concrete(x) or x.size == 0:
    return
  values = np.asarray(x)
  bad = np.isnan(values)
  if low is not None:
    bad |= values < low
  if high is not None:
    bad |= values > high
  if bad.any():
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    where = f" at index {index}" if values.ndim else ""
    bounds = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
    raise ValueError(
      f"{name} must lie in {bounds}, got {values[index] if values.ndim else values}{where}"
    )


def check_number(
  value: Any,
  name: str,
  *,
  gt: float | None = None,
  ge: float | None = None,
  lt: float | None = None,
  le: float | None = None,
  expected: str | None = None,
) -> None:
  """Raises ``ValueError`` naming ``name`` unless ``value`` is numeric and every entry satisfies
  the given bounds (``> gt``, ``>= ge``, ``< lt``, ``<= le``; NaN fails any bound).

  For hyperparameters: a Python number, a NumPy scalar or a concrete JAX array are checked
  alike; a tracer (under ``jit``) is not. The message says ``<name> must be <expected>, got
  <value>``; ``expected`` defaults to the bounds (``> 0``, ``in [0, 0.5]``).
  """
  if not is_concrete(value):
    return
  try:
    values = np.asarray(value)
  except (ValueError, TypeError):
    values = np.asarray(None)
  if values.dtype.kind not in "iuf":  # not bool, str, object
    raise ValueError(f"{name} must be a number, got {value!r}")
  ok = np.ones(values.shape, bool)
  for bound, op in ((gt, np.greater), (ge, np.greater_equal), (lt, np.less), (le, np.less_equal)):
    if bound is not None:
      ok &= op(values, bound)
  if not ok.all():
    if expected is None:
      lo = ("(", gt) if gt is not None else ("[", ge)
      hi = (lt, ")") if lt is not None else (le, "]")
      if lo[1] is not None and hi[0] is not None:
        expected = f"in {lo[0]}{lo[1]}, {hi[0]}{hi[1]}"
      else:
        bounds = ((">", gt), (">=", ge), ("<", lt), ("<=", le))
        expected = " and ".join(f"{op} {b}" for op, b in bounds if b is not None)
    shown = values if values.ndim == 0 else values[~ok][0]
    raise ValueError(f"{name} must be {expected}, got {shown}")


def key_shape(key: Any, name: str = "key") -> tuple[int, ...]:
  """The shape of an array of JAX PRNG keys (``()``: one key): typed keys (``jax.random.key``)
  or raw ``uint32`` key data (``jax.random.PRNGKey``, the key data on a trailing axis).
  Raises ``ValueError`` naming ``name`` if ``key`` is neither. Tracers have shapes and dtypes
  too, so this works under ``jit``."""
  dtype = getattr(key, "dtype", None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return tuple(key.shape)
  if dtype == np.uint32 and np.ndim(key) >= 1:
    return tuple(key.shape[:-1])
  what = f"dtype {dtype}, shape {np.shape(key)}" if dtype is not None else type(key).__name__
  raise ValueError(f"{name} must be a JAX PRNG key (jax.random.key(seed)), got {what}")


def check_key(key: Any, name: str = "key", *, shape: tuple[int, ...] = ()) -> None:
  """Raises ``ValueError`` naming ``name`` unless ``key`` is an array of JAX PRNG keys of
  ``shape`` (``()``: one key; :func:`key_shape`), tracers included."""
  got = key_shape(key, name)
  if got != tuple(shape):
    want = "one key" if not shape else f"keys of shape {tuple(shape)}"
    raise ValueError(f"{name} must be {want}, got keys of shape {got}")


def check_finite(x: jax.Array, name: str) -> None:
  """Raises ``ValueError`` if concrete ``x`` has a NaN or infinite entry (tracers pass)."""
  if not is_concrete(x) or x.size == 0:
    return
  values = np.asarray(x)
  bad = ~np.isfinite(values)
  if bad.any():
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    where = f" at index {index}" if values.ndim else ""
    raise ValueError(
      f"{name} must be finite, got {values[index] if values.ndim else values}{where}"
    )


def nan_where_invalid(x: jax.Array, valid: jax.Array) -> jax.Array:
  """``x`` where ``valid``, NaN elsewhere (so invalid input cannot give a finite result)."""
  return jnp.where(valid, x, jnp.nan)
