"""Tests of the objective-mismatch study: the --quick run's outputs and the analysis checks."""

import dataclasses
import json
import os

import numpy as np
import pytest

from experiments import objective_mismatch_analysis as analysis
from experiments import objective_mismatch_lib as lib
from experiments import objective_mismatch_outcomes as outcomes
from jaxrm.io.rundir import ConfigError
from tests import script_runner


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  return script_runner.quick_run(tmp_path_factory, "objective_mismatch")


def test_quick_run_writes_every_output_labelled_as_a_smoke_run(quick_run):
  workdir, proc = quick_run
  for name in ("results.json", "summary.md", "scatter.png", "correlations.png", "within_run.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  for name in ("scatter.png", "correlations.png", "within_run.png"):
    with open(os.path.join(workdir, name), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert "SMOKE RUN" in proc.stdout and ("PASS" in proc.stdout or "FAIL" in proc.stdout)
  with open(os.path.join(workdir, "summary.md")) as f:
    assert "SMOKE RUN" in f.read()


def test_quick_results_follow_the_schema(quick_run):
  workdir, _ = quick_run
  with open(os.path.join(workdir, "results.json")) as f:
    r = json.load(f)
  cfg = r["config"]
  assert r["smoke_run"] is True
  runs = len(cfg["proxy_sizes"]) * len(cfg["data_sizes"]) * len(cfg["label_noises"])
  per_world = runs * len(cfg["losses"]) * len(cfg["train_steps"]) * cfg["bt_replicates"]
  assert len(r["proxies"]) == per_world * len(cfg["world_seeds"])
  evals = {k for k, _, _ in analysis.EVALUATIONS}
  num_ns = len(r["bon_ns"])
  for p in r["proxies"]:
    assert evals <= set(p)
    assert 0.0 <= p["acc"] <= 1.0 and 0.0 <= p["bok_acc"] <= 1.0 and p["bok_regret"] >= 0
    assert len(p["bon_gold"]) == len(p["bon_proxy"]) == num_ns and p["bon_gold"][0] == 0.0
    assert np.shape(p["bon_gold_prompts"]) == (cfg["bon_prompts"], len(cfg["bon_outcome_ns"]))
    assert f"bon_gold_n{cfg['bon_outcome_ns'][0]}" in p["outcomes"]
  rl = [p for p in r["proxies"] if "rl" in p]
  assert len(rl) == cfg["rl_per_size"] * len(cfg["rl_sizes"]) * len(cfg["world_seeds"])
  assert {p["size"] for p in rl} == {lib.ProxySize.parse(s).name for s in cfg["rl_sizes"]}
  for p in rl:
    assert {k: len(v) for k, v in p["rl"].items()} == {k: len(r["rl_step"]) for k in p["rl"]}
  for w in cfg["world_seeds"]:
    assert len(r["oracle"][str(w)]["bon"]) == num_ns and "rl" in r["oracle"][str(w)]
  primary = r["correlations"][cfg["primary_outcome"]]
  assert {"all", "world 0"} | {f"world 0 / size {p['size']}" for p in r["proxies"]} <= set(primary)
  cell = primary["all"]["spearman"]["acc"]
  assert cell["low"] <= cell["estimate"] <= cell["high"]
  assert [row["evaluation"] for row in r["ranking"]] and len(r["ranking"]) == len(evals)
  names = {c["name"] for c in r["checks"]}
  assert {
    "accuracy_gold_correlation_positive",
    "weaker_within_size_than_across",
    "near_equal_accuracy_proxies_differ",
    "best_of_k_predicts_better_than_pairwise",
    "one_vs_many_predicts_better_than_pairwise",
    "within_run_correlation_collapses_after_peak",
  } <= names
  assert set(r["within_run"]) == {"bon", "rl"}


@pytest.mark.parametrize(
  "arg, message",
  [
    ("--config.data_sizes=(100,256)", "--config.data_sizes"),
    ("--config.losses=('hinge',)", "--config.losses"),
    ("--config.primary_outcome=rl_gold_peak", "--config.primary_outcome=rl_gold_peak"),
  ],
)
def test_bad_setting_gives_a_one_line_error(tmp_path, arg, message):
  proc = script_runner.run_subprocess(
    "experiments/objective_mismatch.py", f"--workdir={tmp_path}", "--quick", arg
  )
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], proc.stderr


@pytest.mark.parametrize(
  "fields, message",
  [
    (dict(rl_compile_opt_level=7), "--config.rl_compile_opt_level=7"),
    (dict(rl_batch_size=15), "--config.ppo.num_minibatches=2: must divide the 15 sequences"),
    (dict(rl_batch_size=0), "--config.rl_batch_size=0: must be >= 1"),
    (dict(rl_learning_rate=0.0), "--config.rl_learning_rate=0.0: must be > 0"),
    (dict(rm_learning_rate=-1e-3), "--config.rm_learning_rate=-0.001: must be > 0"),
    (dict(rm_batch_size=0), "--config.rm_batch_size=0: must be >= 1"),
    (dict(center_coef=-0.1), "--config.center_coef=-0.1: must be >= 0"),
    (dict(label_noises=(0.0, 0.0)), "--config.label_noises=0.0,0.0: must be distinct"),
    (dict(proxy_sizes=("1x8x2", "1x8x4")), "--config.proxy_sizes=1x8x2,1x8x4: must have distinct"),
  ],
)
def test_bad_settings_are_refused_before_any_stage_naming_the_field(fields, message):
  with pytest.raises(ConfigError) as e:
    lib.validate(dataclasses.replace(lib.MismatchConfig(), **fields))
  assert message in e.value.flag_message()


def test_every_field_is_in_a_stage_cache_key_or_read_by_the_analysis_only():
  fields = {f.name for f in dataclasses.fields(lib.MismatchConfig)}
  keyed = set(lib.RL_FIELDS) | set(lib.ANALYSIS_FIELDS)
  assert fields <= keyed, fields - keyed
  a, b = lib.MismatchConfig(), lib.MismatchConfig()
  b.ppo.num_epochs = 3
  assert a.fingerprint(*lib.RL_FIELDS) != b.fingerprint(*lib.RL_FIELDS)
  assert a.fingerprint(*lib.EVAL_FIELDS) == b.fingerprint(*lib.EVAL_FIELDS)


def test_rl_subset_is_stratified_by_accuracy():
  cfg = lib.MismatchConfig(rl_per_size=3)
  members = [{"acc": a} for a in np.linspace(0.6, 0.9, 12)[::-1]]
  chosen = outcomes.rl_subset(cfg, members)
  accs = sorted(members[i]["acc"] for i in chosen)
  assert len(chosen) == 3 and accs[0] < 0.7 and 0.7 < accs[1] < 0.8 and accs[2] > 0.8


def _synthetic(noise_scale, *, worlds=2, per_world=40, seed=0):
  """Results whose gold outcome is accuracy + noise; BoN gold rises then falls."""
  rng = np.random.default_rng(seed)
  ns = [1, 2, 4, 8, 16, 32]
  proxies = []
  for w in range(worlds):
    for i in range(per_world):
      acc = rng.uniform(0.6, 0.9)
      level = 10 * (acc - 0.6) + noise_scale * rng.normal()
      shape = np.array([0, 0.3, 0.6, 0.8, 0.7, 0.5])
      gold = (level * shape).tolist()
      p = {
        "world": w,
        "size": f"S{i % 2}",
        "num_comparisons": 100 * (1 + i % 3),
        "label_noise": 0.0,
        "loss": "bt",
        "train_steps": 10,
        "bon_gold": gold,
        "bon_proxy": list(np.arange(6.0)),
        "bon_gold_prompts": (level * 0.5 + 0.01 * rng.normal(size=(8, 1))).tolist(),
      }
      for k, _, s in analysis.EVALUATIONS:
        p[k] = s * (acc + 0.05 * rng.normal())
      p["acc"] = acc
      p["bok_acc"] = acc
      p["ovm_acc"] = acc + 0.2 * rng.normal()
      proxies.append(p)
  config = dataclasses.asdict(
    lib.MismatchConfig(
      world_seeds=tuple(range(worlds)),
      bon_outcome_ns=(16,),
      primary_outcome="bon_gold_n16",
      bootstrap_resamples=200,
      rl_per_size=0,
    )
  )
  return {
    "config": config,
    "smoke_run": False,
    "bon_ns": ns,
    "bon_kl": list(np.log(ns)),
    "oracle": {str(w): {"bon": [0, 1, 2, 3, 4, 5]} for w in range(worlds)},
    "proxies": proxies,
  }


def _checks(results):
  outs = [analysis.outcomes(results, p) for p in results["proxies"]]
  table = analysis.correlations(results, outs, resamples=200)
  near = analysis.near_equal(results, outs, tolerance=0.01)
  runs = analysis.within_run(results)
  return {c["name"]: c["passed"] for c in analysis.run_checks(results, outs, table, near, runs)}


def test_checks_pass_and_fail_where_the_hypotheses_hold_and_do_not():
  strong = _checks(_synthetic(0.05))  # gold follows accuracy closely
  assert strong["accuracy_gold_correlation_positive"]
  assert strong["within_run_correlation_collapses_after_peak"]
  assert not strong["one_vs_many_predicts_better_than_pairwise"]  # a noisier copy of accuracy
  none = _checks(_synthetic(50.0))  # gold unrelated to accuracy
  assert not none["accuracy_gold_correlation_positive"]
  # Near-equal accuracy with different gold (per-prompt s.e. tiny) must be flagged.
  assert none["near_equal_accuracy_proxies_differ"]


def test_rl_gold_at_a_kl_budget_interpolates_along_the_run():
  curves = {"kl": [1.0, 2.0, 4.0], "gold": [0.2, 0.6, 0.2]}
  assert analysis._at_kl(curves, 0.5) == pytest.approx(0.1)  # noqa: SLF001
  assert analysis._at_kl(curves, 3.0) == pytest.approx(0.4)  # noqa: SLF001
  assert np.isnan(analysis._at_kl(curves, 5.0))  # noqa: SLF001
