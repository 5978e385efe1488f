"""The run directory: one layout, metrics file, atomic write, resume rule and progress line.

Every training loop (:mod:`jaxrm.train`) and study writes everything about a run under one
``workdir``:

* ``config.json``: the run's config (:func:`config_to_json`), written with :func:`write_json`;
* ``metrics.jsonl``: one strict-JSON object per line with at least ``step``
  (:class:`MetricsWriter`; NaN/inf become ``null``); rows after a restored checkpoint's step
  are removed on resume (:func:`truncate_metrics`), so the file never holds a step twice;
* ``curves_<split>.png``: learning curves of the numeric columns of ``metrics.jsonl``, one
  file per ``split`` (rows without a split are ``train``), written beside it
  (:func:`plot_curves`, matplotlib Agg; the columns that never change are named in a caption);
* ``checkpoints/<step>``: :class:`jaxrm.io.checkpoint.CheckpointManager` checkpoints whose JSON
  ``extra`` holds at least ``config`` and ``metrics`` (:func:`checkpoint_extra`);
* ``data/``: caches (:func:`save_tree` / :func:`load_tree`, keyed by a :func:`fingerprint`);
* ``tensorboard/``: TensorBoard event files when ``LogConfig.tensorboard`` (needs the light
  ``tensorboardX`` writer, no TensorFlow); Weights & Biases when ``LogConfig.wandb`` (needs
  ``wandb``).

Resume rule (:func:`check_resumable`, the only one): a run restarted in a workdir that holds a
checkpoint must have the checkpoint's config, except for the fields its loop declares
changeable (the ``log`` section, the execution mode, ``steps``, ...). Fields are compared
flattened to dotted paths (``optimizer.learning_rate``), and the first difference is reported
as a :class:`ConfigError` naming it, in one line. A field added to a config after a run was
saved is missing from its checkpoint; the loop declares such fields with the value that
computes what the run computed before them (``added``), and the run resumes when this
process's value is that one.

Progress (:class:`Progress`, from :mod:`jaxrm.io.progress`): throughput and ETA are measured
from the end of the first step this process ran, so compilation is not counted; time spent in
evaluation and checkpoints is excluded with :meth:`Progress.exclude`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
import dataclasses
import errno
import json
import logging as std_logging
import math
import os
import tempfile
from typing import Any

from absl import logging
import numpy as np

from jaxrm.io.files import (  # noqa: F401  (re-exported: the run directory's file API)
  atomic_write,
  cached_tree,
  config_from_json,
  config_to_json,
  fingerprint,
  flatten,
  load_tree,
  save_tree,
  to_json,
  write_json,
  write_npz,
)
from jaxrm.io.metrics_file import (  # noqa: F401  (re-exported: the run directory's file API)
  CURVES_PREFIX,
  METRICS_FILE,
  plot_curves,
  plot_overlays,
  read_metrics,
  scalar_row,
  truncate_metrics,
)
from jaxrm.io.progress import Progress, format_duration  # noqa: F401  (re-exported)
from jaxrm.math._arrays import is_int  # noqa: F401  (a config's integer fields)
from jaxrm.steps import microbatch

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
DATA_DIR = "data"
TENSORBOARD_DIR = "tensorboard"


@dataclasses.dataclass(unsafe_hash=True)
class LogConfig:
  """Logging and checkpointing of a run; every field may change when a run is resumed.

  Attributes:
    log_every: period of the metrics rows and the progress line, in steps.
    checkpoint_every: checkpoint period in steps (also at the last step).
    keep_checkpoints: most recent checkpoints kept.
    plots: write ``curves_<split>.png`` beside ``metrics.jsonl`` at the end of the run.
    tensorboard: also write TensorBoard event files under ``tensorboard/`` (needs
      ``tensorboardX``).
    wandb: also log to Weights & Biases (needs ``wandb``; project ``wandb_project``).
    wandb_project: the W&B project.
  """

  log_every: int = 10
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  plots: bool = True
  tensorboard: bool = False
  wandb: bool = False
  wandb_project: str = "jaxrm"


class RunStopped(RuntimeError):
  """A run stopped on purpose, not by a bug: too many skipped updates, a non-finite update
  with ``nonfinite='raise'``, a diverged evaluation, a checkpoint that could not be written.
  The message is one line saying what happened and naming the last good checkpoint; scripts
  print it and exit with status 1 (:func:`experiments.cli.one_line_errors`)."""


class ConfigError(ValueError):
  """A bad setting; ``field`` is its dotted path in the run's config (``optimizer.learning_rate``)."""

  def __init__(self, field: str, value: Any, message: str):
    self.field, self.value, self.message = field, value, message
    super().__init__(f"{field}={value!r}: {message}")

  def flag_message(self) -> str:
    """One line naming the command-line override: ``--config.batch_size=0: must be >= 1``.

    ``workdir`` is a plain flag and is named ``--workdir``.
    """
    value = self.value
    if isinstance(value, (tuple, list)):
      value = ",".join(map(str, value))
    flag = "--workdir" if self.field == "workdir" else f"--config.{self.field}"
    return f"{flag}={value}: {self.message}"


