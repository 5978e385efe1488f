"""Tests of the over-optimisation study: the --quick run's outputs and the analysis checks."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from experiments import overoptimization_analysis as analysis
from experiments import overoptimization_bon as bon_stage
from experiments import overoptimization_lib as lib
from experiments import overoptimization_rl_analysis as rl_analysis
from experiments import overoptimization_units as units
from jaxrm.math import best_of_n as bon_math
from tests import script_runner

# Prefixes of the quick run's 512 comparisons, and a nested field set from the command line.
_ARGS = ("--config.data_sizes=(256,384)", "--config.ppo.clip_eps=0.25")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  return script_runner.quick_run(tmp_path_factory, "overoptimization", *_ARGS)


def test_quick_run_writes_every_output(quick_run):
  workdir, proc = quick_run
  for name in ("results.json", "summary.md", "figure1.png", "coefficients.png", "data_sizes.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  with open(os.path.join(workdir, "figure1.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert "PASS" in proc.stdout or "FAIL" in proc.stdout


def test_quick_results_follow_the_schema(quick_run):
  workdir, proc = quick_run
  with open(os.path.join(workdir, "results.json")) as f:
    r = json.load(f)
  assert r["smoke_run"] is True and "SMOKE RUN" in proc.stdout
  with open(os.path.join(workdir, "summary.md")) as f:
    assert "SMOKE RUN" in f.read()
  cfg = r["config"]
  sizes, seeds = len(r["proxies"]), cfg["num_seeds"]
  assert [w["world_seed"] for w in r["worlds"]] == cfg["world_seeds"] == [0, 1]
  for w in r["worlds"]:
    bon = w["bon"]
    nv, nb = len(bon["ns"]), len(cfg["tilted_betas"])
    assert bon["ns"][0] == 1 and bon["ns"][-1] == cfg["bon_max_n"]
    for key in ("gold", "proxy", "gold_rest", "gold_feature"):
      assert np.shape(bon[key]) == (sizes, seeds, nv), key
    np.testing.assert_allclose(np.asarray(bon["gold"])[..., 0], 0.0, atol=1e-6)
    np.testing.assert_allclose(
      np.add(bon["gold_rest"], bon["gold_feature"]), bon["gold"], atol=1e-4
    )
    assert np.shape(bon["oracle_gold"]) == (nv,)
    # The oracle (selected by gold) is the best any selector can do at every n.
    assert np.all(np.asarray(bon["oracle_gold"]) >= np.asarray(bon["gold"]).max((0, 1)) - 1e-5)
    assert np.shape(bon["boot_gold"]) == (sizes, seeds, cfg["bon_bootstrap"], nv)
    assert np.shape(bon["tilted_kl"]) == (sizes, seeds, nb)
    assert np.shape(bon["oracle_tilted_gold"]) == (nb,)
    np.testing.assert_allclose(bon["ess"][0], cfg["bon_prompts"] * cfg["bon_samples"], rtol=1e-6)
    assert "rl" in w
  assert [a["label"] for a in r["analysis"]] == ["pooled", "world0", "world1"]
  for a in r["analysis"]:
    assert len(a["fits"]["bon"]) == sizes
    assert {"alpha", "beta", "alpha_ci", "beta_ci", "r_squared", "peak_inside_data"} <= set(
      a["fits"]["bon"][0]
    )
  names = {c["name"] for c in r["checks"]}
  assert {
    "bon_proxy_monotone",
    "bon_gold_peaks_for_smaller_proxies",
    "bon_fit_r2",
    "beta_bon_falls_with_size",
    "observed_peak_rises_with_size",
    "bon_advance_prediction",
    "bon_ess",
    "rl_oracle_fraction",
    "kl_penalty_acts_like_early_stopping",
    "rl_spends_more_kl_than_bon",
    "seeds_and_worlds",
  } <= names
  for c in r["checks"]:
    assert isinstance(c["passed"], bool)
    if c["name"] != "seeds_and_worlds":
      assert set(c["per_world"]) == {"world0", "world1"}
  assert [e["num_comparisons"] for e in r["worlds"][0]["data_sweep"]] == [256, 384]
  assert "data_sweep" not in r["worlds"][1]
  assert [e["num_comparisons"] for e in r["data_fits"]] == [256, 384, 512]  # with the main run


def test_rerun_reuses_the_cached_stages(quick_run):
  workdir, _ = quick_run
  with open(os.path.join(workdir, "results.json")) as f:
    first = json.load(f)
  proc = script_runner.run_subprocess(
    "experiments/overoptimization.py", f"--workdir={workdir}", "--quick", *_ARGS
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "results.json")) as f:
    second = json.load(f)
  assert second["worlds"] == first["worlds"]
  t1, t2 = first["timing_this_invocation"], second["timing_this_invocation"]
  assert t2["world1/proxies"] < t1["world1/proxies"]


def test_worlds_in_threads_give_the_same_numbers(quick_run, tmp_path):
  """The two worlds at once, each in its own thread: the same programs on the same inputs,
  so the same worlds, analysis and checks, bit for bit. Without the data-size sweep (world
  0's extra proxies on prefixes of its data, which nothing else reads), half the run."""
  workdir, _ = quick_run
  proc = script_runner.run_subprocess(
    "experiments/overoptimization.py",
    f"--workdir={tmp_path}",
    "--quick",
    "--config.data_sizes=()",
    *[a for a in _ARGS if not a.startswith("--config.data_sizes")],
    "--config.world_threads=2",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = []
  for path in (workdir, tmp_path):
    with open(os.path.join(path, "results.json")) as f:
      results.append(json.load(f))
  assert results[1]["config"]["world_threads"] == 2
  assert "data_sweep" in results[0]["worlds"][0] and "data_sweep" not in results[1]["worlds"][0]
  sequential = [{k: v for k, v in w.items() if k != "data_sweep"} for w in results[0]["worlds"]]
  assert results[1]["worlds"] == sequential
  for key in ("analysis", "checks"):
    assert results[1][key] == results[0][key], key


def test_nested_override_from_the_command_line_reaches_the_study(quick_run):
  workdir, _ = quick_run
  for name in ("results.json", "config.json"):
    with open(os.path.join(workdir, name)) as f:
      config = json.load(f)["config"]
    assert config["ppo"]["clip_eps"] == 0.25 and config["ppo"]["num_epochs"] == 2
    assert config["data_sizes"] == [256, 384] and config["num_seeds"] == 2  # the quick variant
    assert config["world_seeds"] == [0, 1]


@pytest.mark.parametrize(
  "arg, message",
  [
    ("--config.proxy_sizes=('2x10x3',)", "--config.proxy_sizes=2x10x3: needs positive sizes"),
    ("--config.ppo.num_epochz=3", "no field 'num_epochz' in ppo"),
    ("--config.ppo.max_new_tokens=5", "--config.ppo.max_new_tokens=5: must equal"),
    ("--config.world_threads=0", "--config.world_threads=0: must be an int >= 1"),
  ],
)
def test_bad_setting_gives_a_one_line_error(tmp_path, arg, message):
  proc = script_runner.run_subprocess(
    "experiments/overoptimization.py", f"--workdir={tmp_path}", "--quick", arg
  )
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], proc.stderr


def test_every_field_is_in_a_stage_cache_key_and_ppo_settings_key_the_rl_stage():
  fields = {f.name for f in dataclasses.fields(lib.StudyConfig)}
  keyed = set(lib.RL_FIELDS) | set(lib.BON_FIELDS) | set(lib.SELECTION_FIELDS)
  keyed |= set(lib.LABEL_FIELDS) | set(lib.EXECUTION_FIELDS)
  assert fields <= keyed, fields - keyed
  a, b = lib.StudyConfig().for_world(0), lib.StudyConfig().for_world(0)
  b.ppo.num_epochs = 3
  assert a.fingerprint(*lib.RL_FIELDS) != b.fingerprint(*lib.RL_FIELDS)
  assert a.fingerprint(*lib.BON_FIELDS) == b.fingerprint(*lib.BON_FIELDS)


def test_per_world_config_and_caches_keyed_by_world():
  cfg = lib.StudyConfig()
  assert cfg.world_seeds == (0, 1, 2)
  with pytest.raises(ValueError, match="per-world config"):
    cfg.world_seed  # noqa: B018
  w1, w2 = cfg.for_world(1), cfg.for_world(2)
  assert w1.world_seed == 1 and w1.world_seeds == (1,)
  assert w1.fingerprint(*lib.WORLD_FIELDS) != w2.fingerprint(*lib.WORLD_FIELDS)


# ----------------------------------------------------------------------------- synthetic analysis
NS = np.unique(np.round(2.0 ** np.arange(0, 9.01, 0.5)).astype(int))  # 1 .. 512
KL = np.log(NS) - (NS - 1) / NS
D = np.sqrt(KL)
BOOT, T_BETAS = 40, 5


def _world(seed, betas, params, *, seeds=3, rl_scale=1.0, penalty_offset=0.0, bend=0.0):
  """One world following Gao et al.'s forms, with bootstrap replicates of small noise."""
  rng = np.random.default_rng(seed)
  s = len(betas)
  mean = np.stack([D * (1.0 - b * D) for b in betas])  # [S, n]
  if bend:  # an extra fall past n = 256 that a fit on n <= 256 cannot foresee
    mean = mean - bend * (NS > 256) * (np.log(NS) - np.log(256))
  gold = mean[:, None] + rng.normal(0, 0.003, (s, seeds, len(NS)))
  gold -= gold[..., :1]
  boot = gold[:, :, None] + rng.normal(0, 0.01, (s, seeds, BOOT, len(NS)))
  boot -= boot[..., :1]
  oracle = 2.0 * D
  tilted = {k: np.tile(np.linspace(0, 1, T_BETAS), (s, seeds, 1)) for k in ("gold", "kl")}
  bon = {
    "ns": NS,
    "kl": KL,
    "ess": 2.0 * 64 * 1024 / NS,
    "gold": gold,
    "proxy": np.broadcast_to(1.5 * D, gold.shape),
    "gold_rest": gold / 2,
    "gold_feature": gold / 2,
    "oracle_gold": oracle,
    "oracle_gold_rest": oracle / 2,
    "oracle_gold_feature": oracle / 2,
    "boot_gold": boot,
    "boot_oracle": oracle + rng.normal(0, 0.01, (BOOT, len(NS))),
    "tilted_gold_rest": tilted["gold"] / 2,
    "tilted_gold_feature": tilted["gold"] / 2,
    "tilted_proxy": tilted["gold"],
    "tilted_ess": np.full((s, seeds, T_BETAS), 100.0),
    "oracle_tilted_ess": np.full(T_BETAS, 100.0),
  }
  for k in ("gold", "kl"):
    bon[f"tilted_{k}"] = tilted[k]
    bon[f"oracle_tilted_{k}"] = tilted[k][0, 0]
  for k in ("gold_rest", "gold_feature"):
    bon[f"oracle_tilted_{k}"] = tilted["gold"][0, 0] / 2
  # RL: KL grows steadily; proxy arms follow R_RL and need more KL than best-of-n; the gold
  # arm follows best-of-n-on-gold (times rl_scale); penalised arms stop early on the curve.
  steps = np.arange(1, 31)
  kl = np.broadcast_to(0.25 * steps, (seeds, 30)).copy()
  d = np.sqrt(kl)
  arms, info = {}, {}
  for i, b in enumerate(betas):
    g = d * (0.5 - 0.2 * b * np.log(d))
    arms[f"P{i}"] = {"kl_exact": kl, "kl_k1": kl, "gold": g, "proxy": 0.8 * d}
    info[f"P{i}"] = {"reward": f"P{i}", "kl_coef": 0.0}
  g_arm = rl_scale * np.interp(kl, KL, oracle)
  arms["gold"] = {"kl_exact": kl, "kl_k1": kl, "gold": g_arm, "proxy": g_arm}
  info["gold"] = {"reward": "gold", "kl_coef": 0.0}
  half = kl[:, :15]  # a penalised run stops at half the KL, on the unpenalised curve
  g_pen = arms["P0"]["gold"][:, :15] + penalty_offset + rng.normal(0, 0.01, half.shape)
  arms["P0_kl0.1"] = {"kl_exact": half, "kl_k1": half, "gold": g_pen, "proxy": 0.8 * half}
  info["P0_kl0.1"] = {"reward": "P0", "kl_coef": 0.1}
  for a in arms.values():
    a["gold_rest"], a["gold_feature"] = a["gold"] / 2, a["gold"] / 2
  proxies = [
    {"name": f"P{i}", "num_params": p, "heldout_accuracy": [0.8] * seeds}
    for i, p in enumerate(params)
  ]
  rl = {"step": steps, "arms": arms, "arm_info": info}
  return {"world_seed": seed, "proxies": proxies, "bon": bon, "rl": rl}


def _analyse(tmp_path, worlds, seeds=3):
  results = {
    "config": {
      "kl_coef": 0.0,
      "world_seeds": [w["world_seed"] for w in worlds],
      "num_seeds": seeds,
      "bon_prompts": 64,
      "bon_samples": 1024,
      "bon_bootstrap": BOOT,
      "num_comparisons": 100,
    },
    "worlds": worlds,
    "proxies": worlds[0]["proxies"],
  }
  out = analysis.analyse(results, str(tmp_path))
  return {c["name"]: c for c in out["checks"]}, out


BETAS, PARAMS = [0.5, 0.4, 0.3, 0.2, 0.1], [1e3, 4e3, 1.5e4, 4e4, 1e5]


def test_checks_pass_on_curves_with_the_expected_shape(tmp_path):
  worlds = [_world(s, BETAS, PARAMS) for s in range(3)]
  checks, out = _analyse(tmp_path, worlds)
  failed = {k: c["detail"] for k, c in checks.items() if not c["passed"]}
  assert not failed, failed
  assert all(all(c["per_world"].values()) for c in checks.values())
  fits = out["analysis"][0]["fits"]["bon"]
  np.testing.assert_allclose([f["beta"] for f in fits], BETAS, atol=0.01)
  frac = out["analysis"][0]["stats"]["rl"]["oracle_fraction"]["fraction"]
  np.testing.assert_allclose(frac, 1.0, atol=0.02)
  for name in ("figure1.png", "coefficients.png", "decomposition.png", "summary.md"):
    assert os.path.getsize(tmp_path / name) > 0


def _section(path, label):
  """Section ``label`` of summary.md, up to the next heading."""
  return open(path).read().split(f"## {label}\n", 1)[1].split("\n## ", 1)[0]


def _table(path, label):
  """The rows of section ``label``'s proxy table in summary.md, as lists of cell strings."""
  text = _section(path, label).split("| proxy |", 1)[1]
  rows = [r for r in text.split("\n\n", 1)[0].splitlines() if r.startswith("| P")]
  return [[c.strip() for c in r.strip("|").split("|")] for r in rows]


def test_summary_tables_read_their_own_worlds_arrays(tmp_path):
  # Worlds that differ in accuracy, pi_beta gold and RL gold, so a table reading another
  # table's world (the pooled table once printed world 0's pi_beta column) is caught.
  worlds = [_world(s, BETAS, PARAMS) for s in range(3)]
  for k, w in enumerate(worlds):
    w["bon"]["tilted_gold"] = w["bon"]["tilted_gold"] * (1 + k)
    w["bon"]["tilted_ess"][:, 0, -1] = 10.0 * k  # the last temperature: ESS < 30 for k < 3
    for p in w["proxies"]:
      p["heldout_accuracy"] = [0.6 + 0.1 * k, 0.7, 0.8]
    for arm in w["rl"]["arms"].values():
      arm["gold"] = arm["gold"] * (1 + k)
  _analyse(tmp_path, worlds)
  summary = tmp_path / "summary.md"
  for label, ws in [("pooled", worlds)] + [(f"world{w['world_seed']}", [w]) for w in worlds]:
    rows = _table(summary, label)
    assert len(rows) == len(PARAMS)
    for i, row in enumerate(rows):
      acc = np.mean([np.mean(w["proxies"][i]["heldout_accuracy"]) for w in ws])
      assert row[2] == f"{acc:.3f}"
      # pi_beta: seed-mean gold per world, averaged over worlds; ESS: worst seed, worst world.
      tilt = np.mean([w["bon"]["tilted_gold"][i].mean(0) for w in ws], axis=0)
      ok = np.min([w["bon"]["tilted_ess"][i].min(0) for w in ws], axis=0) >= 30
      assert row[9] == f"{tilt[ok].max():.2f}"
      gold = np.mean([w["rl"]["arms"][f"P{i}"]["gold"] for w in ws], axis=0).mean(0)
      kl = np.mean([w["rl"]["arms"][f"P{i}"]["kl_exact"] for w in ws], axis=0).mean(0)
      j = int(np.argmax(gold))
      assert row[10] == f"{gold[j]:.2f} ({kl[j]:.1f})"
    # The RL table: every arm, its peak and final seed-mean gold with gold's two parts.
    text = _section(summary, label)
    arms = {r.split("|")[1].strip(): r for r in text.splitlines() if r.startswith("| ")}
    for name in ("P0", "gold", "P0_kl0.1"):
      cells = [c.strip() for c in arms[name].strip("|").split("|")]
      curves = {
        k: np.mean([w["rl"]["arms"][name][k] for w in ws], axis=0).mean(0)
        for k in ("gold", "kl_exact", "gold_feature")
      }
      j = int(np.argmax(curves["gold"]))
      assert cells[1:3] == [name.split("_")[0], "0.1" if "kl" in name else "0"]
      assert cells[4] == f"{curves['gold'][-1]:.2f} ({curves['kl_exact'][-1]:.1f})"
      assert cells[5] == f"{curves['gold_feature'][j]:+.2f}, {curves['gold_feature'][-1]:+.2f}"


def test_checks_fail_when_the_shape_is_wrong(tmp_path):
  # beta rising with size and no fall: the trend and peak checks fail, in every world.
  worlds = [_world(s, [0.0, 0.01, 0.02, 0.03, 0.04], PARAMS) for s in range(3)]
  checks, _ = _analyse(tmp_path, worlds)
  for name in ("beta_bon_falls_with_size", "bon_gold_peaks_for_smaller_proxies"):
    assert not checks[name]["passed"] and not any(checks[name]["per_world"].values()), name
  # A weak oracle RL arm, penalised runs off the unpenalised curve, an unforeseeable bend.
  worlds = [_world(s, BETAS, PARAMS, rl_scale=0.3, penalty_offset=0.5, bend=0.3) for s in range(3)]
  checks, out = _analyse(tmp_path, worlds)
  assert not checks["rl_oracle_fraction"]["passed"]
  frac = out["analysis"][0]["stats"]["rl"]["oracle_fraction"]["fraction"]
  np.testing.assert_allclose(frac, 0.3, atol=0.02)
  assert not checks["kl_penalty_acts_like_early_stopping"]["passed"]
  assert not checks["bon_advance_prediction"]["passed"]
  # One world where the trend reverses: the pooled verdict can pass, the world's verdict fails.
  worlds = [_world(s, BETAS, PARAMS) for s in range(2)] + [_world(2, BETAS[::-1], PARAMS)]
  checks, _ = _analyse(tmp_path, worlds)
  assert checks["beta_bon_falls_with_size"]["per_world"]["world2"] is False
  assert checks["beta_bon_falls_with_size"]["per_world"]["world0"] is True
  checks, _ = _analyse(tmp_path, [_world(0, BETAS[:2], PARAMS[:2], seeds=2)], seeds=2)
  assert not checks["seeds_and_worlds"]["passed"]


def test_rl_needing_less_kl_than_best_of_n_fails_the_efficiency_check(tmp_path):
  worlds = [_world(s, BETAS, PARAMS) for s in range(3)]
  for w in worlds:
    for a, arm in w["rl"]["arms"].items():
      if a.startswith("P") and "_kl" not in a:
        arm["gold"] = 20 * arm["gold"]
  checks, _ = _analyse(tmp_path, worlds)
  assert not checks["rl_spends_more_kl_than_bon"]["passed"]


def test_interpolation_helpers_match_numpy():
  x, y = np.array([0.0, 1.0, 2.0, 4.0]), np.array([0.0, 0.5, 0.7, 1.5])
  assert rl_analysis.first_reach(x, y, 0.6) == pytest.approx(1.5)
  assert rl_analysis.first_reach(x, y, 2.0) == np.inf
  assert rl_analysis.value_at(x, y, 3.0) == pytest.approx(np.interp(3.0, x, y))
  assert np.isnan(rl_analysis.value_at(x, y, 5.0))


def test_seed_resampling_and_bon_curves_match_references():
  rng = np.random.default_rng(1)
  boot = rng.normal(size=(2, 3, 7, 4))
  out = units.seed_resampled(boot, np.random.default_rng(5))
  idx = np.random.default_rng(5).integers(0, 3, size=(2, 7, 3))
  want = np.array([[boot[s, idx[s, b], b].mean(0) for b in range(7)] for s in range(2)])
  np.testing.assert_allclose(out, want)
  select, gold = rng.normal(size=(2, 3, 40)), rng.normal(size=(3, 40))
  got = bon_stage.bon_curves(select, gold[None], [1, 2, 8])
  for k in range(2):
    want, _ = bon_math.batched_best_of_n_expected_reward(select[k], gold, [1, 2, 8])
    np.testing.assert_allclose(got[k, 0], want, rtol=1e-5)
  reps = bon_stage.bootstrap_bon(select, gold, [1, 2, 8], key=jax.random.key(0), num_boot=50)
  assert reps.shape == (2, 50, 3) and np.all(reps[..., 0] == 0)
  # Replicates scatter around the estimate (a resample is not the sample).
  assert np.all(reps[..., -1].std(1) > 0)
  np.testing.assert_allclose(reps[..., -1].mean(1), got[:, 0, -1] - got[:, 0, :1].T[0], atol=0.3)


def test_bootstrap_replicates_are_recentred_on_the_estimate():
  w = _world(0, BETAS, PARAMS)
  w["bon"]["boot_gold"] = w["bon"]["boot_gold"] - 0.5 * NS / NS.max()  # biased low at large n
  w["bon"]["boot_oracle"] = w["bon"]["boot_oracle"] - 1.0
  u = units.world_unit(w, 0.0, np.random.default_rng(0))
  np.testing.assert_allclose(u["boot"].mean(axis=1), u["gold"], atol=1e-12)
  np.testing.assert_allclose(u["boot_oracle"].mean(axis=0), u["oracle_gold"], atol=1e-12)
  assert np.all(u["boot"].std(axis=1)[:, 1:] > 0)  # the spread is kept
