"""Tests of the RL calibration script (RL on gold vs best-of-n on gold): outputs and the math."""

import json
import math
import os

import numpy as np
import pytest

from experiments import rl_calibration_lib as lib
from jaxrm.math import best_of_n as bon_lib
from tests.script_runner import run_script


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  """The ``--quick`` run (RLOO with 2 samples per prompt, to cover the grouped path)."""
  workdir = str(tmp_path_factory.mktemp("rl_calibration_quick"))

  class _Cap:  # a module-scoped fixture has no capfd; the run's output goes to the terminal
    def readouterr(self):
      return "", ""

  res = run_script(
    "rl_calibration",
    [f"--workdir={workdir}", "--quick", "--config.algo=rloo", "--config.rl.num_samples=2"],
    _Cap(),
  )
  assert res.code == 0, res.stderr[-3000:]
  with open(os.path.join(workdir, "results.json")) as f:
    return workdir, json.load(f)


def test_quick_run_writes_results_metrics_and_figure(results):
  workdir, r = results
  for name in ("results.json", "metrics.jsonl", "rl_calibration.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  assert r["smoke"] is True and r["config"]["algo"] == "rloo"
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  num_seeds, steps = r["config"]["num_seeds"], r["rl"]["step"]
  assert len(rows) == num_seeds * len(steps)
  assert {"step", "seed", "gold", "kl_exact", "kl_k1", "oracle_fraction"} <= set(rows[0])


def test_quick_results_follow_the_schema(results):
  _, r = results
  bon, rl = r["best_of_n"], r["rl"]
  assert bon["n"][0] == 1 and bon["n"][-1] == r["config"]["bon_max_n"]
  np.testing.assert_allclose(bon["kl"], np.log(bon["n"]) - (np.asarray(bon["n"]) - 1) / bon["n"])
  steps = rl["step"]
  assert steps[0] == 0 and steps[-1] == r["config"]["steps"]
  for key in ("gold", "kl_exact", "kl_k1", "feature_count", "oracle_fraction"):
    assert np.asarray(rl[key], float).shape == (r["config"]["num_seeds"], len(steps)), key
  # Step 0 evaluates pi_init itself: exactly zero KL.
  np.testing.assert_allclose(np.asarray(rl["kl_exact"])[:, 0], 0.0, atol=1e-5)
  cost = r["cost"]
  assert cost["sequences_per_step"] == r["config"]["batch_size"] * 2 and cost["rl_seconds"] > 0


def test_oracle_fraction_is_recomputed_from_the_curves(results):
  """KL* and the fractions, recomputed from results.json's curves with NumPy alone."""
  _, r = results
  kl_b, gold_b = np.asarray(r["best_of_n"]["kl"]), np.asarray(r["best_of_n"]["gold"])
  half = gold_b.max() / 2
  i = int(np.argmax(gold_b >= half))
  kl_star = np.interp(half, gold_b[i - 1 : i + 1], kl_b[i - 1 : i + 1]) if i else kl_b[0]
  assert r["bon_half_max"] == pytest.approx(half)
  assert r["kl_star"] == pytest.approx(kl_star)
  per_seed = []
  for kl, gold in zip(r["rl"]["kl_exact"], r["rl"]["gold"]):
    kl, gold = np.asarray(kl), np.asarray(gold)
    j = int(np.argmax(kl >= kl_star))
    if kl[j] < kl_star:
      per_seed.append(math.nan)
      continue
    g = np.interp(kl_star, kl[j - 1 : j + 1], gold[j - 1 : j + 1]) if j else gold[0]
    per_seed.append(g / half)
  got = [math.nan if x is None else x for x in r["oracle_fraction_at_kl_star"]["per_seed"]]
  np.testing.assert_allclose(got, per_seed, rtol=1e-6)
  mean = r["oracle_fraction_at_kl_star"]["mean"]
  assert mean is not None and math.isfinite(mean), "the quick run must reach KL*"
  assert r["oracle_fraction_at_kl_star"]["pass"] == (mean >= r["config"]["threshold"])
  ref = np.interp(np.asarray(r["rl"]["kl_exact"]), kl_b, gold_b)
  want = np.where(ref > 0, np.asarray(r["rl"]["gold"]) / np.where(ref > 0, ref, 1), np.nan)
  got = np.asarray(r["rl"]["oracle_fraction"], float)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_best_of_n_on_gold_matches_a_float64_sort_reference():
  """The estimator with gold as selector equals the mean of the top-of-subset by brute force."""
  rng = np.random.default_rng(0)
  gold = rng.normal(size=(3, 7))
  ns = np.array([1, 2, 4, 7])
  got, _ = bon_lib.batched_best_of_n_expected_reward(gold, gold, ns)
  # E[max of a uniformly random n-subset] = sum_i C(i-1, n-1)/C(N, n) * sorted[i-1].
  want = []
  for n in ns:
    w = np.array([math.comb(i - 1, n - 1) for i in range(1, 8)]) / math.comb(7, n)
    want.append(np.mean(np.sort(gold, axis=1) @ w))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_crossing_and_gold_at_kl_interpolate_linearly():
  x, y = np.array([0.0, 1.0, 3.0]), np.array([0.0, 2.0, 3.0])
  assert lib.crossing(x, y, 1.0) == pytest.approx(0.5)
  assert lib.crossing(x, y, 2.5) == pytest.approx(2.0)
  assert math.isnan(lib.crossing(x, y, 4.0))
  assert lib.gold_at_kl(x, y, 2.0) == pytest.approx(2.5)
  assert math.isnan(lib.gold_at_kl(x, y, 3.5))


@pytest.mark.parametrize(
  "arg, message",
  [
    ("--config.algo=sac", "--config.algo=sac: must be one of"),
    ("--config.rl.max_new_tokens=5", "--config.rl.max_new_tokens=5: must equal"),
    ("--config.steps=5", "--config.steps=5: must be a multiple of eval_every"),
  ],
)
def test_bad_setting_gives_a_one_line_error(tmp_path, capfd, arg, message):
  res = run_script("rl_calibration", [f"--workdir={tmp_path}", "--quick", arg], capfd)
  assert res.code == 2
  lines = res.stderr.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], res.stderr
