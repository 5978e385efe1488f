"""Orbax checkpoints of a training pytree plus a JSON dict, keeping the last N and the best.

:class:`CheckpointManager` is a thin wrapper around ``orbax.checkpoint.CheckpointManager``.
Each checkpoint (one directory per step) holds two items:

* ``state``: any pytree of arrays (``ocp.args.StandardSave``) — a ``TrainState`` (params,
  optimizer state, step, PRNG key, skip counter), controller states, ... Typed PRNG keys are
  stored as their key data (``jax.random.key_data``) and re-wrapped on restore with the
  template's key implementation.
* ``extra``: a JSON dict (``ocp.args.JsonSave``) — data-iterator position, config, metrics.
  NumPy/JAX scalars and arrays in it are converted to Python numbers/lists.

Retention: the ``max_to_keep`` most recent checkpoints are kept, and, when ``best_metric`` is
set, also the one with the best value of ``metrics[best_metric]`` (orbax
``AnyPreservationPolicy([LatestN, BestN])``).

Saves are synchronous by default (``async_save=False``): when ``save`` returns, the
checkpoint is complete on disk, which keeps the resume logic simple and is cheap for the model
sizes of this library. With ``async_save=True`` orbax writes in a background thread; the next
``save``, ``restore``, ``wait_until_finished`` and ``close`` (also on leaving a ``with`` block)
wait for it.

Integrity: :meth:`CheckpointManager.save` records a sha256 digest of every saved array (its
dtype, shape and bytes) and of the JSON dict, under the reserved key ``"__integrity__"`` of the
``extra`` item; :meth:`CheckpointManager.restore` recomputes them and raises
:class:`CheckpointIntegrityError` on a mismatch, so a flipped bit that orbax reads back without
complaint is detected (and :meth:`CheckpointManager.restore_latest` falls back). The digests
live in :mod:`jaxrm.io.checkpoint_integrity` (re-exported here).

Crash safety: orbax writes each step to ``<step>.orbax-checkpoint-tmp-<n>`` and renames it to
``<step>`` only once complete, so a process killed mid-save (SIGKILL, preemption) leaves a tmp
directory that is never listed as a step; orbax deletes such directories in the background
when a manager is created (``cleanup_tmp_directories``), finishing before the first save.
A finalized checkpoint whose files were later damaged (truncated, deleted, a changed byte)
is detected when reading it: :meth:`CheckpointManager.restore_latest` logs a warning naming the
step and the error and falls back to the previous checkpoint; once a previous one restores, the
damaged newer ones are moved aside to ``<step>.corrupt`` so that the resumed run can save those
steps again. A step name that is not a directory (e.g. replaced by a plain file) is moved aside
the same way, with a warning, when the manager is created.

Example::

  with CheckpointManager(workdir / "checkpoints", max_to_keep=3,
                         best_metric="eval_accuracy") as ckpt:
    restored = ckpt.restore_latest(template=state)
    if restored is not None:
      state, extra, step = restored
      data_iter.set_state(extra["data"])
    ...
    ckpt.save(step, state, {"data": data_iter.get_state()},
              metrics={"eval_accuracy": acc})
"""

import json
import logging as std_logging
import math
import os
import sys
import threading
from typing import Any

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxrm.io import rundir
from jaxrm.io.checkpoint_integrity import (  # noqa: F401  (re-exported with the manager)
  INTEGRITY_KEY,
  CheckpointIntegrityError,
  check_integrity,
  integrity_record,
)

