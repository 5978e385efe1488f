"""Tests of the over-optimisation study: the --quick run's outputs and the analysis checks."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import overoptimization_analysis as analysis
from experiments import overoptimization_lib as lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "overoptimization.py")
# Prefixes of the quick run's 512 comparisons, and a nested field set from the command line.
_ARGS = ("--config.data_sizes=(256,384)", "--config.ppo.clip_eps=0.25")


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run(
    [sys.executable, SCRIPT, *args],
    capture_output=True,
    text=True,
    env=env,
    cwd=ROOT,
  )


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("overopt_quick"))
  proc = _run(f"--workdir={workdir}", "--quick", *_ARGS)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc


def test_quick_run_writes_every_output(quick_run):
  workdir, proc = quick_run
  for name in ("results.json", "summary.md", "figure1.png", "coefficients.png", "data_sizes.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  with open(os.path.join(workdir, "figure1.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert "PASS" in proc.stdout or "FAIL" in proc.stdout


def test_quick_results_follow_the_schema(quick_run):
  workdir, _ = quick_run
  with open(os.path.join(workdir, "results.json")) as f:
    r = json.load(f)
  sizes, seeds = len(r["proxies"]), r["config"]["num_seeds"]
  n_values = len(r["bon"]["ns"])
  assert np.shape(r["bon"]["gold"]) == (sizes, seeds, n_values)
  assert np.shape(r["bon"]["proxy"]) == (sizes, seeds, n_values)
  assert r["bon"]["ns"][0] == 1 and r["bon"]["ns"][-1] == r["config"]["bon_max_n"]
  np.testing.assert_allclose(np.asarray(r["bon"]["gold"])[..., 0], 0.0, atol=1e-6)
  windows = r["config"]["rl_steps"] // r["config"]["rl_log_every"]
  assert r["rl"]["step"] == [(i + 1) * r["config"]["rl_log_every"] for i in range(windows)]
  for key in ("kl", "gold", "proxy"):
    assert np.shape(r["rl"][key]) == (sizes, seeds, windows)
    assert np.all(np.isfinite(r["rl"][key]))
  for kind in ("bon", "rl"):
    assert len(r["fits"][kind]) == sizes
    for fit in r["fits"][kind]:
      assert {"alpha", "beta", "alpha_ci", "beta_ci", "r_squared"} <= set(fit)
  for p in r["proxies"]:
    assert p["num_params"] > 0 and len(p["heldout_accuracy"]) == seeds
  names = {c["name"] for c in r["checks"]}
  assert {
    "bon_proxy_monotone",
    "bon_gold_peaks_for_smaller_proxies",
    "bon_fit_r2",
    "beta_bon_falls_with_size",
    "gold_peak_rises_with_size",
    "rl_spends_more_kl_than_bon",
    "seeds",
  } == names
  assert all(isinstance(c["passed"], bool) for c in r["checks"])
  assert [e["num_comparisons"] for e in r["data_sweep"]] == [256, 384]
  for entry in r["data_sweep"]:
    assert np.shape(entry["bon_gold"]) == (sizes, seeds, n_values)
    assert len(entry["proxies"]) == sizes
  assert [e["num_comparisons"] for e in r["data_fits"]] == [256, 384, 512]  # with the main run
  assert all(len(e["fits"]) == sizes for e in r["data_fits"])


def test_rerun_reuses_the_cached_stages(quick_run):
  workdir, _ = quick_run
  with open(os.path.join(workdir, "results.json")) as f:
    first = json.load(f)
  proc = _run(f"--workdir={workdir}", "--quick", *_ARGS)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "results.json")) as f:
    second = json.load(f)
  assert second["bon"] == first["bon"] and second["rl"] == first["rl"]
  assert second["timing_this_invocation"]["proxies"] < first["timing_this_invocation"]["proxies"]


def test_nested_override_from_the_command_line_reaches_the_study(quick_run):
  workdir, _ = quick_run
  for name in ("results.json", "config.json"):
    with open(os.path.join(workdir, name)) as f:
      config = json.load(f)["config"]
    assert config["ppo"]["clip_eps"] == 0.25 and config["ppo"]["num_epochs"] == 2
    assert config["data_sizes"] == [256, 384] and config["num_seeds"] == 2  # the quick variant


@pytest.mark.parametrize(
  "arg, message",
  [
    ("--config.proxy_sizes=('2x10x3',)", "--config.proxy_sizes=2x10x3: needs positive sizes"),
    ("--config.ppo.num_epochz=3", "no field 'num_epochz' in ppo"),
    ("--config.ppo.max_new_tokens=5", "--config.ppo.max_new_tokens=5: must equal"),
  ],
)
def test_bad_setting_gives_a_one_line_error(tmp_path, arg, message):
  proc = _run(f"--workdir={tmp_path}", "--quick", arg)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], proc.stderr


def test_every_field_is_in_a_stage_cache_key_and_ppo_settings_key_the_rl_stage():
  fields = {f.name for f in dataclasses.fields(lib.StudyConfig)}
  keyed = set(lib.RL_FIELDS) | set(lib.BON_FIELDS) | set(lib.SELECTION_FIELDS)
  assert fields <= keyed, fields - keyed
  a, b = lib.StudyConfig(), lib.StudyConfig()
  b.ppo.num_epochs = 3
  assert a.fingerprint(*lib.RL_FIELDS) != b.fingerprint(*lib.RL_FIELDS)
  assert a.fingerprint(*lib.BON_FIELDS) == b.fingerprint(*lib.BON_FIELDS)


def _synthetic_results(betas, params, *, rl_gold_scale=1.0, seeds=3):
  """Curves following Gao et al.'s forms exactly, with tiny seed noise."""
  rng = np.random.default_rng(0)
  ns = np.unique(np.round(2.0 ** np.arange(0, 12.01, 0.5)).astype(int))
  kl = np.log(ns) - (ns - 1) / ns
  d = np.sqrt(kl)
  gold = np.stack(
    [[d * (1.0 - b * d) + rng.normal(0, 0.005, d.shape) for _ in range(seeds)] for b in betas]
  )
  gold -= gold[..., :1]
  proxy = np.stack([[d * 1.5 for _ in range(seeds)] for _ in betas])
  steps = np.arange(1, 41)
  rl_kl = np.broadcast_to(0.5 * steps, (len(betas), seeds, 40))  # RL moves in KL steadily
  rl_d = np.sqrt(rl_kl)
  rl_gold = np.stack(
    [
      [rl_gold_scale * rl_d[0, 0] * (0.5 - 0.3 * b * np.log(rl_d[0, 0])) for _ in range(seeds)]
      for b in betas
    ]
  )
  return {
    "proxies": [
      {"name": f"P{i}", "num_params": p, "heldout_accuracy": [0.8] * seeds}
      for i, p in enumerate(params)
    ],
    "bon": {"ns": ns, "kl": kl, "gold": gold, "proxy": proxy},
    "rl": {"kl": np.asarray(rl_kl), "gold": rl_gold, "proxy": rl_gold * 2},
  }


