"""Tests of the scripts' shared plumbing: ``experiments.cli.print_checks`` and the exit of
``experiments.cli.run``."""

import os
import subprocess
import sys
import textwrap

import pytest

from experiments import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _checks(per_world):
  check = {"name": "trend", "passed": False, "detail": "rho=0.1 [-0.2, 0.4]"}
  if per_world is not None:
    check["per_world"] = per_world
  return {"smoke_run": False, "checks": [check, {"name": "other", "passed": True, "detail": "ok"}]}


def test_print_checks_pooled_and_per_world_as_bools_or_dicts(capsys):
  cli.print_checks(_checks({"world0": True, "world1": False}))
  bools = capsys.readouterr().out
  cli.print_checks(_checks({"world0": {"passed": True}, "world1": {"passed": False}}))
  dicts = capsys.readouterr().out
  assert bools == dicts
  lines = bools.splitlines()
  assert lines[0] == "FAIL  trend (pooled; world0:PASS world1:FAIL): rho=0.1 [-0.2, 0.4]"
  assert lines[1] == "PASS  other: ok"  # a check without per-world results


def test_print_checks_without_worlds_and_the_smoke_banner(capsys):
  results = _checks(None)
  cli.print_checks(results)
  assert capsys.readouterr().out.splitlines()[0] == "FAIL  trend: rho=0.1 [-0.2, 0.4]"
  cli.print_checks({**results, "smoke_run": True})
  out = capsys.readouterr().out.splitlines()
  assert out[0].startswith("SMOKE RUN") and out[1].startswith("FAIL  trend")


@pytest.mark.parametrize("exit_process", [True, False])
def test_run_freezes_the_objects_only_in_a_scripts_process(exit_process):
  """``cli.run`` takes the live objects out of the collector's generations before ``main``
  (the imported modules') and after it (the run's, before the shutdown); an in-process
  caller's are left alone."""
  script = textwrap.dedent(f"""
    import atexit, gc, sys
    sys.path.insert(0, {ROOT!r})
    from experiments import cli
    atexit.register(lambda: print("at exit", gc.get_freeze_count()))
    def main(argv):
      global made
      print("in main", gc.get_freeze_count())
      made = [[i] for i in range(5000)]  # tracked objects born in main
    try:
      cli.run(main, exit_process={exit_process})
    except SystemExit:
      pass
  """)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
  assert proc.returncode == 0, proc.stderr[-2000:]
  counts = {k: int(v) for k, v in (line.rsplit(" ", 1) for line in proc.stdout.splitlines())}
  if exit_process:
    assert counts["in main"] > 10_000  # the imports' objects
    assert counts["at exit"] >= counts["in main"] + 5000  # and main's
  else:
    assert counts == {"in main": 0, "at exit": 0}
