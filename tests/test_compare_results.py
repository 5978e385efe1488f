"""experiments/compare_results.py: the reproduction check of a rerun against committed results."""

import json
import math

import pytest

from experiments.compare_results import compare
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


def test_script_exit_status_and_bad_file(tmp_path):
  a, b, bad = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "bad.json"
  a.write_text(json.dumps(A))
  b.write_text(json.dumps(_b(gold=[0.5, 0.3, None])))
  bad.write_text("{not json")
  diff = run_subprocess("experiments/compare_results.py", str(a), str(b), "--atol=0.01")
  assert diff.returncode == 1 and "/worlds[0]/gold[1]: 0.05" in diff.stdout, diff.stderr
  assert "DIFFERENT" in diff.stdout
  err = run_subprocess("experiments/compare_results.py", str(a), str(bad))
  assert err.returncode == 2 and "bad.json" in err.stderr and "Traceback" not in err.stderr