# Errors of a failed write, as orbax/tensorstore report them (often wrapped in ValueError
# or RuntimeError rather than an OSError with an errno).
_WRITE_FAILURES = {
  errno.ENOSPC: "no space left on device",
  errno.EDQUOT: "disk quota exceeded",
  errno.EROFS: "read-only file system",
  errno.EACCES: "permission denied",
  errno.EPERM: "operation not permitted",
}
NOT_ONLY_WRITES = ("permission denied", "operation not permitted")  # reads fail so too
_WRITE_FAILURE_TEXT = (
  ("RESOURCE_EXHAUSTED", "no space left on device"),
  ("No space left on device", "no space left on device"),
  ("Disk quota exceeded", "disk quota exceeded"),
  ("Read-only file system", "read-only file system"),
  ("Permission denied", "permission denied"),
  ("PERMISSION_DENIED", "permission denied"),
)


def _chain(error: BaseException | None):
  """``error`` and its causes (``__cause__``, else ``__context__``), each once."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def first_line(error: BaseException, limit: int = 300) -> str:
  """An error's first line, at most ``limit`` characters (its type's name if it has no text;
  orbax's tree diffs and XLA's allocation reports run to hundreds of lines)."""
  return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


def out_of_memory(error: BaseException) -> str | None:
  """The first line of an out-of-memory error in ``error``'s cause chain (XLA's
  ``RESOURCE_EXHAUSTED: Out of memory ...`` on any device, or a host ``MemoryError``); None if
  there is none. XLA reports a full disk as ``RESOURCE_EXHAUSTED`` too (:func:`write_failure`)."""
  for e in _chain(error):
    text = str(e)
    if isinstance(e, MemoryError) or "out of memory" in text.lower():
      return first_line(e)
  return None


def write_failure(error: BaseException) -> str | None:
  """What an exception of a failed file write says went wrong (``'no space left on
  device'``), searching its cause chain; None if it is no write failure (a bug) or is out
  of memory (:func:`out_of_memory`)."""
  if out_of_memory(error) is not None:
    return None
  for e in _chain(error):
    if isinstance(e, OSError) and e.errno in _WRITE_FAILURES:
      return _WRITE_FAILURES[e.errno]
    text = str(e)
    for needle, what in _WRITE_FAILURE_TEXT:
      if needle in text:
        return what
  return None


def is_num(x: Any) -> bool:
  """A finite Python or NumPy number, not a bool (a config's real fields)."""
  return isinstance(x, (int, float, np.number)) and not isinstance(x, bool) and math.isfinite(x)


def check(config: Any, ok: bool, field: str, message: str) -> None:
  """Raises :class:`ConfigError` for the dotted ``field`` of ``config`` (with its value)
  unless ``ok``; the one helper of the loops' ``validate_config``."""
  if not ok:
    value = config
    for part in field.split("."):
      value = getattr(value, part)
    raise ConfigError(field, value, message)


def check_microbatch_size(config: Any, *, devices: int, mode: str, unit: str) -> None:
  """Raises :class:`ConfigError` for ``config.microbatch_size`` unless it is 0 (the whole
  batch) or a positive int that divides the examples (``unit``) each device's step sees in
  parallel ``mode`` on ``devices`` (``shard_map`` and ``pmap`` split ``config.batch_size``
  among them), or is at least that many (:func:`jaxrm.steps.microbatch.is_valid_size`)."""
  size = config.microbatch_size
  local = config.batch_size // devices if mode in ("shard_map", "pmap") else config.batch_size
  check(
    config,
    is_int(size) and size >= 0,
    "microbatch_size",
    "must be an int >= 0 (0: the whole batch at once)",
  )
  check(
    config,
    microbatch.is_valid_size(size, local),
    "microbatch_size",
    f"must divide the {local} {unit} of each device's batch (batch_size {config.batch_size}, "
    f"parallel mode {mode}) or be at least that many",
  )


def validate_log_config(log: LogConfig, *, prefix: str = "log") -> None:
  """Raises :class:`ConfigError` naming the first bad field of ``log``."""
  for name in ("log_every", "checkpoint_every", "keep_checkpoints"):
    value = getattr(log, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ConfigError(f"{prefix}.{name}", value, "must be an int >= 1")
  for name in ("plots", "tensorboard", "wandb"):
    if not isinstance(getattr(log, name), bool):
      raise ConfigError(f"{prefix}.{name}", getattr(log, name), "must be True or False")


def check_finite_fields(config: Any, *, prefix: str = "") -> None:
  """Raises :class:`ConfigError` for the first float field of a (nested) config dataclass
  that is NaN or infinite (tuples of floats included): the generic check behind every
  loop's ``validate_config``, so that no hyperparameter (a learning rate, a coefficient)
  can be ``inf`` whatever its name. Range checks stay with each field's loop."""
  if not dataclasses.is_dataclass(config):
    return
  for f in dataclasses.fields(config):
    value = getattr(config, f.name)
    path = f"{prefix}{f.name}"
    if dataclasses.is_dataclass(value):
      check_finite_fields(value, prefix=f"{path}.")
      continue
    items = value if isinstance(value, (tuple, list)) else (value,)
    for item in items:
      if isinstance(item, (float, np.floating)) and not math.isfinite(item):
        raise ConfigError(path, value, "must be a finite number")


class SkipMonitor:
  """Counts the updates a loop skipped (non-finite loss, gradient or update) and stops a run
  that skips ``max_consecutive`` in a row.

  The loops feed it every step's ``nonfinite`` flag in step order (:meth:`update`); it keeps
  the total (shown on the progress line and in the summary) and the current streak. A streak
  of ``max_consecutive`` means the run no longer trains (a diverged model, a bad setting):
  :meth:`update` raises :class:`RunStopped` naming the last good checkpoint, rather than
  letting the run finish and report the untrained model as a result.

  Args:
    max_consecutive: the streak that stops the run; 0 never stops. A run of fewer steps
      stops when every one of its steps was skipped (``total_steps``).
    total_steps: the step the run ends at.
    skipped: updates skipped before this process (a resumed run's ``num_skipped``).
  """

  def __init__(self, max_consecutive: int, *, total_steps: int, skipped: int = 0):
    self.max_consecutive = min(int(max_consecutive), int(total_steps)) if max_consecutive else 0
    self.total = int(skipped)
    self.streak = 0

  def update(self, step: int, nonfinite: bool, *, last_checkpoint: str) -> None:
    """Records step ``step`` (1-based: steps done); raises :class:`RunStopped` when the
    streak reaches ``max_consecutive``. ``last_checkpoint`` describes the run's last good
    checkpoint for the message (``'step 40 in runs/x/checkpoints'`` or ``'none'``)."""
    if not nonfinite:
      self.streak = 0
      return
    self.total += 1
    self.streak += 1
    if self.max_consecutive and self.streak >= self.max_consecutive:
      raise RunStopped(
        f"stopped at step {step}: the last {self.streak} updates were skipped (non-finite "
        f"loss, gradient or update; {self.total} skipped in all), so the run no longer trains "
        f"(learning rate or a coefficient too large?); last good checkpoint: {last_checkpoint}"
      )


def describe_checkpoint(step: int | None, directory: Any) -> str:
  """``'step 40 in <directory>'``, or ``'none (no checkpoint was saved)'``."""
  if step is None:
    return "none (no checkpoint was saved)"
  return f"step {step} in {os.fspath(directory)}"


# ----------------------------------------------------------------------------- resume rule


def _is_changeable(path: str, changeable: Collection[str]) -> bool:
  return any(path == c or path.startswith(f"{c}.") for c in changeable)


def check_resumable(
  saved: Mapping[str, Any],
  current: Mapping[str, Any],
  *,
  changeable: Collection[str],
  workdir: str | os.PathLike,
  added: Mapping[str, Any] | None = None,
) -> None:
  """The one resume rule: ``current`` must equal ``saved`` outside ``changeable``.

  Args:
    saved: the config JSON of the checkpoint being resumed.
    current: the config JSON of this process (:func:`config_to_json`).
    changeable: dotted paths (a section name covers its fields) that may differ.
    workdir: the run directory (named in the error).
    added: dotted paths of fields added to the config after runs were saved without them,
      each with the value that computes what those runs computed: a path absent from
      ``saved`` matches when ``current`` has that value there.

  Raises:
    ConfigError: naming the first (sorted) differing field, its new and saved values.
  """
  old, new = flatten(to_json(saved)), flatten(to_json(current))
  added = flatten(to_json(dict(added or {})))
  for path in sorted(set(old) | set(new)):
    if _is_changeable(path, changeable):
      continue
    if path not in old and path in added and new.get(path) == added[path]:
      continue
    if path not in old or path not in new or old[path] != new[path]:
      raise ConfigError(
        path,
        new.get(path, "<absent>"),
        f"differs from the checkpointed run in {os.fspath(workdir)} "
        f"({old.get(path, '<absent>')!r}); resume with the same value or use another --workdir",
      )


def checkpoint_extra(config: Any, *, metrics: Mapping[str, Any] | None, **parts: Any) -> dict:
  """The JSON ``extra`` of a checkpoint: ``config`` (checked on resume by
  :func:`check_resumable`), ``metrics`` (the row saved with it) and loop-specific ``parts``
  (data position, model description, ...)."""
  return to_json({"config": config_to_json(config), "metrics": dict(metrics or {}), **parts})


def read_checkpoint_extra(workdir: str | os.PathLike, step: int) -> dict[str, Any]:
  """The JSON ``extra`` of checkpoint ``step`` of a run, read without restoring arrays."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  path = os.path.join(os.fspath(workdir), CHECKPOINT_DIR, str(int(step)), "extra")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoint at step {step}: {path} does not exist")
  return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(path)


# ----------------------------------------------------------------------------- metrics


class MetricsWriter:
  """Appends strict-JSON rows to ``<workdir>/metrics.jsonl`` (flushed at once: a killed
  process loses at most a torn line) and mirrors them to TensorBoard / W&B when asked.

  Use as a context manager; :meth:`close` writes the learning-curve PNGs
  (``LogConfig.plots``).
  """

  def __init__(
    self, workdir: str | os.PathLike, *, log: LogConfig | None = None, config: Any = None
  ):
    self.workdir = os.fspath(workdir)
    self.path = os.path.join(self.workdir, METRICS_FILE)
    self.log = log or LogConfig()
    os.makedirs(self.workdir, exist_ok=True)
    self._file = open(self.path, "a")
    self._tb = self._wandb = None
    if self.log.tensorboard:
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      except ImportError:
        raise ConfigError(
          "log.tensorboard", True, "needs the tensorboardX package (pip install tensorboardX)"
        ) from None
      self._tb = SummaryWriter(os.path.join(self.workdir, TENSORBOARD_DIR))
    if self.log.wandb:
      try:
        import wandb  # pylint: disable=import-outside-toplevel
      except ImportError:
        raise ConfigError(
          "log.wandb", True, "needs the wandb package (pip install wandb)"
        ) from None
      self._wandb = wandb.init(
        project=self.log.wandb_project,
        dir=self.workdir,
        name=os.path.basename(os.path.abspath(self.workdir)),
        config=config_to_json(config) if config is not None else None,
        resume="allow",
      )

  def write(self, row: Mapping[str, Any]) -> None:
    """Appends ``row`` (must hold ``step``)."""
    row = to_json(dict(row))
    self._file.write(json.dumps(row, allow_nan=False) + "\n")
    self._file.flush()
    scalars = {
      k: v
      for k, v in row.items()
      if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    split = row.get("split", "train")
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(f"{split}/{k}", v, row["step"])
      self._tb.flush()
    if self._wandb is not None:
      self._wandb.log({f"{split}/{k}": v for k, v in scalars.items()}, step=row["step"])

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()
    if self.log.plots:
      plot_curves(self.workdir)

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# ----------------------------------------------------------------------------- logging


class _DropLibraryInfo(std_logging.Filter):
  """Drops INFO/DEBUG records logged from orbax (tens of lines per checkpoint)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def quiet_orbax_logging() -> None:
  """Hides orbax's INFO logging on the absl handler (warnings and errors still show).

  For scripts: call it once after ``absl.app.run`` has installed the handler.
  """
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _DropLibraryInfo) for f in handler.filters):
    handler.addFilter(_DropLibraryInfo())


def prepare(workdir: str | os.PathLike) -> str:
  """Creates ``workdir`` and returns its absolute path.

  Raises:
    ConfigError: (``workdir``) for an empty path, a path that is (or lies under) a file, a
      directory that cannot be created or is not writable.
  """
  raw = os.fspath(workdir) if workdir is not None else ""
  if not str(raw).strip():
    raise ConfigError("workdir", raw, "must name a directory (it is empty)")
  path = os.path.abspath(raw)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError("workdir", raw, "is a file, not a directory")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise ConfigError("workdir", raw, f"cannot be created: {e.strerror or e}") from None
  try:  # a write probe: os.access says yes to root on a read-only mount
    fd, probe = tempfile.mkstemp(prefix=".write_probe_", dir=path)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise ConfigError("workdir", raw, f"is not writable: {e.strerror or e}") from None
  return path


def write_config(workdir: str | os.PathLike, config: Any, **more: Any) -> None:
  """Writes ``<workdir>/config.json``: the config and optional descriptive parts."""
  write_json(os.path.join(os.fspath(workdir), CONFIG_FILE), {"config": config, **more})
