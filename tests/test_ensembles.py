"""Tests of the ensembles study: the --quick run's outputs, the RL reward, and the checks."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import ensembles_analysis as analysis
from experiments import ensembles_lib as lib
from experiments import ensembles_rl
from experiments import overoptimization_lib as oo
from jaxrm.data import synthetic
from tests import script_runner

CHECKS = {
  "a_overopt_bon",
  "a_overopt_rl",
  "b_uwo_tradeoff_bon",
  "b_uwo_tradeoff_rl",
  "c_rl_gains_more",
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  return script_runner.quick_run(tmp_path_factory, "ensembles")


def test_quick_run_writes_every_output_labelled_as_a_smoke_run(quick_run):
  workdir, proc = quick_run
  for name in ("results.json", "summary.md", "figure.png", "config.json", "metrics.jsonl"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  with open(os.path.join(workdir, "figure.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert "SMOKE RUN" in proc.stdout
  for name in CHECKS:
    assert f"  {name} (pooled; world0:" in proc.stdout, name
  with open(os.path.join(workdir, "summary.md")) as f:
    assert "SMOKE RUN" in f.read()
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert {"world0/noise0.25/members", "world1/rl"} <= {r["stage"] for r in rows}
  assert all(r["seconds"] >= 0 for r in rows)


def test_quick_results_follow_the_schema(quick_run):
  workdir, _ = quick_run
  with open(os.path.join(workdir, "results.json")) as f:
    r = json.load(f)
  cfg = r["config"]
  assert r["smoke_run"] is True
  assert {c["name"] for c in r["checks"]} == CHECKS
  for c in r["checks"]:
    assert isinstance(c["passed"], bool) and set(c["per_world"]) == {"world0", "world1"}
  objectives = ["single", "mean", "wco"] + [f"uwo{c:g}" for c in cfg["uwo_coefs"]]
  num_ns = len(oo.bon_ns(cfg["bon_max_n"]))
  windows = cfg["rl_steps"] // cfg["rl_log_every"]
  assert set(r["statistics"]) == {"world0", "world1", "pooled"}
  for unit in r["statistics"].values():
    assert set(unit) == {"noise0", "noise0.25"}
    for opts in unit.values():
      assert set(opts["bon"]) == set(opts["rl"]) == set(objectives) | {"oracle"}
      for row in list(opts["bon"].values()) + list(opts["rl"].values()):
        for k in ("peak", "final", "drop"):
          v, lo, hi = row[k]
          assert lo <= hi and np.isfinite(v)
        assert row["drop"][0] >= 0
  for opts in r["curves"].values():
    for c in opts["bon"].values():
      assert len(c["kl"]) == len(c["gold"]) == num_ns and c["gold"][0] == 0.0
    for c in opts["rl"].values():
      assert len(c["kl"]) == len(c["gold"]) == windows + 1 and c["kl"][0] == 0.0
  for members in r["members"].values():
    for m in members.values():
      assert len(m["heldout_accuracy"]) == cfg["ensemble_size"] * cfg["num_ensembles"]
  assert {"kl", "fraction"} <= set(r["oracle_fraction"]["pooled"])


def test_a_second_run_reuses_every_stage(quick_run):
  workdir, _ = quick_run
  caches = [os.path.join(workdir, f"world{w}", "rl", "ensembles.npz") for w in (0, 1)]
  caches += [os.path.join(workdir, "world0", "noise0.25", "bon.npz")]
  before = [os.path.getmtime(p) for p in caches]
  with open(os.path.join(workdir, "results.json")) as f:
    first = json.load(f)["statistics"]
  proc = script_runner.run_subprocess("experiments/ensembles.py", f"--workdir={workdir}", "--quick")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert [os.path.getmtime(p) for p in caches] == before
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["statistics"] == first


def test_every_field_is_in_a_stage_cache_key_or_read_by_the_analysis_only():
  fields = {f.name for f in dataclasses.fields(lib.EnsembleConfig)}
  keyed = set(lib.BON_FIELDS) | set(lib.RL_FIELDS) | set(lib.ANALYSIS_FIELDS)
  assert fields == keyed, fields ^ keyed
  a, b = lib.EnsembleConfig(), lib.EnsembleConfig()
  b.ppo.num_epochs = 3
  assert a.fingerprint(*lib.RL_FIELDS) != b.fingerprint(*lib.RL_FIELDS)
  assert lib.study_config(a, 0, 0.25).label_noise == 0.25


def _objective_reference(z, kind, coef):
  z = np.asarray(z, np.float64)
  if kind == "single":
    return z[0]
  if kind == "mean":
    return z.mean(0)
  if kind == "wco":
    return z.min(0)
  return z.mean(0) - coef * ((z - z.mean(0)) ** 2).mean(0)


def test_ensemble_reward_matches_a_numpy_reference():
  wc = synthetic.WorldConfig(num_calibration=256, gold_width=16)
  size = oo.ProxySize(1, 8, 2)
  model = oo.proxy_model(oo.StudyConfig(world=wc), size)
  k, b = 3, 6
  tokens = jax.random.randint(jax.random.key(1), (b, wc.seq_len), 0, wc.vocab_size)
  mask = jnp.ones(tokens.shape, bool)
  params = jax.jit(jax.vmap(lambda key: model.init(key, tokens[:1], mask[:1])))(
    jax.random.split(jax.random.key(0), k)
  )
  apply = jax.jit(model.apply)  # one member at a time, not the vmapped program under test
  raw = np.stack(
    [np.asarray(apply(jax.tree.map(lambda x, i=i: x[i], params), tokens, mask)) for i in range(k)]
  ).astype(np.float64)
  mean, std = np.array([0.1, -0.3, 0.2]), np.array([0.5, 1.5, 2.0])
  z = (raw - mean[:, None]) / std[:, None]
  reward = jax.jit(ensembles_rl.ensemble_reward(wc, size))
  assert ensembles_rl.ensemble_reward(wc, size) is ensembles_rl.ensemble_reward(wc, size)
  for kind in ensembles_rl.KINDS:
    rp = {
      "params": params,
      "mean": jnp.asarray(mean, jnp.float32),
      "std": jnp.asarray(std, jnp.float32),
      "kind": jnp.asarray(ensembles_rl.KINDS.index(kind), jnp.int32),
      "coef": jnp.asarray(0.7, jnp.float32),
    }
    np.testing.assert_allclose(
      reward(rp, tokens, mask), _objective_reference(z, kind, 0.7), rtol=1e-5, atol=1e-5
    )


def test_objective_scores_group_disjoint_ensembles():
  cfg = lib.EnsembleConfig(ensemble_size=2, num_ensembles=3, uwo_coefs=(0.5, 2.0))
  z = np.random.default_rng(0).normal(size=(6, 5))
  out = lib.objective_scores(cfg, z)
  assert set(out) == {"mean", "wco", "uwo0.5", "uwo2"}
  for e in range(3):
    g = z[2 * e : 2 * e + 2]
    np.testing.assert_allclose(out["mean"][e], g.mean(0), rtol=1e-6)
    np.testing.assert_allclose(out["wco"][e], g.min(0), rtol=1e-6)
    np.testing.assert_allclose(out["uwo2"][e], _objective_reference(g, "uwo", 2.0), rtol=1e-5)


def _unit(curves: dict[str, np.ndarray], noise=0.25, spread=0.01, num_boot=200):
  """A unit whose best-of-n and RL curves are ``curves`` (replicates: small noise)."""
  rng = np.random.default_rng(0)
  cur = {}
  for opt in ("bon", "rl"):
    cur[opt] = {
      n: {
        "x": np.linspace(0, 5, len(g)),
        "gold": g,
        "boot": g + spread * rng.normal(size=(num_boot, len(g))),
      }
      for n, g in curves.items()
    }
  return {"noises": {f"noise{noise:g}": cur}}


CFG = {"label_noises": [0.0, 0.25], "uwo_coefs": [0.25, 1.0, 4.0], "uwo_check_coef": 1.0}


def test_checks_pass_on_coste_like_curves_and_fail_on_the_opposite():
  rise = np.array([0.0, 0.3, 0.5, 0.6, 0.65])
  overopt = np.array([0.0, 0.4, 0.6, 0.3, -0.2])
  curves = {
    "single": overopt,
    "mean": overopt + 0.05,
    "wco": rise,
    "uwo0.25": overopt * 0.9 + 0.1,
    "uwo1": rise,
    "uwo4": rise * 0.8,
  }
  checks = analysis.unit_checks(CFG, _unit(curves))
  assert set(checks) == CHECKS
  assert checks["a_overopt_bon"][0] and checks["b_uwo_tradeoff_rl"][0]
  # Same curves for both optimisers: RL's gain is not larger than best-of-n's.
  assert not checks["c_rl_gains_more"][0]
  flipped = {n: (rise if n in ("single", "mean") else overopt) for n in curves}
  checks = analysis.unit_checks(CFG, _unit(flipped))
  assert not checks["a_overopt_bon"][0] and not checks["a_overopt_rl"][0]
  assert not checks["b_uwo_tradeoff_bon"][0]


def test_rl_gain_check_compares_the_two_optimisers():
  rise = np.array([0.0, 0.3, 0.5, 0.6, 0.65])
  overopt = np.array([0.0, 0.4, 0.6, 0.3, -0.2])
  base = {"single": overopt, "mean": overopt, "wco": overopt, "uwo0.25": overopt}
  unit = _unit(dict(base, uwo1=overopt, uwo4=overopt))
  unit["noises"]["noise0.25"]["rl"] = _unit(dict(base, wco=rise, uwo1=rise, uwo4=rise))["noises"][
    "noise0.25"
  ]["rl"]
  passed, detail = analysis.unit_checks(CFG, unit)["c_rl_gains_more"]
  assert passed, detail
