"""Checkpoint integrity: sha256 digests of a checkpoint's arrays and JSON dict.

:meth:`jaxrm.io.checkpoint.CheckpointManager.save` stores :func:`integrity_record` under the
reserved key :data:`INTEGRITY_KEY` of the checkpoint's JSON dict; restoring verifies it with
:func:`check_integrity`, which readers that restore only part of a checkpoint (the parameters,
by an orbax partial restore) call themselves. A digest covers an array's dtype, shape and bytes,
so a flipped bit that orbax reads back without complaint is detected. Arrays that are not fully
addressable by this process (multi-host sharding) are not digested; a checkpoint written
without digests restores unchecked. :mod:`jaxrm.io.checkpoint` re-exports these names.
"""

import hashlib
import json
from typing import Any

from absl import logging
import jax
import numpy as np

INTEGRITY_KEY = "__integrity__"  # reserved key of the extra dict: the digests of a checkpoint


class CheckpointIntegrityError(ValueError):
  """A checkpoint's arrays or JSON dict do not match the digests recorded when it was saved."""


def _array_digest(x: Any) -> str | None:
  """sha256 of an array's dtype, shape and bytes; None if this process cannot see all of it."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return None
  host = np.ascontiguousarray(jax.device_get(x))
  digest = hashlib.sha256(f"{host.dtype.str}{host.shape}".encode())
  digest.update(host.tobytes())
  return digest.hexdigest()


def _json_digest(extra: dict[str, Any]) -> str:
  return hashlib.sha256(json.dumps(extra, sort_keys=True).encode()).hexdigest()


def integrity_record(state: Any, extra: dict[str, Any]) -> dict[str, Any]:
  """The digests stored with a checkpoint: each array of ``state`` by path, and ``extra``."""
  arrays = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    digest = _array_digest(leaf)
    if digest is not None:
      arrays[jax.tree_util.keystr(path)] = digest
  return {"algorithm": "sha256", "arrays": arrays, "extra": _json_digest(extra)}


def check_integrity(
  extra: dict[str, Any], step: int, state: Any = None, *, prefix: str = ""
) -> dict[str, Any]:
  """Verifies a restored checkpoint against the digests saved with it.

  For readers that restore a checkpoint without :meth:`CheckpointManager.restore` (e.g. only
  the parameters, by an orbax partial restore).

  Args:
    extra: the restored JSON dict, as read (with its ``"__integrity__"`` record).
    step: the checkpoint's step, named in errors.
    state: the restored arrays to verify (all of the saved state, or a part of it); None
      verifies only the JSON dict.
    prefix: the path of ``state`` inside the saved state, as ``jax.tree_util.keystr`` writes
      it (``".params"`` for the params of a saved ``TrainState``).

  Returns:
    ``extra`` without the digest record (unchanged, unverified, if it has none).

  Raises:
    CheckpointIntegrityError: the JSON dict or an array differs from its digest, or has none.
  """
  extra = dict(extra)
  record = extra.pop(INTEGRITY_KEY, None)
  if record is None:
    logging.info("Checkpoint at step %d has no digests (an older format); not verified", step)
    return extra
  if not isinstance(record, dict) or not isinstance(record.get("arrays"), dict):
    raise CheckpointIntegrityError(f"checkpoint at step {step}: its digest record is damaged")
  if record.get("extra") != _json_digest(extra):
    raise CheckpointIntegrityError(
      f"checkpoint at step {step}: the JSON dict does not match its sha256 digest (damaged)"
    )
  arrays = record["arrays"]
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    name = prefix + jax.tree_util.keystr(path)
    digest = _array_digest(leaf)
    if digest is None:
      continue
    if name not in arrays:
      raise CheckpointIntegrityError(f"checkpoint at step {step}: no digest for array {name}")
    if arrays[name] != digest:
      raise CheckpointIntegrityError(
        f"checkpoint at step {step}: array {name} does not match its sha256 digest (damaged)"
      )
  return extra