_STATE = "state"
_EXTRA = "extra"
_METRICS_ITEM = "metrics"  # orbax's reserved item holding the metrics of a step


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (disk full, quota, read-only file system, permissions).

  The message is one line naming the step, the cause and the last complete checkpoint, which
  is untouched (orbax writes into a temporary directory that is never listed as a step).
  """


def _is_key(x: Any) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


def _keys_to_data(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _template_for_restore(template: Any) -> Any:
  """Typed keys -> their key-data template; keeps arrays (and their shardings) otherwise."""

  def leaf(x):
    if _is_key(x):
      if isinstance(x, jax.ShapeDtypeStruct):
        data = jax.eval_shape(jax.random.key_data, x)
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=x.sharding)
      return jax.random.key_data(x)
    return x

  return jax.tree.map(leaf, template)


def _key_impl(x: Any) -> Any:
  if isinstance(x, jax.ShapeDtypeStruct):  # key_impl needs an array; the dtype knows it
    return x.dtype._impl  # pylint: disable=protected-access
  return jax.random.key_impl(x)


def _rewrap_keys(restored: Any, template: Any) -> Any:
  def leaf(r, t):
    if _is_key(t):
      return jax.random.wrap_key_data(r, impl=_key_impl(t))
    return r

  return jax.tree.map(leaf, restored, template)


def _check_matches_template(restored: Any, template: Any, step: int) -> None:
  paths_r = jax.tree_util.tree_leaves_with_path(restored)
  paths_t = jax.tree_util.tree_leaves_with_path(template)
  if len(paths_r) != len(paths_t):
    raise ValueError(
      f"checkpoint at step {step} has {len(paths_r)} arrays, the template {len(paths_t)}"
    )
  for (path, r), (_, t) in zip(paths_r, paths_t):
    if np.shape(r) != np.shape(t) or np.dtype(r.dtype) != np.dtype(t.dtype):
      raise ValueError(
        f"checkpoint at step {step}: {jax.tree_util.keystr(path)} has shape "
        f"{np.shape(r)} and dtype {r.dtype}, the template {np.shape(t)} and {t.dtype}"
      )


def _to_json(x: Any) -> Any:
  if isinstance(x, (np.generic, np.ndarray, jax.Array)):
    return np.asarray(x).tolist()
  raise TypeError(f"object of type {type(x).__name__} is not JSON serialisable")


def _jsonable(extra: dict[str, Any]) -> dict[str, Any]:
  if not isinstance(extra, dict):
    raise ValueError(f"extra must be a dict, got {type(extra).__name__}")
  try:
    return json.loads(json.dumps(extra, default=_to_json))
  except TypeError as e:
    raise ValueError(f"extra must be JSON-serialisable: {e}") from e


class _NoOrbaxTraceback(std_logging.Filter):
  """Keeps orbax's error lines but drops their tracebacks (the error is reported once)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if "orbax" in record.pathname and record.exc_info:
      record.exc_info, record.exc_text = None, None
    return True


def _quiet_writer_threads():
  """Silences the repeats of a failed write while a save runs; returns the undo function.

  When a write fails, orbax's writer threads keep reporting the same error: tensorstore
  callbacks print ``RuntimeError: Event loop is closed`` tracebacks (through
  ``sys.excepthook`` / ``threading.excepthook``) and orbax logs each failure with its
  traceback, hundreds of lines that bury the one-line :class:`CheckpointWriteError`. Those
  repeats are silenced (for good once a save failed, as the threads outlive it); any other
  exception still prints its traceback."""
  if getattr(sys.excepthook, "_jaxrm_quiet", False):
    return lambda: None

  def closed_loop(exc: BaseException | None) -> bool:
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"

  previous_hook, previous_thread_hook = sys.excepthook, threading.excepthook

  def excepthook(exc_type, exc, tb):
    if not closed_loop(exc):
      previous_hook(exc_type, exc, tb)

  def thread_hook(args):
    if not closed_loop(args.exc_value):
      previous_thread_hook(args)

  excepthook._jaxrm_quiet = True  # pylint: disable=protected-access
  sys.excepthook, threading.excepthook = excepthook, thread_hook
  handler = logging.get_absl_handler()
  log_filter = _NoOrbaxTraceback()
  handler.addFilter(log_filter)

  def restore() -> None:
    sys.excepthook, threading.excepthook = previous_hook, previous_thread_hook
    handler.removeFilter(log_filter)

  return restore