def _checks(results):
  fits = analysis.fit_curves(results)
  checks, _ = analysis.run_checks(results, fits)
  return {c["name"]: c["passed"] for c in checks}, fits


def test_checks_pass_on_curves_with_the_expected_shape():
  results = _synthetic_results(betas=[0.5, 0.4, 0.3, 0.2, 0.1], params=[1e3, 4e3, 1.5e4, 4e4, 1e5])
  passed, fits = _checks(results)
  assert all(passed.values()), passed
  np.testing.assert_allclose([f["beta"] for f in fits["bon"]], [0.5, 0.4, 0.3, 0.2, 0.1], atol=0.01)


def test_checks_fail_when_the_shape_is_wrong():
  # beta rising with size, and no fall: the trend and peak checks must fail.
  results = _synthetic_results(
    betas=[0.0, 0.01, 0.02, 0.03, 0.04], params=[1e3, 4e3, 1.5e4, 4e4, 1e5]
  )
  passed, _ = _checks(results)
  assert not passed["beta_bon_falls_with_size"]
  assert not passed["bon_gold_peaks_for_smaller_proxies"]
  # RL reaching gold at a smaller KL than best-of-n must fail the RL check.
  results = _synthetic_results(
    betas=[0.5, 0.4, 0.3, 0.2, 0.1], params=[1e3, 4e3, 1.5e4, 4e4, 1e5], rl_gold_scale=20.0
  )
  passed, _ = _checks(results)
  assert not passed["rl_spends_more_kl_than_bon"]
  passed, _ = _checks(_synthetic_results(betas=[0.5, 0.3], params=[1e3, 1e4], seeds=2))
  assert not passed["seeds"]
