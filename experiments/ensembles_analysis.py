"""Analysis of the ensembles study: Coste et al.'s hypotheses as PASS/FAIL checks.

Units: one per world and the pooled unit (the mean over worlds). Uncertainty: ``B`` bootstrap
replicates (``bon_bootstrap``). Replicate ``b`` of a world resamples the ensembles (the seed
unit) with replacement and, for best-of-n, takes the nested bootstrap replicate ``b`` over
prompts and samples within prompt (``overoptimization_bon.bootstrap_bon``, paired across
objectives); the RL curves of the same resampled ensembles (RL seed ``e`` optimises ensemble
``e``) are averaged, so best-of-n and RL are paired too. RL's held-out evaluation keeps only
the mean over its prompts, so RL intervals resample seeds only. Pooled replicate ``b``
averages the worlds' replicates ``b``. Intervals are percentile 95%.

Statistics of a gold curve (re-centred: pi_init scores 0):
  * ``peak``: its maximum over the measured points, pi_init's 0 included;
  * ``final``: its value at the highest optimisation pressure (best-of-n: n = ``bon_max_n``,
    KL = log n - (n-1)/n; RL: the last evaluation);
  * ``drop = peak - final`` (>= 0): how much over-optimisation has cost by the end.

Pre-registered checks (written before any default-run result was seen; evaluated on the
noisiest rate ``max(label_noises)``, each per optimiser ``o`` in best-of-n and RL where
stated; ``lam*`` = ``uwo_check_coef``; "CI > 0": the 95% interval's lower end above 0):

* ``a_overopt_{o}`` (Coste et al.: with 25% noise, optimising a single model or the mean
  over-optimises while WCO / UWO barely do): PASS iff drop(single) CI > 0 and drop(mean)
  CI > 0, and drop(mean) - drop(wco) CI > 0 and drop(mean) - drop(uwo lam*) CI > 0.
* ``b_uwo_tradeoff_{o}`` (UWO's lambda trades peak gold for robustness): with lam_lo and
  lam_hi the smallest and largest ``uwo_coefs``: PASS iff peak(lam_lo) - peak(lam_hi) CI > 0
  and drop(lam_lo) - drop(lam_hi) CI > 0.
* ``c_rl_gains_more`` (ensembles help more for RL than for best-of-n at high KL): the gain
  of optimiser o = mean over {wco, uwo lam*} of final gold minus final gold of single;
  PASS iff gain(RL) - gain(best-of-n) CI > 0.

Reported, not checked: the RL oracle fraction (``overoptimization_rl_analysis.
oracle_fraction``; known to be ~0.4 in this world) and every statistic at every noise rate.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from experiments import ensembles_plots as plots
from experiments import overoptimization_rl_analysis as rl_analysis

OPTIMISERS = ("bon", "rl")


def _ci(x) -> list[float]:
  x = np.asarray(x, float)
  x = x[np.isfinite(x)]
  return [float(np.percentile(x, 2.5)), float(np.percentile(x, 97.5))] if x.size else [math.nan] * 2


def _arr(x) -> np.ndarray:
  return np.asarray(x, np.float64)


def world_unit(cfg: dict, world: dict, rng: np.random.Generator) -> dict:
  """One world's curves and replicates: ``{noise_tag: {opt: {obj: {'x', 'gold', 'boot'}}}}``.

  ``x`` is KL (best-of-n: analytic; RL: seed-mean held-out exact KL with pi_init's 0 first),
  ``gold [n_points]`` the ensemble-mean curve, ``boot [B, n_points]`` its replicates.
  """
  e, nb = cfg["num_ensembles"], cfg["bon_bootstrap"]
  idx = rng.integers(0, e, size=(nb, e))  # replicate b resamples the ensembles (paired)
  unit: dict[str, Any] = {"noises": {}}
  rl = world.get("rl")
  for tag, bon in world["bon"].items():
    bon = {k: _arr(v) for k, v in bon.items()}
    kl_bon = bon["kl"]
    cur: dict[str, dict] = {"bon": {}, "rl": {}}
    for name in objective_names(cfg):
      b = bon[f"boot_{name}"]  # [E, B, n]
      boot = b[idx, np.arange(nb)[:, None]].mean(axis=1)  # [B, n]
      cur["bon"][name] = {"x": kl_bon, "gold": bon[f"gold_{name}"].mean(0), "boot": boot}
      if rl is not None:
        arm = {k: _arr(v) for k, v in rl["arms"][f"{tag}/{name}"].items()}
        gold = np.concatenate([np.zeros((e, 1)), arm["gold"]], axis=1)  # [E, T + 1]
        kl = np.concatenate([[0.0], np.maximum(arm["kl_exact"], 0).mean(0)])
        cur["rl"][name] = {"x": kl, "gold": gold.mean(0), "boot": gold[idx].mean(axis=1)}
    cur["bon"]["oracle"] = {"x": kl_bon, "gold": bon["oracle_gold"], "boot": bon["boot_oracle"]}
    if rl is not None:
      arm = {k: _arr(v) for k, v in rl["arms"]["gold"].items()}
      gold = np.concatenate([np.zeros((e, 1)), arm["gold"]], axis=1)
      kl = np.concatenate([[0.0], np.maximum(arm["kl_exact"], 0).mean(0)])
      cur["rl"]["oracle"] = {"x": kl, "gold": gold.mean(0), "boot": gold[idx].mean(axis=1)}
      cur["rl_gold_arm"] = arm
    unit["noises"][tag] = cur
  return unit


def pooled_unit(units: list[dict]) -> dict:
  """The mean over worlds of every curve, KL axis and replicate (replicate b with b)."""
  out: dict[str, Any] = {"noises": {}}
  for tag, first in units[0]["noises"].items():
    cur: dict[str, dict] = {}
    for opt in OPTIMISERS:
      cur[opt] = {
        name: {
          k: np.mean([u["noises"][tag][opt][name][k] for u in units], axis=0)
          for k in ("x", "gold", "boot")
        }
        for name in first[opt]
      }
    if "rl_gold_arm" in first:
      cur["rl_gold_arm"] = {
        k: np.mean([u["noises"][tag]["rl_gold_arm"][k] for u in units], axis=0)
        for k in first["rl_gold_arm"]
      }
    out["noises"][tag] = cur
  return out


def objective_names(cfg: dict) -> list[str]:
  return ["single", "mean", "wco"] + [f"uwo{c:g}" for c in cfg["uwo_coefs"]]


def curve_stats(c: dict) -> dict[str, np.ndarray]:
  """``peak``, ``final``, ``drop``: the estimate ``[]`` and replicates ``[B]`` of each."""
  out = {}
  for key, arr in (("est", c["gold"][None]), ("boot", c["boot"])):
    peak = np.maximum(arr.max(axis=1), 0.0)
    final = arr[:, -1]
    out[key] = {"peak": peak, "final": final, "drop": peak - final}
  return out


def _stat(c: dict, what: str) -> tuple[float, np.ndarray]:
  s = curve_stats(c)
  return float(s["est"][what][0]), s["boot"][what]


def _fmt(v: float, boot) -> str:
  lo, hi = _ci(boot)
  return f"{v:.2f} [{lo:.2f}, {hi:.2f}]"


def _positive(v: float, boot) -> tuple[bool, str]:
  lo = _ci(boot)[0]
  return bool(np.isfinite(lo) and lo > 0), _fmt(v, boot)


def unit_checks(cfg: dict, unit: dict) -> dict[str, tuple[bool, str]]:
  """Every pre-registered check on one unit: ``{name: (passed, detail)}``."""
  tag = f"noise{max(cfg['label_noises']):g}"
  cur = unit["noises"][tag]
  star = f"uwo{cfg['uwo_check_coef']:g}"
  lo_l, hi_l = f"uwo{min(cfg['uwo_coefs']):g}", f"uwo{max(cfg['uwo_coefs']):g}"
  out = {}
  for opt in OPTIMISERS:
    if not cur[opt]:
      continue
    c = cur[opt]
    parts, ok = [], True
    for name in ("single", "mean"):
      p, d = _positive(*_stat(c[name], "drop"))
      ok &= p
      parts.append(f"drop({name}) {d}")
    dm = _stat(c["mean"], "drop")
    for name in ("wco", star):
      dn = _stat(c[name], "drop")
      p, d = _positive(dm[0] - dn[0], dm[1] - dn[1])
      ok &= p
      parts.append(f"drop(mean)-drop({name}) {d}")
    out[f"a_overopt_{opt}"] = (ok, "; ".join(parts) + " (each needs CI > 0)")
    pk = [_stat(c[n], "peak") for n in (lo_l, hi_l)]
    dr = [_stat(c[n], "drop") for n in (lo_l, hi_l)]
    p1, d1 = _positive(pk[0][0] - pk[1][0], pk[0][1] - pk[1][1])
    p2, d2 = _positive(dr[0][0] - dr[1][0], dr[0][1] - dr[1][1])
    out[f"b_uwo_tradeoff_{opt}"] = (
      p1 and p2,
      f"peak({lo_l})-peak({hi_l}) {d1}; drop({lo_l})-drop({hi_l}) {d2} (each needs CI > 0)",
    )
  if cur["rl"]:
    gains = {}
    for opt in OPTIMISERS:
      c = cur[opt]
      single = _stat(c["single"], "final")
      cons = [_stat(c[n], "final") for n in ("wco", star)]
      gains[opt] = (
        np.mean([x[0] for x in cons]) - single[0],
        np.mean([x[1] for x in cons], axis=0) - single[1],
      )
    p, d = _positive(gains["rl"][0] - gains["bon"][0], gains["rl"][1] - gains["bon"][1])
    out["c_rl_gains_more"] = (
      p,
      f"gain RL {_fmt(*gains['rl'])}, best-of-n {_fmt(*gains['bon'])}; "
      f"RL - best-of-n {d} (needs CI > 0; gain = mean(wco, {star}) - single final gold)",
    )
  return out


def oracle_fraction(unit: dict, tag: str) -> dict | None:
  cur = unit["noises"][tag]
  if "rl_gold_arm" not in cur:
    return None
  u = {
    "rl": {"arms": {"gold": cur["rl_gold_arm"]}},
    "kl": cur["bon"]["oracle"]["x"],
    "oracle_gold": cur["bon"]["oracle"]["gold"],
  }
  _, detail, stats = rl_analysis.oracle_fraction(u)
  return dict(stats, detail=detail)


def stats_table(unit: dict) -> dict:
  """Every curve's statistics with intervals: ``{tag: {opt: {obj: {stat: [v, lo, hi]}}}}``."""
  out = {}
  for tag, cur in unit["noises"].items():
    out[tag] = {}
    for opt in OPTIMISERS:
      rows = {}
      for name, c in cur[opt].items():
        s = curve_stats(c)
        rows[name] = {k: [float(s["est"][k][0])] + _ci(s["boot"][k]) for k in s["est"]}
        rows[name]["final_kl"] = float(c["x"][-1])
      out[tag][opt] = rows
  return out


def analyse(results: dict[str, Any], workdir: str) -> dict[str, Any]:
  """Checks, statistics, ``results.json``, ``figure.png``, ``summary.md``; returns the results."""
  cfg = results["config"]
  rng = np.random.default_rng(0)
  units = [world_unit(cfg, w, rng) for w in results["worlds"]]
  names = [f"world{w['world_seed']}" for w in results["worlds"]]
  pooled = pooled_unit(units)
  all_units = dict(zip(names, units), pooled=pooled)
  per_unit = {n: unit_checks(cfg, u) for n, u in all_units.items()}
  checks = []
  for name, (passed, detail) in per_unit["pooled"].items():
    checks.append(
      {
        "name": name,
        "passed": passed,
        "detail": detail,
        "per_world": {n: per_unit[n][name][0] for n in names},
        "per_world_detail": {n: per_unit[n][name][1] for n in names},
      }
    )
  noisy = f"noise{max(cfg['label_noises']):g}"
  out = {
    "study": "ensembles (Coste et al. 2023)",
    "smoke_run": bool(cfg.get("smoke")),
    "config": cfg,
    "environment": results["environment"],
    "checks": checks,
    "statistics": {n: stats_table(u) for n, u in all_units.items()},
    "oracle_fraction": {n: oracle_fraction(u, noisy) for n, u in all_units.items()},
    "members": {f"world{w['world_seed']}": w["members"] for w in results["worlds"]},
    "curves": plots.curves_json(pooled),
    "timing_this_invocation": results.get("timing_this_invocation", {}),
  }
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(out, f, indent=1, default=float)
  plots.plot_figure(pooled, cfg, os.path.join(workdir, "figure.png"))
  plots.write_summary(out, os.path.join(workdir, "summary.md"))
  return out
