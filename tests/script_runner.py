"""Runs an experiment script's ``main`` in this process, as its command line would.

A script defines its absl flags (``--config``, ``--workdir``, ...) when it is imported, and
``--config`` reads ``sys.argv`` then; :func:`run_script` therefore removes the flags a previous
call defined, imports the script afresh under the given ``sys.argv`` and runs it through
:func:`experiments.cli.run` (``absl.app.run`` with the scripts' one-line flag errors). This
costs no interpreter start and no JAX import, and compiled functions are shared between calls
(the error tests of each script make many short runs).

:func:`run_subprocess` runs a script in a fresh process instead, as a user's command would
(one CPU device), and :func:`quick_run` a study's ``--quick`` run that way.

A user mistake ends in ``SystemExit`` with a code and one line on stderr; a bug propagates as
the exception itself, so a test that expects a clean error fails with its traceback.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from typing import NamedTuple

from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "experiments")
# The flags the scripts that tests run in-process define (forgotten before each run).
_SCRIPT_FLAGS = (
  *("config", "workdir", "quick"),
  *("out", "out_dir", "step", "which", "model_type", "export_dir"),
)


class Result(NamedTuple):
  code: int  # the exit status (0: main returned)
  stderr: str
  stdout: str


def _forget_script_flags() -> None:
  for name in list(flags.FLAGS):
    if name in _SCRIPT_FLAGS or name.startswith("config."):
      delattr(flags.FLAGS, name)


def run_script(name: str, argv: list[str], capfd) -> Result:
  """Runs ``experiments/<name>.py`` with ``argv`` (its flags) in-process.

  Args:
    name: the script's module name (``'train_reward_model'``).
    argv: its command-line arguments.
    capfd: pytest's ``capfd`` fixture; the output of earlier calls is discarded first.

  Returns:
    The exit status and what the run printed.
  """
  capfd.readouterr()
  path = os.path.join(SCRIPTS, f"{name}.py")
  saved_argv = sys.argv
  sys.argv = [path, *argv]
  _forget_script_flags()
  # The log lines a user sees on stderr (pytest's own logging capture hides them otherwise).
  logger = logging.getLogger("absl")
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("%(levelname).1s %(message)s"))
  saved_level = logger.level
  logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  try:
    spec = importlib.util.spec_from_file_location(f"_script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    code = 0
    try:
      spec.loader.exec_module(module)
      from experiments import cli  # noqa: PLC0415  (after the script put the root on the path)

      study = getattr(module, "_FLAGS", None)  # a study script's cli.study_flags (--quick)
      aliases = study.aliases if isinstance(study, cli.StudyFlags) else None
      cli.run(module.main, aliases=aliases, exit_process=False)
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  finally:
    logger.removeHandler(handler)
    logger.setLevel(saved_level)
    sys.argv = saved_argv
    flags.FLAGS.unparse_flags()
  out, err = capfd.readouterr()
  return Result(code, err, out)


def error_line(result: Result) -> str:
  """The one ``error:`` line of a failed run (asserts it is there, once, with no traceback)."""
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  lines = [line for line in result.stderr.splitlines() if ": error: " in line]
  assert len(lines) == 1, result.stderr[-3000:]
  return lines[0]


def one_device_env() -> dict[str, str]:
  """The environment for a script run as a user's command: this process's (the suite's
  compilation cache and compile settings, tests/conftest.py) on one CPU device, i.e. without
  the forced host devices in ``XLA_FLAGS``."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  xla_flags = [f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
  env["XLA_FLAGS"] = " ".join(xla_flags)
  return env


def run_subprocess(path: str, *args: str) -> subprocess.CompletedProcess:
  """Runs the repository's script ``path`` (relative to the root) with ``args`` in a fresh
  Python process, as a user's command would: on one CPU device (the suite's forced host
  devices removed from ``XLA_FLAGS``; :func:`one_device_env`) and without ``PYTHONPATH``, so
  that a script finds the repository's ``experiments`` and ``benchmarks`` packages itself."""
  env = one_device_env()
  env.pop("PYTHONPATH", None)
  return subprocess.run(
    [sys.executable, os.path.join(ROOT, path), *args],
    capture_output=True,
    text=True,
    env=env,
    cwd=ROOT,
  )


def quick_run(tmp_path_factory, name: str, *args: str) -> tuple[str, subprocess.CompletedProcess]:
  """``experiments/<name>.py --quick *args`` in a fresh workdir (asserts it succeeded);
  returns the workdir and the finished process. For a test module's fixture."""
  workdir = str(tmp_path_factory.mktemp(f"{name}_quick"))
  proc = run_subprocess(f"experiments/{name}.py", f"--workdir={workdir}", "--quick", *args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc
