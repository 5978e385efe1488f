"""Tests of the DPL study: its trainer, its --quick run's outputs and schema, and resume."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import stats

from experiments import dpl_analysis, dpl_lib
from jaxrm.math import preference
from jaxrm.models.distributional_rm import DistributionalRewardModel, Head
from jaxrm.models.reward_model import RewardModel
from jaxrm.models.transformer import TransformerConfig
from jaxrm.steps import rm_step
from jaxrm.steps.rm_sweep import RewardModelSweep
from tests.script_runner import run_script

CFG = TransformerConfig(vocab_size=7, num_layers=1, width=8, num_heads=2, max_len=6)


def _pairs(n=96):
  k1, k2 = jax.random.split(jax.random.key(5))
  chosen = jax.random.randint(k1, (n, 6), 0, 7)
  rejected = jax.random.randint(k2, (n, 6), 0, 7)
  mask = jnp.ones((n, 6), bool)
  return {"chosen": chosen, "chosen_mask": mask, "rejected": rejected, "rejected_mask": mask}


def test_output_pair_step_sweep_with_a_scalar_model_is_the_reward_model_step_sweep():
  # Same init, data order and update: from the same states, each step of RewardModelSweep
  # (across epoch boundaries) gives the same loss and parameters with either step function.
  # Plain SGD, so a parameter differs by lr times its gradient's rounding; Adam would turn the
  # rounding of the reward shift's zero gradients into steps of ~lr, and fourteen chained steps
  # would compound the rest (BUILD_NOTES.md, "Test suite").
  pairs, model = _pairs(), RewardModel(CFG)
  kw = dict(
    init_fn=lambda k: model.init(k, pairs["chosen"][:1], pairs["chosen_mask"][:1]),
    apply_fn=model.apply,
    loss_fn=preference.bradley_terry_loss,
    optimizer=optax.sgd(0.1),
    batch_size=16,
  )
  ref = RewardModelSweep(**kw)
  ours = RewardModelSweep(**kw, step_fn=rm_step.output_pair_step)
  states = ref.init(jax.random.split(jax.random.key(0), 2))
  start = jax.tree.map(jnp.copy, states)  # train() donates the states it is given
  for _ in range(14):  # 6 steps per epoch
    s_out, m_out = ours.train(
      jax.tree.map(jnp.copy, states), pairs, num_steps=1, chunk=1, log_every_chunk=False
    )
    states, m_ref = ref.train(states, pairs, num_steps=1, chunk=1, log_every_chunk=False)
    np.testing.assert_allclose(m_out["loss"], m_ref["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 s_out.params, states.params)  # fmt: skip
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), states.params, start.params)
  assert max(jax.tree.leaves(moved)) > 0.1


def test_output_pair_step_sweep_trains_a_distributional_head():
  pairs = _pairs()
  head = Head("categorical", num_atoms=4)
  model = DistributionalRewardModel(CFG, head=head)
  sweep = RewardModelSweep(
    step_fn=rm_step.output_pair_step,
    init_fn=lambda k: model.init(k, pairs["chosen"][:1], pairs["chosen_mask"][:1]),
    apply_fn=model.apply,
    loss_fn=head.loss_fn(entropy_coef=0.1),
    optimizer=optax.adam(3e-2),
    batch_size=32,
  )
  states, metrics = sweep.train(
    sweep.init(jax.random.split(jax.random.key(1), 2)), pairs, num_steps=30, log_every_chunk=False
  )
  assert metrics["loss"].shape == (2, 30) and int(states.num_skipped.sum()) == 0
  assert float(metrics["loss"][:, -5:].mean()) < float(metrics["loss"][:, :5].mean())


def test_every_config_field_is_in_a_stage_key_or_labelled():
  fields = {f.name for f in __import__("dataclasses").fields(dpl_lib.DPLConfig)}
  keyed = set(dpl_lib.BON_FIELDS) | set(dpl_lib.SELECTION_FIELDS) | set(dpl_lib.LABEL_FIELDS)
  assert fields == keyed


# --------------------------------------------------------------------------- the --quick run
_ARGS = ("--quick", "--config.world_seeds=(0,)")


def test_quick_run_writes_every_output_with_the_schema_and_resumes_identically(tmp_path, capfd):
  workdir = str(tmp_path / "dpl_quick")
  result = run_script("dpl", [f"--workdir={workdir}", *_ARGS], capfd)
  assert result.code == 0, result.stderr[-3000:]
  assert "SMOKE RUN" in result.stdout
  for name in ("results.json", "summary.md", "dpl_bon.png", "dpl_variance.png", "config.json"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  with open(os.path.join(workdir, "dpl_bon.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(os.path.join(workdir, "results.json")) as f:
    r = json.load(f)
  assert r["smoke_run"] is True
  assert {"config", "environment", "worlds", "checks", "timing_this_invocation"} <= set(r)
  names = [c["name"] for c in r["checks"]]
  for kind in dpl_lib.DPL_KINDS:
    for check in ("variance_tracks_disagreement", "r2_lower_with_hidden_context",
                  "risk_averse_raises_worst_group_gold", "risk_averse_improves_group1",
                  "risk_averse_improves_group2"):  # fmt: skip
      assert f"{check}[{kind}]" in names
  for c in r["checks"]:
    assert set(c) >= {"name", "hypothesis", "value", "ci95", "passed", "per_world", "detail"}
    assert list(c["per_world"]) == ["world0"] and len(c["ci95"]) == 2
    assert f"{'PASS' if c['passed'] else 'FAIL'}  {c['name']}" in result.stdout
  (w,) = r["worlds"]
  assert set(w["stats"]["diagnostics"]) == {f"{k}/{lab}" for k, lab in dpl_lib.arms(
    dpl_lib.DPLConfig(control=True))}  # fmt: skip
  assert set(w["stats"]["bon"]) == set(dpl_lib.selectors(dpl_lib.DPLConfig()))
  ns = w["bon"]["ns"]
  assert ns[0] == 1 and ns[-1] == 32 and len(w["bon"]["kl"]) == len(ns)
  for s in w["stats"]["bon"].values():
    assert np.asarray(s["curve_mean"]).shape == (2, len(ns))
    assert np.asarray(s["curve_band"]).shape == (2, 2, len(ns))
    assert s["curve_mean"][0][0] == 0.0  # re-centred: pi_init (n = 1) scores 0
  with open(os.path.join(workdir, "summary.md")) as f:
    assert "SMOKE RUN" in f.read()

  # A second invocation loads every stage from its cache and gives the same results.
  again = run_script("dpl", [f"--workdir={workdir}", *_ARGS], capfd)
  assert again.code == 0, again.stderr[-3000:]
  with open(os.path.join(workdir, "results.json")) as f:
    r2 = json.load(f)
  assert r2["checks"] == r["checks"]
  assert r2["worlds"][0]["stats"] == w["stats"]


def test_analysis_statistics_match_direct_numpy_on_synthetic_inputs():
  # r^2 and Spearman of the analysis are the paper's formulas on each seed's readouts.
  rng = np.random.default_rng(0)
  cfg = dpl_lib.DPLConfig(num_seeds=2, control=False)
  golds = rng.normal(size=(40, 2))
  mean, std = rng.normal(size=(2, 40)), np.abs(rng.normal(size=(2, 40)))
  world = {"world_seed": 0, "diagnostics": {"golds": golds, "arms": {
    "mean_variance/hidden": {"mean": mean, "std": std, "quantile": mean}}}}  # fmt: skip
  s = dpl_analysis.diagnostics_stats(cfg, world, num_boot=4)["mean_variance/hidden"]
  true_std = 0.5 * np.abs(golds[:, 0] - golds[:, 1])
  for i in range(2):
    np.testing.assert_allclose(
      s["r2"][i], np.var(mean[i]) / (np.var(mean[i]) + np.mean(std[i] ** 2))
    )
    np.testing.assert_allclose(
      s["spearman_std"][i], stats.spearmanr(std[i], true_std)[0], rtol=1e-10
    )
  assert s["boot_r2"].shape == (4,)
