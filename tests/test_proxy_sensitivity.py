"""Smoke test of the proxy-sensitivity diagnostic (experiments/proxy_sensitivity.py)."""

import json
import os

from tests import script_runner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  return script_runner.run_subprocess("experiments/proxy_sensitivity.py", *args)


def test_writes_one_row_per_size_with_both_runs(tmp_path):
  proc = _run(
    "--config=" + os.path.join(ROOT, "experiments", "configs", "overoptimization.py") + ":quick",
    "--config.proxy_sizes=('1x8x2',)",
    "--config.num_seeds=2",
    f"--workdir={tmp_path}",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads((tmp_path / "sensitivity.json").read_text())
  assert out["relative_perturbation"] == 1e-6
  [row] = out["sizes"]
  assert row["size"] == "L1W8" and len(row["heldout_accuracy"]) == 2
  assert len(row["heldout_accuracy_perturbed"]) == 2
  assert row["max_abs_accuracy_change"] >= 0 and "L1W8" in proc.stdout


def test_rejects_a_zero_perturbation(tmp_path):
  proc = _run("--relative_perturbation=0", f"--workdir={tmp_path}")
  assert proc.returncode == 2 and "--relative_perturbation" in proc.stderr
  assert "Traceback" not in proc.stderr
