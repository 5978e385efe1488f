"""experiments/compare_results.py: the reproduction check of a rerun against committed results."""

import json
import math

import pytest

from experiments.compare_results import compare, environment_differences, select
from tests.script_runner import run_subprocess

A = {
  "config": {"seed": 0, "name": "x"},
  "environment": {"host": "a"},
  "worlds": [{"gold": [0.5, 0.25, None], "check": True}],
}


def _b(**changes):
  b = json.loads(json.dumps(A))
  b["environment"] = {"host": "b"}
  b["worlds"][0].update(changes)
  return b


def test_equal_trees_are_the_same_and_ignored_keys_are_skipped():
  c = compare(A, _b(), ignore=("environment",))
  assert c.same and c.max_abs_diff == 0.0 and c.numeric_leaves == 4  # seed and 3 golds
  assert not compare(A, _b()).same  # the environment differs unless ignored


def test_numeric_difference_is_measured_and_thresholded():
  b = _b(gold=[0.5, 0.25 + 3e-7, None])
  c = compare(A, b, ignore=("environment",))
  assert c.max_abs_diff == pytest.approx(3e-7) and c.numbers_differ == [
    ("/worlds[0]/gold[1]", c.max_abs_diff)
  ]
  assert compare(A, b, atol=1e-6, ignore=("environment",)).same
  nan_vs_number = compare(A, _b(gold=[0.5, 0.25, 1.0]), atol=1.0, ignore=("environment",))
  assert math.isinf(nan_vs_number.max_abs_diff) and not nan_vs_number.same


def test_other_values_and_missing_keys_are_listed():
  b = _b(check=False, extra=1)
  del b["config"]["name"]
  c = compare(A, b, ignore=("environment",))
  assert c.values_differ == ["/worlds[0]/check"]
  assert c.only_in_a == ["/config/name"] and c.only_in_b == ["/worlds[0]/extra"]
  assert compare([1, 2], [1, 2, 3]).values_differ == ["/"]  # lists of different lengths
  with pytest.raises(ValueError, match="atol"):
    compare(A, A, atol=-1)


def test_environment_differences_name_each_differing_field():
  b = _b()
  b["environment"].update(cpu="Intel", isa=["avx2"])
  assert environment_differences(A, b) == [
    "host: 'a' vs 'b'",
    "cpu: None vs 'Intel'",
    "isa: None vs ['avx2']",
  ]
  assert environment_differences(A, A) == []
  assert environment_differences(A, {"worlds": []}) == []  # one run records no environment


def test_select_walks_keys_and_list_indices_and_names_a_missing_step():
  assert select(A, "worlds/0/gold") == [0.5, 0.25, None]
  assert select(A, "") is A
  for path, message in (
    ("worlds/1", "no '1' under worlds"),
    ("worlds/0/silver", "no 'silver' under worlds/0"),
    ("world", "no 'world' under the top level"),
  ):
    with pytest.raises(KeyError, match=message):
      select(A, path)


def test_script_exit_status_and_bad_file(tmp_path):
  a, b, bad = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "bad.json"
  a.write_text(json.dumps(A))
  b.write_text(json.dumps(_b(gold=[0.5, 0.3, None])))
  bad.write_text("{not json")
  diff = run_subprocess("experiments/compare_results.py", str(a), str(b), "--atol=0.01")
  assert diff.returncode == 1 and "/worlds[0]/gold[1]: 0.05" in diff.stdout, diff.stderr
  assert "DIFFERENT" in diff.stdout and "host: 'a' vs 'b'" in diff.stdout
  same = run_subprocess("experiments/compare_results.py", str(a), str(b), "--select=config")
  assert same.returncode == 0 and "SAME" in same.stdout, same.stderr
  missing = run_subprocess("experiments/compare_results.py", str(a), str(b), "--select=worlds/3")
  assert missing.returncode == 2 and "--select=worlds/3" in missing.stderr
  assert "a.json" in missing.stderr and "Traceback" not in missing.stderr
  err = run_subprocess("experiments/compare_results.py", str(a), str(bad))
  assert err.returncode == 2 and "bad.json" in err.stderr and "Traceback" not in err.stderr


def test_help_prints_the_docstring_and_the_scripts_own_flags():
  """A script without ``--config`` (compare_results.py) prints its docstring and its flags,
  not ``experiments.cli``'s config listing (which raised a KeyError for it)."""
  proc = run_subprocess("experiments/compare_results.py", "--help")
  assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
  assert "Compares two studies' ``results.json``" in proc.stdout
  for flag in ("--atol", "--ignore", "--select", "--helpfull"):
    assert flag in proc.stdout, flag
  assert "--config" not in proc.stdout
