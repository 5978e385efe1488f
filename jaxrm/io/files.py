"""Files of a run: strict JSON, atomic writes and the fingerprinted array cache.

:func:`atomic_write` is the one way jaxrm writes a file that a reader or a resumed run may
see (a temporary file and a rename: never a torn file); :func:`write_json`, :func:`write_npz`
and :func:`save_tree` build on it. :func:`cached_tree` is the one cache of computed arrays
(keyed by a :func:`fingerprint` of what they depend on). :func:`to_json`,
:func:`config_to_json` and :func:`config_from_json` convert configs (nested dataclasses) to
JSON and back. Re-exported by :mod:`jaxrm.io.rundir`.
"""

from collections.abc import Mapping
import dataclasses
import hashlib
import io
import json
import math
import os
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np


def to_json(value: Any) -> Any:
  """A copy of ``value`` with NumPy/JAX numbers as Python numbers and NaN/inf as None.

  Dataclasses become dicts and tuples lists, so a config round-trips through JSON.
  """
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
  if isinstance(value, Mapping):
    return {str(k): to_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_json(v) for v in value]
  if isinstance(value, (np.ndarray, np.generic, jnp.ndarray)):
    return to_json(np.asarray(value).tolist())
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  return value


def config_to_json(config: Any) -> dict[str, Any]:
  """A (nested) config dataclass as a JSON-serialisable dict (tuples as lists)."""
  return to_json(config)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """``{'a': {'b': 1}}`` -> ``{'a.b': 1}`` (lists stay values)."""
  out = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping) and value:
      out.update(flatten(value, prefix=f"{path}."))
    else:
      out[path] = value
  return out


def fingerprint(value: Any) -> str:
  """A short, stable hash of a JSON-able value (configs, dataclasses, tuples)."""
  text = json.dumps(to_json(value), sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- atomic writes


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
  """Writes ``data`` to ``path`` through a temporary file and a rename: readers see the old
  file or the new one, never a torn one. Creates the parent directory."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data.encode() if isinstance(data, str) else data)
  os.replace(tmp, path)


def write_json(path: str | os.PathLike, value: Any) -> None:
  """Atomically writes ``value`` as indented strict JSON (see :func:`to_json`)."""
  atomic_write(path, json.dumps(to_json(value), indent=2, allow_nan=False) + "\n")


def write_npz(path: str | os.PathLike, **arrays: Any) -> None:
  """Atomically writes NumPy arrays as an ``.npz`` file."""
  buffer = io.BytesIO()
  np.savez(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
  atomic_write(path, buffer.getvalue())


def save_tree(path: str | os.PathLike, tree: Any, meta: Mapping[str, Any]) -> None:
  """Atomically writes the leaves of ``tree`` and a JSON ``meta`` dict (with its
  ``fingerprint``) to an ``.npz`` cache; read back with :func:`load_tree`."""
  leaves = jax.tree.leaves(tree)
  arrays = {f"leaf_{i}": np.asarray(x) for i, x in enumerate(leaves)}
  write_npz(path, meta=np.asarray(json.dumps(to_json(dict(meta)))), **arrays)


def load_tree(path: str | os.PathLike, template: Any, fingerprint: str) -> tuple[Any, dict] | None:
  """The tree saved by :func:`save_tree`, or None when the file is missing, unreadable or
  written for another ``fingerprint`` (the caller then recomputes it).

  Args:
    path: the cache file.
    template: a tree of the same structure (e.g. from ``jax.eval_shape``).
    fingerprint: the expected ``meta['fingerprint']``.

  Returns:
    ``(tree, meta)`` with the leaves as ``jax.Array``, or None.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    return None
  try:
    with np.load(path) as f:
      meta = json.loads(str(f["meta"]))
      if meta.get("fingerprint") != fingerprint:
        logging.info("%s was written by another config; recomputing", path)
        return None
      treedef = jax.tree.structure(template)
      leaves = [jnp.asarray(f[f"leaf_{i}"]) for i in range(treedef.num_leaves)]
  except (OSError, ValueError, KeyError) as e:  # a partial or corrupt file: recompute
    logging.warning("could not read %s (%s); recomputing", path, e)
    return None
  return jax.tree.unflatten(treedef, leaves), meta


def cached_tree(
  path: str | os.PathLike,
  make: Any,
  fingerprint: str,
  *,
  meta: Mapping[str, Any] | None = None,
) -> tuple[Any, dict]:
  """The one cache of computed arrays: ``make()``'s tree, reused from ``path`` when it was
  written for the same ``fingerprint`` and recomputed (and atomically saved) otherwise.

  Args:
    path: the ``.npz`` cache file.
    make: a function of no argument returning a tree of arrays (deterministic).
    fingerprint: identifies everything ``make`` depends on (:func:`fingerprint`).
    meta: extra JSON saved beside the arrays (returned on a reuse).

  Returns:
    ``(tree, meta)``.
  """
  loaded = load_tree(path, jax.eval_shape(make), fingerprint)
  if loaded is not None:
    return loaded
  tree = make()
  meta = {**dict(meta or {}), "fingerprint": fingerprint}
  save_tree(path, tree, meta)
  return tree, meta


def config_from_json(cls: type, d: Mapping[str, Any]) -> Any:
  """Rebuilds a (nested) config dataclass from :func:`config_to_json`'s dict.

  Nested dataclass fields are rebuilt from their default's type, lists become tuples;
  fields absent from ``d`` keep their defaults.

  Raises:
    ValueError: naming an unknown field.
  """
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - set(fields))
  if unknown:
    raise ValueError(f"unknown {cls.__name__} fields {unknown}")
  kwargs = {}
  for name, value in d.items():
    f = fields[name]
    default = f.default
    if f.default_factory is not dataclasses.MISSING:
      default = f.default_factory()
    if dataclasses.is_dataclass(default) and isinstance(value, Mapping):
      value = config_from_json(type(default), value)
    elif isinstance(value, list):
      value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
    kwargs[name] = value
  return cls(**kwargs)