class CheckpointManager:
  """Saves and restores ``(state pytree, JSON dict)`` checkpoints with orbax.

  Args:
    directory: root directory; one sub-directory per saved step.
    max_to_keep: number of most recent checkpoints to keep (``None``: keep all).
    best_metric: name of a metric passed to :meth:`save`; if given, the checkpoint with the
      best value is kept in addition to the most recent ones. Non-finite values rank last.
    best_mode: ``'max'`` or ``'min'``: whether larger or smaller ``best_metric`` is better.
    async_save: write checkpoints in a background thread (see the module docstring).
  """

  def __init__(
    self,
    directory: str | os.PathLike,
    *,
    max_to_keep: int | None = 3,
    best_metric: str | None = None,
    best_mode: str = "max",
    async_save: bool = False,
  ):
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"max_to_keep must be None or >= 1, got {max_to_keep}")
    self._directory = epath.Path(directory).absolute()
    self._failed_save = False
    self._best_metric = best_metric
    self._best_mode = best_mode
    self._quarantine_non_directories()
    self._quarantine_unreadable_metrics()

    policies = [ocp.checkpoint_managers.LatestN(n=max_to_keep)]
    best_fn = None
    if best_metric is not None:
      best_fn = self._metric_value
      policies.append(
        ocp.checkpoint_managers.BestN(
          get_metric_fn=best_fn,
          reverse=(best_mode == "min"),
          n=1,
          keep_checkpoints_without_metrics=False,
        )
      )
    options = ocp.CheckpointManagerOptions(
      best_fn=best_fn,
      best_mode=best_mode,
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,
      create=True,
    )
    self._manager = ocp.CheckpointManager(
      self._directory, options=options, item_names=(_STATE, _EXTRA)
    )

  # ---- helpers ---------------------------------------------------------------------------

  def _metric_value(self, metrics: Any) -> float:
    value = float(metrics[self._best_metric])
    if not math.isfinite(value):
      return -math.inf if self._best_mode == "max" else math.inf
    return value

  def _quarantine(self, step: int, reason: str) -> None:
    """Moves ``<dir>/<step>`` to ``<dir>/<step>.corrupt[-k]`` (never deleted)."""
    if jax.process_index() != 0:
      return
    src = self._directory / str(step)
    dst = self._directory / f"{step}.corrupt"
    k = 1
    while dst.exists():
      dst = self._directory / f"{step}.corrupt-{k}"
      k += 1
    src.rename(dst)
    logging.warning("Moved damaged checkpoint at step %d (%s) to %s", step, reason, dst)

  def _quarantine_non_directories(self) -> None:
    """A step name that is a plain file (or link to one) is no checkpoint; orbax ignores it."""
    if not self._directory.is_dir():
      return
    for path in self._directory.iterdir():
      if path.name.isdigit() and not path.is_dir():
        logging.warning(
          "Checkpoint at step %s in %s is not a directory (a plain file?); ignoring it and "
          "using the previous checkpoint",
          path.name,
          self._directory,
        )
        self._quarantine(int(path.name), "not a directory")

  def _quarantine_unreadable_metrics(self) -> None:
    """Orbax reads every step's metrics JSON when it starts; a damaged one would crash it."""
    if not self._directory.exists():
      return
    for path in self._directory.iterdir():
      metrics_file = path / _METRICS_ITEM / _METRICS_ITEM
      if not (path.name.isdigit() and metrics_file.exists()):
        continue
      try:
        json.loads(metrics_file.read_text())
      except (ValueError, OSError) as e:
        logging.warning(
          "Checkpoint at step %s has an unreadable metrics file %s: %s", path.name, metrics_file, e
        )
        self._quarantine(int(path.name), f"unreadable metrics: {e}")

  # ---- public API ------------------------------------------------------------------------

  @property
  def directory(self) -> epath.Path:
    """The root checkpoint directory."""
    return self._directory

  def all_steps(self) -> list[int]:
    """Steps of the finalized checkpoints on disk, ascending (tmp directories excluded)."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """Most recent saved step, or ``None``."""
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """Step with the best ``best_metric`` (the latest step if no ``best_metric``)."""
    return self._manager.best_step()

  def save(
    self,
    step: int,
    state: Any,
    extra: dict[str, Any] | None = None,
    *,
    metrics: dict[str, Any] | None = None,
  ) -> bool:
    """Saves ``state`` and ``extra`` as checkpoint ``step``; then prunes old checkpoints.

    Args:
      step: training step (non-negative int); the directory name.
      state: pytree of arrays (jax or NumPy; typed PRNG keys allowed). A ``pmap``-replicated
        state should be unreplicated first (``ParallelStep.unreplicate``).
      extra: JSON-serialisable dict (data-iterator state, config, ...); the key
        ``"__integrity__"`` is reserved.
      metrics: dict of numbers; must contain ``best_metric`` if that is set.

    Returns:
      True if a checkpoint was written; False if ``step`` is already saved (logged, the
      existing checkpoint is left untouched).
    """
    step = int(step)
    if step < 0:
      raise ValueError(f"step must be non-negative, got {step}")
    extra = _jsonable({} if extra is None else extra)
    if INTEGRITY_KEY in extra:
      raise ValueError(f"extra must not use the reserved key {INTEGRITY_KEY!r}")
    if metrics is not None:
      metrics = _jsonable(metrics)
      if self._best_metric is not None and self._best_metric not in metrics:
        raise ValueError(
          f"metrics must contain best_metric {self._best_metric!r}, got keys {sorted(metrics)}"
        )
    elif self._best_metric is not None:
      logging.warning(
        "Checkpoint at step %d is saved without metrics; it can be kept only "
        "as one of the latest, not as the best",
        step,
      )
    if step in self._manager.all_steps():
      logging.info(
        "Checkpoint at step %d already exists in %s; not saving it again", step, self._directory
      )
      return False
    state = _keys_to_data(state)
    extra = {**extra, INTEGRITY_KEY: integrity_record(state, extra)}
    args = ocp.args.Composite(
      **{
        _STATE: ocp.args.StandardSave(state),
        _EXTRA: ocp.args.JsonSave(extra),
      }
    )
    undo_quiet = _quiet_writer_threads()
    try:
      saved = self._manager.save(step, args=args, metrics=metrics, force=True)
    except Exception as e:  # pylint: disable=broad-except
      what = rundir.write_failure(e)
      if what is None:
        undo_quiet()
        raise
      self._failed_save = True
      complete = [s for s in self._manager.all_steps() if s != step]
      last = f"step {max(complete)} in {self._directory}" if complete else "none"
      raise CheckpointWriteError(
        f"could not write the checkpoint at step {step} in {self._directory}: {what}; "
        f"the last complete checkpoint is {last} (free space and re-run the same command "
        "to resume from it)"
      ) from e
    undo_quiet()
    return saved

  def restore(self, step: int, template: Any) -> tuple[Any, dict[str, Any]]:
    """Restores checkpoint ``step``.

    Args:
      step: a step in :meth:`all_steps`.
      template: pytree with the structure, shapes and dtypes of the saved state: concrete
        arrays (restored onto their shardings/devices) or ``jax.ShapeDtypeStruct`` with
        shardings. Typed PRNG key leaves are restored as typed keys.

    Returns:
      ``(state, extra)``.

    Raises:
      CheckpointIntegrityError: an array or the JSON dict differs from its saved digest.
      ValueError, OSError, ...: if the checkpoint is damaged or does not match ``template``.
    """
    self._manager.wait_until_finished()
    restored = self._manager.restore(
      int(step),
      args=ocp.args.Composite(
        **{
          _STATE: ocp.args.StandardRestore(_template_for_restore(template)),
          _EXTRA: ocp.args.JsonRestore(),
        }
      ),
    )
    state = restored[_STATE]
    _check_matches_template(state, _template_for_restore(template), step)
    extra = restored[_EXTRA]
    if not isinstance(extra, dict):
      raise ValueError(
        f"checkpoint at step {step}: extra is {type(extra).__name__}, expected a dict"
      )
    extra = check_integrity(extra, step, state)
    return _rewrap_keys(state, template), extra

  def read_extra(self, step: int) -> dict[str, Any]:
    """The JSON ``extra`` of checkpoint ``step``, read without its arrays (no template)."""
    self._manager.wait_until_finished()
    restored = self._manager.restore(
      int(step), args=ocp.args.Composite(**{_EXTRA: ocp.args.JsonRestore()})
    )
    extra = restored[_EXTRA]
    if not isinstance(extra, dict):
      raise ValueError(
        f"checkpoint at step {step}: extra is {type(extra).__name__}, expected a dict"
      )
    return {k: v for k, v in extra.items() if k != INTEGRITY_KEY}

  def latest_extra(self) -> tuple[dict[str, Any], int] | None:
    """``(extra, step)`` of the newest checkpoint whose JSON ``extra`` reads, or None.

    Lets a loop check the checkpointed config (:func:`jaxrm.io.rundir.check_resumable`)
    before restoring arrays with a template built from the current config: a checkpoint of
    another model would otherwise fail to restore with orbax's structure-mismatch error.
    An unreadable ``extra`` is skipped here; :meth:`restore_latest` reports the damage.
    """
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        return self.read_extra(step), step
      except Exception:  # pylint: disable=broad-except  # damaged: restore_latest reports it
        continue
    return None

  def restore_latest(self, template: Any) -> tuple[Any, dict[str, Any], int] | None:
    """Restores the newest readable checkpoint.

    Steps are tried newest first. A checkpoint that cannot be read is reported with
    ``absl.logging.warning`` (naming the step and the error) and the previous one is tried;
    once one restores, the unreadable newer ones are moved aside to ``<step>.corrupt``.

    Args:
      template: see :meth:`restore`.

    Returns:
      ``(state, extra, step)``, or ``None`` if the directory holds no checkpoint.

    Raises:
      jaxrm.io.rundir.RunStopped: (a ``RuntimeError``) if checkpoints exist but none can be
        restored (nothing is moved: the cause may be a template that does not match, not
        damage). The one-line message lists the first line of each step's error.
    """
    self._manager.wait_until_finished()
    failures = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        state, extra = self.restore(step, template)
      except Exception as e:  # pylint: disable=broad-except  # any read error means damage
        logging.warning(
          "Could not restore the checkpoint at step %d in %s (%s: %s); "
          "trying the previous checkpoint",
          step,
          self._directory,
          type(e).__name__,
          rundir.first_line(e),
        )
        failures.append((step, e))
        continue
      for bad_step, err in failures:
        self._quarantine(bad_step, f"{type(err).__name__}: {err}")
      if failures:
        self._manager.reload()
        logging.warning(
          "Resuming from the checkpoint at step %d instead of %d", step, failures[0][0]
        )
      return state, extra, step
    if failures:
      details = "; ".join(
        f"step {s}: {type(e).__name__}: {rundir.first_line(e)}" for s, e in failures
      )
      raise rundir.RunStopped(  # one line from the scripts, status 1
        f"no checkpoint in {self._directory} could be restored: {details}; if the run's "
        "settings changed since it was saved, restore them, else move the checkpoints aside "
        "or use another --workdir to start afresh"
      )
    return None

  def wait_until_finished(self) -> None:
    """Blocks until pending asynchronous saves are written."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases orbax resources."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "CheckpointManager":
    return self

  def __exit__(self, exc_type: Any, *exc_info: Any) -> None:
    if exc_type is None and not self._failed_save:
      self.close()
      return
    # Leaving on an error (or after a failed write): closing must not replace that error by
    # orbax's own complaint about the failed write ("Event loop is closed", ...).
    try:
      self.close()
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("Closing the checkpoint manager of %s: %s", self._directory, e)
