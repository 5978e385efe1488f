"""Every ``python benchmarks/...`` or ``python experiments/...`` command written in README.md
names a script that exists and flags that script defines, and its ``--config.<field>``
overrides name fields of its config (read from the sources and the configs; nothing is run)."""

from __future__ import annotations

import ast
import os
import re
import shlex

import pytest

from experiments import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABSL_FLAGS = {"help", "helpfull", "helpshort", "helpful"}
# experiments.cli's functions that define a script's --config (first argument: the config's
# name) and, for the studies, --workdir and --quick as well.
CONFIG_DEFINERS = {"define_config": set(), "study_flags": {"workdir", "quick"}}


def readme_commands(text: str) -> list[tuple[str, list[str]]]:
  """``(script, args)`` of each command in ``text``: continuation lines joined, a trailing
  ``# comment`` and anything after ``&&``, ``|`` or ``>`` dropped."""
  text = re.sub(r"\\\n\s*", " ", text)
  commands = []
  for match in re.finditer(r"python ((?:benchmarks|experiments)/\w+\.py)([^\n`]*)", text):
    rest = re.split(r"\s(?:#|&&|\||>)", match.group(2))[0]
    commands.append((match.group(1), shlex.split(rest)))
  return commands


def script_flags(path: str) -> tuple[set[str], str | None]:
  """The flags ``path`` defines (``flags.DEFINE_*("name", ...)`` calls anywhere in it) and
  the config file its ``--config`` defaults to (None: no ``--config``)."""
  with open(path) as f:
    tree = ast.parse(f.read())
  names, default = set(), None
  for node in ast.walk(tree):
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
      continue
    first = node.args[0] if node.args else None
    if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
      continue
    if node.func.attr.startswith("DEFINE"):
      names.add(first.value)
    elif node.func.attr in CONFIG_DEFINERS:
      names |= {"config"} | CONFIG_DEFINERS[node.func.attr]
      default = os.path.join(cli.CONFIG_DIR, f"{first.value}.py")
  return names, default


def _cases():
  with open(os.path.join(ROOT, "README.md")) as f:
    return readme_commands(f.read())


def test_readme_commands_are_found():
  commands = _cases()
  scripts = {script for script, _ in commands}
  assert len(commands) >= 20 and "experiments/overoptimization.py" in scripts
  # A continuation line and a trailing comment:
  text = "python experiments/a.py --x=1 \\\n    --y=2   # note --z\npython benchmarks/b.py | head"
  assert readme_commands(text) == [
    ("experiments/a.py", ["--x=1", "--y=2"]),
    ("benchmarks/b.py", []),
  ]


@pytest.mark.parametrize("script, args", _cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_readme_command_names_defined_flags_and_config_fields(script, args, monkeypatch):
  monkeypatch.chdir(ROOT)  # the commands' config paths are relative to the repository
  path = os.path.join(ROOT, script)
  assert os.path.isfile(path), f"README names {script}, which does not exist"
  names, default = script_flags(path)
  for arg in args:
    if not arg.startswith("--"):
      continue
    name = arg[2:].partition("=")[0]
    if name.startswith("config."):
      assert default is not None, f"{script} has no --config, but README passes {arg}"
      message = cli._unknown_override([script, *args], default)  # pylint: disable=protected-access
      assert message is None, f"README's {script} {' '.join(args)}: {message}"
    else:
      assert name in names | ABSL_FLAGS, (
        f"README passes {arg} to {script}, which defines {sorted(names)}"
      )
