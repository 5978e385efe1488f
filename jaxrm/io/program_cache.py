"""Lowered programs kept on disk, so that a later process neither traces nor lowers a step again.

The compilation cache (:mod:`jaxrm.io.compile_cache`) spares a second process XLA's compile,
but every process still traces the Python step into a jaxpr and lowers it to StableHLO before
the cache is consulted: about 0.5 s of the first step of the README's HH run, and 0.1 s of
its initial state and evaluation (BUILD_NOTES.md, "Issue 14, session 38"). :func:`jit`
exports the lowered program with :mod:`jax.export` on first use and loads it in later
processes; every process, the first included, runs the exported program, so a run's numbers
do not depend on whether it found one.

A program is stored under a SHA-256 of everything its lowering depends on: the caller's
``name`` and ``key`` (a text that must determine the function, e.g. the run's config and model;
the caller's responsibility), the arguments' tree, shapes, dtypes and shardings, the source of
every ``jaxrm`` module, the versions of jax, jaxlib, flax and optax, the backend and JAX's
numerics settings (x64, default matmul precision, dtype promotion). Editing the library makes
new programs; editing an installed flax or optax in place without a version change would not
(clear the directory then). A program that cannot be exported (host callbacks, a custom call
outside JAX's stable set) runs as a plain ``jax.jit`` in this process, with a warning.

Enabled with the compilation cache by :func:`jaxrm.io.compile_cache.enable_compilation_cache`
(every script, so also the script runs of the test suite), in ``<cache dir>/programs``; a
library user who never enables it gets ``jax.jit``. Entries are never removed (a few hundred
kB each); delete the directory to reclaim the space.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import functools
import hashlib
import importlib.metadata
import os
import pickle
import threading
from typing import Any

from absl import logging
import jax

from jaxrm.io import files

SUFFIX = ".jaxprogram"
_PACKAGES = ("jax", "jaxlib", "flax", "optax")
_directory: str | None = None


def enable(directory: str | None) -> None:
  """Stores and loads programs in ``directory`` (created on first store); ``None`` turns it off."""
  global _directory
  _directory = None if directory is None else os.path.abspath(directory)


@functools.cache
def source_digest(root: str) -> str:
  """SHA-256 of the path and source of every ``.py`` file under the directory ``root``: for a
  ``key`` of code outside the library (e.g. the ``experiments`` a program is traced from)."""
  h = hashlib.sha256()
  for folder, _, names in sorted(os.walk(root)):
    for name in sorted(n for n in names if n.endswith(".py")):
      path = os.path.join(folder, name)
      h.update(os.path.relpath(path, root).encode() + b"\n")
      with open(path, "rb") as f:
        h.update(f.read())
  return h.hexdigest()


@functools.lru_cache(maxsize=1)
def library_digest() -> str:
  """SHA-256 of the source of every ``jaxrm`` module and of the versions of :data:`_PACKAGES`."""
  versions = "".join(f"{p}={importlib.metadata.version(p)}\n" for p in _PACKAGES)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return hashlib.sha256((versions + source_digest(root)).encode()).hexdigest()


def _settings() -> str:
  c = jax.config
  return (
    f"backend={jax.default_backend()} x64={c.jax_enable_x64} "
    f"matmul={c.jax_default_matmul_precision} promotion={c.jax_numpy_dtype_promotion}"
  )


def _signature(leaves: Sequence[Any]) -> tuple:
  return tuple((jax.typeof(x), getattr(x, "sharding", None)) for x in leaves)


def program_digest(name: str, key: str, treedef: Any, signature: tuple) -> str:
  """The SHA-256 a program is stored under (see the module docstring)."""
  text = "\n".join(
    [
      name,
      key,
      str(treedef),
      *(f"{a.str_short(short_dtypes=True)} weak={a.weak_type} {s}" for a, s in signature),
    ]
    + [_settings(), library_digest()]
  )
  return hashlib.sha256(text.encode()).hexdigest()


class _Program:
  """One function's exported programs, one per argument signature (see :func:`jit`)."""

  def __init__(self, fn, name: str, key: str, folder: str, **jit_kwargs):
    self._fn, self._name, self._key, self._folder = fn, name, key, folder
    self._jit_kwargs = jit_kwargs
    self._compiled: dict[tuple, tuple[Callable[..., Any], Any]] = {}
    self._lock = threading.Lock()
    self._plain = jax.jit(fn, **jit_kwargs)
    functools.update_wrapper(self, fn)

  def __call__(self, *args):
    leaves, treedef = jax.tree.flatten(args)
    if any(isinstance(x, jax.core.Tracer) for x in leaves):  # inside a trace: inlined anyway
      return self._plain(*args)
    signature = (treedef, _signature(leaves))
    entry = self._compiled.get(signature)
    if entry is None:
      with self._lock:  # threads calling one function (e.g. a study's worlds) export it once
        entry = self._compiled.get(signature)
        if entry is None:
          entry = self._load_or_export(args, leaves, treedef, signature[1])
          self._compiled[signature] = entry
    call, out_tree = entry
    out = call(*leaves)
    return out if out_tree is None else jax.tree.unflatten(out_tree, out)

  def _load_or_export(self, args, leaves, treedef, signature):
    # Donated arguments, as positions among the flattened leaves.
    starts = [0]
    for a in args:
      starts.append(starts[-1] + len(jax.tree.leaves(a)))
    donated = self._jit_kwargs["donate_argnums"]
    donate = tuple(i for a in donated for i in range(starts[a], starts[a + 1]))
    digest = program_digest(self._name, self._key, treedef, signature)
    path = os.path.join(self._folder, f"{self._name}-{digest[:40]}{SUFFIX}")
    stored = _read(path)
    if stored is None:
      out_trees = []

      def flat(*xs):
        out_leaves, out_tree = jax.tree.flatten(self._fn(*jax.tree.unflatten(treedef, xs)))
        out_trees.append(out_tree)
        return out_leaves

      try:
        exported = jax.export.export(jax.jit(flat))(*leaves)
      except Exception as e:  # noqa: BLE001 - any reason a program cannot be exported
        logging.warning("%s: not exported (%s); traced in every process", self._name, e)
        return lambda *xs: self._plain(*jax.tree.unflatten(treedef, xs)), None
      stored = exported, out_trees[0]
      _write(path, exported, out_trees[0])
    exported, out_tree = stored
    kwargs = dict(self._jit_kwargs, donate_argnums=donate)
    shardings = tuple(s for _, s in signature)
    if all(s is not None for s in shardings):
      # Uncommitted arrays (made outside any jit) and committed ones (a call's outputs) would
      # otherwise lower the exported call twice, and compile it twice.
      kwargs["in_shardings"] = shardings
    return jax.jit(exported.call, **kwargs), out_tree


def _read(path: str) -> tuple[Any, Any] | None:
  try:
    with open(path, "rb") as f:
      blob = pickle.load(f)
    return jax.export.deserialize(bytearray(blob["exported"])), blob["out_tree"]
  except FileNotFoundError:
    return None
  except Exception as e:  # noqa: BLE001 - a damaged or foreign entry costs a trace, not the run
    logging.warning("unreadable stored program %s (%s); tracing again", path, e)
    return None


def _write(path: str, exported: Any, out_tree: Any) -> None:
  try:
    blob = pickle.dumps({"exported": exported.serialize(), "out_tree": out_tree})
  except Exception as e:  # noqa: BLE001 - e.g. an output tree with an unpicklable node
    logging.warning("%s not stored (%s)", os.path.basename(path), e)
    return
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    files.atomic_write(path, blob)
  except OSError as e:  # a read-only or full disk: the run goes on, tracing in later processes
    logging.warning("%s not stored (%s)", path, e.strerror or e)


def jit(
  fn: Callable[..., Any],
  *,
  name: str,
  key: str | None,
  donate_argnums: Sequence[int] = (),
  compiler_options: dict[str, Any] | None = None,
) -> Callable[..., Any]:
  """``jax.jit(fn, donate_argnums=..., compiler_options=...)``, its lowered programs kept on
  disk.

  Args:
    fn: a pure function of arrays (pytrees of them) returning a pytree of arrays.
    name: a file-name prefix (letters, digits, ``_``), e.g. ``'rm_step'``.
    key: a text that determines ``fn`` with the library's code (e.g. the run's config and
      model); ``None``: plain ``jax.jit``.
    donate_argnums: positional arguments whose buffers the call may reuse.
    compiler_options: XLA options for every compile (e.g.
      :func:`jaxrm.io.compile_cache.backend_options`); not part of the stored program.

  Returns:
    A callable with ``fn``'s signature (positional arguments only). Without a directory
    (:func:`enable`) or a ``key`` it is ``jax.jit``.

  Raises:
    ValueError: ``name`` is not a plain file-name prefix.
  """
  if not name or not name.replace("_", "").isalnum():
    raise ValueError(f"name must be letters, digits and '_', got {name!r}")
  kwargs = {"donate_argnums": tuple(donate_argnums), "compiler_options": compiler_options}
  if _directory is None or key is None:
    return jax.jit(fn, **kwargs)
  return _Program(fn, name, key, _directory, **kwargs)
