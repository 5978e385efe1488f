"""Tests of the study scripts' shared output: ``experiments.cli.print_checks``."""

from experiments import cli


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
