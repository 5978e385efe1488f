"""Shared command-line plumbing of the experiment scripts: one config system, one-line errors.

Every script defines ``--config`` with :func:`define_config` (an ``ml_collections`` config
file, ``experiments/configs/<name>.py``, whose ``get_config()`` returns the library's own
config dataclasses) and a plain ``--workdir``, and runs ``main`` with :func:`run`:

* any field, nested ones included, is overridable: ``--config.optimizer.learning_rate=1e-3``;
  a variant is chosen through the config string: ``--config=experiments/configs/x.py:quick``;
* a mistyped field, a malformed value or a bad setting (:class:`jaxrm.io.rundir.ConfigError`,
  e.g. a non-finite float anywhere in the config, an unusable ``--workdir``) or malformed data
  stops the script with one line on stderr naming it, exit status 2;
* a run that stops on purpose (:class:`jaxrm.io.rundir.RunStopped`: too many skipped updates,
  a diverged evaluation, ``nonfinite='raise'``) or cannot write (disk full, read-only files)
  prints one line saying what happened and naming the last good checkpoint, exit status 1;
  nothing past that checkpoint is lost, and the same command resumes from it. Any other
  exception is a bug and keeps its traceback;
* ``--help`` prints the script's docstring and every config field with its default;
  ``--helpfull`` (absl's spelling; ``--helpful`` is accepted too) lists every absl flag.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import contextlib
import dataclasses
import functools
import gc
import importlib.util
import os
import sys
import typing
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from jaxrm.io import compile_cache, rundir

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
_HELP = ("--help", "-h", "-help", "--helpshort", "-?")


def die(message: str, *, status: int = 2) -> None:
  """Prints ``<script>: error: <message>`` to stderr and exits with ``status`` (2: usage)."""
  print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
  sys.exit(status)


def define_config(
  name: str, help_string: str = "", *, aliases: Mapping[str, str] | None = None
) -> flags.FlagHolder:
  """Defines ``--config`` with default ``experiments/configs/<name>.py``.

  ``ml_collections`` already applies the ``--config.*`` overrides of ``sys.argv`` here, so the
  one-line errors of :func:`parse_flags` are given here too.

  Args:
    name: the config file's name under ``experiments/configs``.
    help_string: the flag's help.
    aliases: flags that stand for other arguments (``{'--quick': '--config=...:quick'}``);
      pass the same to :func:`run`.
  """
  default = os.path.join(CONFIG_DIR, f"{name}.py")
  argv = expand_aliases(sys.argv, aliases)
  spec = _config_spec(argv, default)
  with _one_line_flag_errors(argv, default):
    resolve_field_types(load_config(spec))
    # sys_argv: ml_collections must see the aliases' --config= too, or it would parse the
    # default now and the aliased file again later, defining the override flags twice.
    return config_flags.DEFINE_config_file(
      "config",
      default,
      help_string
      or f"Config file[:variant] (default experiments/configs/{name}.py); "
      "override any field with --config.<field>=<value>.",
      sys_argv=argv,
    )


def expand_aliases(argv: Sequence[str], aliases: Mapping[str, str] | None) -> list[str]:
  """Inserts the argument an alias stands for right after the program name (so an explicit
  ``--config=`` later in ``argv`` still wins); the alias itself stays."""
  argv = list(argv)
  extra = [aliases[a] for a in argv[1:] if aliases and a in aliases]
  return argv[:1] + extra + argv[1:]


def load_config(spec: str) -> Any:
  """``get_config()`` (or ``get_config(variant)``) of a config file ``path[:variant]``."""
  path, _, variant = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_jaxrm_config", path)
  if module_spec is None or not os.path.isfile(path):
    die(f"--config={spec}: no such config file")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


def config_fields(config: Any, prefix: str = "") -> list[tuple[str, Any]]:
  """``(dotted_path, value)`` of every leaf field of a (nested) config dataclass."""
  out = []
  for f in dataclasses.fields(config):
    value = getattr(config, f.name)
    if dataclasses.is_dataclass(value):
      out.extend(config_fields(value, f"{prefix}{f.name}."))
    else:
      out.append((f"{prefix}{f.name}", value))
  return out


def _config_spec(argv: Sequence[str], default: str | None = None) -> str:
  spec = default if default is not None else flags.FLAGS["config"].default_as_str or ""
  for arg in argv[1:]:
    if arg.startswith("--config="):
      spec = arg[len("--config=") :]
  return spec.strip("'\"")


def _unknown_override(argv: Sequence[str], default: str | None = None) -> str | None:
  """The first ``--config.<path>`` of ``argv`` that names no field, as a one-line message."""
  config = load_config(_config_spec(argv, default))
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config.") :].partition("=")[0]
    obj = config
    for i, part in enumerate(path.split(".")):
      if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
        where = ".".join(path.split(".")[:i]) or "the config"
        names = [f.name for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj) else []
        return (
          f"--config.{path}: no field {part!r} in {where} ({type(obj).__name__}); "
          f"fields: {', '.join(names) or 'none (not a section)'}"
        )
      obj = getattr(obj, part)
  return None


def resolve_field_types(config: Any) -> None:
  """Replaces string annotations of the config's dataclass fields by the types they name.

  ``ml_collections`` parses an override by the field's annotation; a module with postponed
  annotations (``from __future__ import annotations``) stores them as strings, which it
  cannot use. ``typing.get_type_hints`` resolves them, once per class.
  """
  if not dataclasses.is_dataclass(config):
    return
  cls = type(config)
  if any(isinstance(f.type, str) for f in dataclasses.fields(cls)):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
      f.type = hints.get(f.name, f.type)
  for f in dataclasses.fields(config):
    resolve_field_types(getattr(config, f.name))


def print_help(argv: Sequence[str]) -> None:
  """The script's docstring and its flags: with ``--config``, every config field with its
  default; without (``compare_results.py``, ``export_hf.py``), the flags the script defines."""
  main_doc = (sys.modules["__main__"].__doc__ or "").strip()
  if "config" not in flags.FLAGS:
    print(f"{main_doc}\n\nFlags:\n{flags.FLAGS.main_module_help()}\n  --helpfull: every absl flag")
    return
  spec = _config_spec(argv)
  lines = [main_doc, "", "Flags:"]
  lines.append(f"  --config=FILE[:VARIANT]  config file (now {spec})")
  lines.append("  --workdir=DIR            the run directory")
  lines.append("  --helpfull               every absl flag")
  lines.append("")
  lines.append("Config fields (override any with --config.<field>=<value>):")
  for path, value in config_fields(load_config(spec)):
    lines.append(f"  --config.{path}={value!r}")
  print("\n".join(lines))


def parse_flags(argv: list[str], aliases: Mapping[str, str] | None = None) -> list[str]:
  """absl flags parser with one-line errors and a useful ``--help``.

  Use as ``app.run(main, flags_parser=cli.parse_flags)`` (:func:`run` does).
  """
  argv = ["--helpfull" if a == "--helpful" else a for a in expand_aliases(argv, aliases)]
  if any(a in _HELP for a in argv[1:]):
    print_help([a for a in argv if a not in _HELP])
    sys.exit(0)
  with _one_line_flag_errors(argv):
    return flags.FLAGS(argv)
  return argv


@contextlib.contextmanager
def _one_line_flag_errors(argv: Sequence[str], default: str | None = None):
  try:
    yield
  except KeyError:  # ml_collections: an override naming no field
    die(_unknown_override(argv, default) or "unknown --config field")
  except (flags.Error, ValueError, TypeError, AttributeError) as e:
    die(str(e).splitlines()[0] if str(e) else type(e).__name__)


@contextlib.contextmanager
def one_line_errors():
  """Turns a user's mistake or a stopped run into one line on stderr and an exit status.

  * :class:`jaxrm.io.rundir.ConfigError`: ``--config.<field>=<value>: <why>``, status 2;
  * a malformed data file (``PreferenceDataError``, naming file, line and field), status 2;
  * :class:`jaxrm.io.rundir.RunStopped` (its message names the last good checkpoint), a
    failed write (disk full, read-only, permission: :func:`jaxrm.io.rundir.write_failure`)
    and running out of device or host memory (:func:`jaxrm.io.rundir.out_of_memory`),
    status 1.

  Anything else propagates with its traceback (a bug, not a mistake).
  """
  try:
    yield
  except rundir.ConfigError as e:
    die(e.flag_message())
  except rundir.RunStopped as e:
    die(str(e), status=1)
  except (ValueError, OSError, RuntimeError, MemoryError) as e:
    oom = rundir.out_of_memory(e)
    if oom is not None:
      die(
        f"out of memory: {oom} ({type(e).__name__}); lower what a step holds (the config's "
        "batch size, sequence lengths, new tokens or model size) and re-run",
        status=1,
      )
    reason = getattr(e, "reason", None)
    if type(e).__name__ == "PreferenceDataError" and reason is not None:
      hint = " (set --config.data.skip_malformed=True to skip such lines)"
      die(f"bad data: {e}{hint if getattr(e, 'skippable', False) else ''}")
    what = rundir.write_failure(e)
    if what is None:
      raise
    if type(e).__name__ == "CheckpointWriteError":
      _WRITER_THREADS_FAILED.append(True)
      die(str(e), status=1)
    where = getattr(e, "filename", None)
    if what in rundir.NOT_ONLY_WRITES:
      failed = f"{where}: {what}" if where else what
    else:
      failed = f"could not write{f' {where}' if where else ''}: {what}"
    die(
      f"{failed} ({type(e).__name__}); nothing past the last checkpoint is lost: free space "
      "(or fix the permissions) and re-run the same command to resume",
      status=1,
    )


def no_arguments(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    die(f"unexpected arguments {list(argv[1:])}")


_WRITER_THREADS_FAILED: list[bool] = []  # a checkpoint write failed in this process


def check_output_dir(flag: str, path: str | None) -> None:
  """Exits with ``--<flag>=<path>: is a file, not a directory`` (status 2) when ``path`` names
  an existing file; before any work, so that a run does not fail at its last write."""
  if path and os.path.exists(path) and not os.path.isdir(path):
    die(f"--{flag}={path}: is a file, not a directory")


def check_model_type(model_type: str | None) -> None:
  """Exits naming ``--model_type`` (status 2) unless it is None or a Hugging Face family
  jaxrm exports (:data:`jaxrm.io.hf.FAMILIES`)."""
  from jaxrm.io import hf  # noqa: PLC0415  (safetensors: imported on use)

  if model_type is not None and model_type not in hf.FAMILIES:
    die(f"--model_type={model_type}: must be one of {sorted(hf.FAMILIES)}")


def run(
  main: Callable[[list[str]], None],
  *,
  aliases: Mapping[str, str] | None = None,
  exit_process: bool = True,
) -> None:
  """``app.run(main)`` with :func:`parse_flags` (and the flag ``aliases`` of :func:`define_config`),
  after enabling the persistent compilation cache (:mod:`jaxrm.io.compile_cache`).

  Before ``main`` runs, every float of the config is checked to be finite
  (:func:`jaxrm.io.rundir.check_finite_fields`: ``--config.<any>.learning_rate=inf`` is a
  usage error in every script); ``main`` runs inside :func:`one_line_errors`.

  Args:
    main: the script's ``main(argv)``.
    aliases: see :func:`define_config`.
    exit_process: the process is the script's and ends when ``main`` does:
      :func:`freeze_objects` before and after ``main``, and after a failed checkpoint write
      ``os._exit(1)`` (no interpreter shutdown, during which orbax's failing writer threads
      would print tracebacks after the error line); in-process callers (tests) pass False.
  """

  def checked_main(argv: list[str]) -> None:
    try:
      with one_line_errors():
        if "config" in flags.FLAGS:
          rundir.check_finite_fields(flags.FLAGS["config"].value)
        main(argv)
    finally:
      if exit_process:
        freeze_objects()

  compile_cache.enable_compilation_cache()
  if exit_process:
    freeze_objects()
  try:
    app.run(checked_main, flags_parser=functools.partial(parse_flags, aliases=aliases))
  except SystemExit:
    if exit_process and _WRITER_THREADS_FAILED:
      # orbax's writer threads, still failing on the full disk, print tracebacks while the
      # interpreter shuts down (after the one error line); nothing of the run is left to
      # flush (metrics are flushed per row, checkpoints are closed), so leave at once.
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(1)  # pylint: disable=protected-access
    raise


def freeze_objects() -> None:
  """Takes every live object out of the garbage collector's generations (``gc.freeze``).

  :func:`run` calls it twice in a script's process (measured on the HH reward-model run,
  BUILD_NOTES.md, "Issue 14, session 39"):

  * when the imports are done: the collector's full passes during the run then skip the
    imported modules' objects (the run's collections 0.41–0.42 -> 0.14–0.17 s,
    ``benchmarks/run_phases.py --nofreeze`` against the default);
  * when ``main`` returns: the interpreter's shutdown then skips its passes over everything
    the run built (traced programs, caches, figures), the exit 0.66–0.99 -> 0.14–0.15 s.

  Nothing is skipped: modules are torn down, ``atexit`` handlers run and files close as
  before. Frozen objects are never collected, so only for objects that live as long as the
  process, or a process about to exit.
  """
  gc.freeze()


@dataclasses.dataclass(frozen=True)
class StudyFlags:
  """The flags :func:`study_flags` defines; pass ``aliases`` to :func:`run`."""

  config: flags.FlagHolder
  workdir: flags.FlagHolder
  aliases: dict[str, str]


def study_flags(name: str, default_workdir: str | None, workdir_help: str = "") -> StudyFlags:
  """A study script's flags: ``--config`` (``experiments/configs/<name>.py``), ``--workdir``
  (required when ``default_workdir`` is None) and ``--quick``, which stands for
  ``--config=experiments/configs/<name>.py:quick`` (the config's smoke-run variant)."""
  quick = f"--config={os.path.join(CONFIG_DIR, f'{name}.py')}:quick"
  aliases = {"--quick": quick}
  config = define_config(name, aliases=aliases)
  workdir = flags.DEFINE_string(
    "workdir",
    default_workdir,
    workdir_help or "Where results and caches go.",
    required=default_workdir is None,
  )
  flags.DEFINE_bool("quick", False, f"Tiny settings for a smoke run: the same as {quick}.")
  return StudyFlags(config, workdir, aliases)


def print_checks(results: Mapping[str, Any]) -> None:
  """Prints a study's pre-registered checks, one ``PASS``/``FAIL`` line each, pooled and per
  world where ``results['checks'][i]['per_world']`` exists (a bool or ``{'passed': bool}`` per
  world), after a banner when ``results['smoke_run']``."""
  if results["smoke_run"]:
    print("SMOKE RUN (--quick): tiny settings; the checks below are not evidence.")
  for c in results["checks"]:
    per_world = c.get("per_world")
    where = ""
    if per_world is not None:
      per = " ".join(
        f"{k}:{'PASS' if (v['passed'] if isinstance(v, Mapping) else v) else 'FAIL'}"
        for k, v in per_world.items()
      )
      where = f" (pooled; {per})"
    print(f"{'PASS' if c['passed'] else 'FAIL'}  {c['name']}{where}: {c['detail']}")
