"""Analysis of the over-optimisation study: fits, PASS/FAIL checks per world and pooled.

Everything is computed from the study's measurements; every check is evaluated in every world
and on the pooled unit (the mean over worlds: ``experiments.overoptimization_units``), and its
uncertainty comes from the same bootstrap as the figure's bands (proxy seeds, prompts and
samples within prompt). A check's verdict is the pooled one; the per-world verdicts are shown
beside it. No check uses a fitted curve outside the measured KL range:

* ``bon_proxy_monotone``: best-of-n's proxy score rises with n for every proxy;
* ``bon_gold_peaks_for_smaller_proxies``: gold has an interior observed peak above pi_init and
  falls from it to the largest n, the fall's bootstrap 95% interval above 0 (smaller half);
* ``bon_fit_r2``: ``R_bon`` fits reach R^2 >= 0.9;
* ``beta_bon_falls_with_size`` / ``observed_peak_rises_with_size``: Spearman with log params
  <= -0.8 / >= 0.8 and its bootstrap 95% interval excluding 0;
* ``bon_advance_prediction``: pre-registered (threshold below, fixed before any result was
  seen): ``R_bon`` fitted on n <= 256 predicts the larger n within ``ADVANCE_TOLERANCE`` of the
  observed peak; likewise ``R_RL`` fitted on the first third of the RL evaluations;
* ``bon_ess``: the estimator's effective sample size at the largest n >= ``ESS_MIN``;
* RL checks (``overoptimization_rl_analysis``): oracle fraction, KL-penalty sweep, KL
  efficiency.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from experiments import overoptimization_plots as plots
from experiments import overoptimization_rl_analysis as rl_analysis
from experiments import overoptimization_units as units_lib
from jaxrm.math import scaling
from jaxrm.math.metrics import spearman

# Pre-registered thresholds (stated before the second edition's runs were looked at).
ADVANCE_TOLERANCE = 0.25  # max |predicted - observed| gold over held-out points / observed peak
ADVANCE_MAX_N = 256  # R_bon is fitted on n <= this and predicts the larger n
ESS_MIN = 30.0  # pooled effective sample size needed to report a point
SPEARMAN_MIN = 0.8


def _fit_dict(fit: scaling.Fit, d_max: float) -> dict[str, Any]:
  peak_d, peak_r = scaling.gold_peak(fit)
  inside = bool(np.isfinite(peak_d) and peak_d <= d_max)
  return {
    "alpha": fit.alpha,
    "beta": fit.beta,
    "alpha_ci": list(fit.alpha_ci),
    "beta_ci": list(fit.beta_ci),
    "r_squared": fit.r_squared,
    "num_points": fit.num_points,
    "peak_sqrt_kl": peak_d,
    "peak_gold": peak_r,
    "peak_inside_data": inside,
  }


def bon_betas(d: np.ndarray, curves: np.ndarray) -> np.ndarray:
  """Least-squares ``beta`` of ``R_bon = d (alpha - beta d)`` for every curve ``[..., n]``."""
  x = np.stack([d, -(d**2)], axis=1)  # [n, 2]
  coef = np.linalg.lstsq(x, curves.reshape(-1, d.size).T, rcond=None)[0]  # [2, m]
  return coef[1].reshape(curves.shape[:-1])


def _spearman(x, y) -> float:
  x, y = np.asarray(x, float), np.asarray(y, float)
  if len(x) < 3 or np.ptp(y) == 0:
    return math.nan
  return float(spearman(x, y))


def _ci(samples) -> list[float]:
  s = np.asarray(samples, float)
  s = s[np.isfinite(s)]
  return [float(np.percentile(s, 2.5)), float(np.percentile(s, 97.5))] if s.size else [math.nan] * 2


def fit_unit(unit: dict) -> dict[str, Any]:
  """R_bon fits of every proxy's seed-mean curve, and R_RL fits of every proxy arm."""
  d = np.sqrt(unit["kl"])
  fits = {"bon": [_fit_dict(scaling.fit_bon(d, g), d.max()) for g in unit["gold"]], "rl": []}
  rl = unit["rl"]
  if rl is not None:
    for name in unit["names"]:
      arm = rl["arms"].get(name)
      if arm is None:
        continue
      dr = np.sqrt(np.maximum(arm["kl_exact"], 0.0)).mean(0)
      fits["rl"].append(_fit_dict(scaling.fit_rl(dr, arm["gold"].mean(0)), dr.max()))
  return fits


def observed_peaks(unit: dict) -> dict[str, Any]:
  """Observed best-of-n gold peaks: value and sqrt(KL) of the argmax, with bootstrap 95% CIs."""
  d = np.sqrt(unit["kl"])
  out = []
  for i in range(len(unit["names"])):
    mean, boot = unit["gold"][i], unit["boot"][i]
    j = int(np.argmax(mean))
    out.append(
      {
        "peak_gold": float(mean[j]),
        "peak_gold_ci": _ci(boot.max(axis=1)),
        "peak_sqrt_kl": float(d[j]),
        "peak_sqrt_kl_ci": _ci(d[np.argmax(boot, axis=1)]),
        "peak_n": int(unit["ns"][j]),
        "fall_to_max_n": float(mean[j] - mean[-1]),
        "fall_ci": _ci(boot[:, j] - boot[:, -1]),
      }
    )
  return out


def advance_prediction_bon(unit: dict) -> list[dict[str, Any]]:
  """R_bon fitted on n <= ADVANCE_MAX_N predicts larger n; error relative to the observed peak."""
  d, ns = np.sqrt(unit["kl"]), unit["ns"]
  train = ns <= ADVANCE_MAX_N
  out = []
  for g in unit["gold"]:
    if train.all() or train.sum() < 3:
      out.append({"error": math.nan, "points": 0})
      continue
    fit = scaling.fit_bon(d[train], g[train])
    err = np.abs(fit.predict(d[~train]) - g[~train]).max() / max(abs(g.max()), 1e-12)
    out.append({"error": float(err), "points": int((~train).sum()), "beta": fit.beta})
  return out


def unit_checks(unit: dict, fits: dict) -> tuple[dict[str, tuple[bool, str]], dict[str, Any]]:
  """Every check on one unit: ``{name: (passed, detail)}`` and the statistics behind them."""
  names, params = unit["names"], unit["params"]
  d = np.sqrt(unit["kl"])
  out, stats = {}, {}
  mono = [bool(np.all(np.diff(p) >= -1e-6)) for p in unit["proxy"]]
  out["bon_proxy_monotone"] = (all(mono), ", ".join(f"{s}: {m}" for s, m in zip(names, mono)))

  peaks = observed_peaks(unit)
  stats["observed_peaks"] = peaks
  smaller = list(range(len(names) // 2)) or [0]
  falls, details = [], []
  for i in smaller:
    p = peaks[i]
    interior = 0 < p["peak_n"] < unit["ns"][-1]
    falls.append(bool(interior and p["peak_gold"] > 0 and p["fall_ci"][0] > 0))
    details.append(
      f"{names[i]}: peak {p['peak_gold']:.2f} at n={p['peak_n']}, fall {p['fall_to_max_n']:.2f} "
      f"[{p['fall_ci'][0]:.2f}, {p['fall_ci'][1]:.2f}]"
    )
  out["bon_gold_peaks_for_smaller_proxies"] = (all(falls), "; ".join(details))

  r2 = [f["r_squared"] for f in fits["bon"]]
  out["bon_fit_r2"] = (
    all(r >= 0.9 for r in r2),
    ", ".join(f"{s}: {r:.3f}" for s, r in zip(names, r2)),
  )

  logp = np.log(params)
  betas = np.array([f["beta"] for f in fits["bon"]])
  boot_betas = bon_betas(d, unit["boot"])  # [S, B]
  rho_beta = _spearman(logp, betas)
  rho_beta_boot = [_spearman(logp, boot_betas[:, b]) for b in range(boot_betas.shape[1])]
  ci = _ci(rho_beta_boot)
  stats["spearman_beta_bon_log_params"] = {"value": rho_beta, "ci": ci}
  out["beta_bon_falls_with_size"] = (
    rho_beta <= -SPEARMAN_MIN and ci[1] < 0,
    f"Spearman {rho_beta:.2f} [{ci[0]:.2f}, {ci[1]:.2f}] (need <= -{SPEARMAN_MIN}, CI < 0)",
  )
  obs = [p["peak_gold"] for p in peaks]
  rho_peak = _spearman(logp, obs)
  boot_peak = unit["boot"].max(axis=2)  # [S, B]
  ci = _ci([_spearman(logp, boot_peak[:, b]) for b in range(boot_peak.shape[1])])
  stats["spearman_observed_peak_log_params"] = {"value": rho_peak, "ci": ci}
  out["observed_peak_rises_with_size"] = (
    rho_peak >= SPEARMAN_MIN and ci[0] > 0,
    f"Spearman {rho_peak:.2f} [{ci[0]:.2f}, {ci[1]:.2f}] (need >= {SPEARMAN_MIN}, CI > 0)",
  )

  adv = advance_prediction_bon(unit)
  stats["advance_prediction_bon"] = adv
  errs = [a["error"] for a in adv]
  out["bon_advance_prediction"] = (
    all(np.isfinite(e) and e <= ADVANCE_TOLERANCE for e in errs),
    f"R_bon fitted on n <= {ADVANCE_MAX_N}, max error on larger n / observed peak "
    f"(need <= {ADVANCE_TOLERANCE}): " + ", ".join(f"{s}: {e:.2f}" for s, e in zip(names, errs)),
  )
  ess = float(unit["ess"][-1])
  out["bon_ess"] = (
    ess >= ESS_MIN,
    f"effective sample size at n={int(unit['ns'][-1])}: {ess:.1f} (need >= {ESS_MIN:g})",
  )
  if unit["rl"] is not None:
    rl_out, rl_stats = rl_analysis.rl_checks(unit, tolerance=ADVANCE_TOLERANCE)
    out.update(rl_out)
    stats["rl"] = rl_stats
  return out, stats


def analyse(results: dict[str, Any], workdir: str) -> dict[str, Any]:
  """Adds fits, per-world and pooled checks to ``results``; writes results.json, figures, summary."""
  rng = np.random.default_rng(0)
  kl_coef = results["config"].get("kl_coef", 0.0)
  units = [units_lib.world_unit(w, kl_coef, rng) for w in results["worlds"]]
  pooled = units_lib.pooled_unit(units)
  analysis = []
  for label, unit in [("pooled", pooled)] + [
    (f"world{w['world_seed']}", u) for w, u in zip(results["worlds"], units)
  ]:
    fits = fit_unit(unit)
    checks, stats = unit_checks(unit, fits)
    analysis.append({"label": label, "fits": fits, "checks": checks, "stats": stats})
  results["analysis"] = [
    {"label": a["label"], "fits": a["fits"], "stats": a["stats"], "checks": a["checks"]}
    for a in analysis
  ]
  checks = []
  for name, (passed, detail) in analysis[0]["checks"].items():
    per_world = {a["label"]: a["checks"][name][0] for a in analysis[1:] if name in a["checks"]}
    checks.append({"name": name, "passed": bool(passed), "detail": detail, "per_world": per_world})
  num_seeds = pooled["num_seeds"]
  checks.append(
    {
      "name": "seeds_and_worlds",
      "passed": num_seeds >= 3 and len(units) >= 3,
      "detail": f"{num_seeds} proxy seeds per size, {len(units)} worlds",
      "per_world": {},
    }
  )
  results["checks"] = checks
  results["smoke_run"] = bool(results["config"].get("smoke", False))
  plots.plot_figure1(pooled, units, results, os.path.join(workdir, "figure1.png"))
  plots.plot_coefficients(results, os.path.join(workdir, "coefficients.png"))
  plots.plot_decomposition(pooled, os.path.join(workdir, "decomposition.png"))
  if results["worlds"][0].get("data_sweep"):
    results["data_fits"] = fit_data_sweep(results)
    plots.plot_data_sweep(results, os.path.join(workdir, "data_sizes.png"))
  plots.write_summary(results, pooled, units, os.path.join(workdir, "summary.md"))
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1, default=_json_default)
  return results


def fit_data_sweep(results: dict[str, Any]) -> list[dict[str, Any]]:
  """R_bon fits for every (comparison-data size, proxy size) of the first world."""
  world = results["worlds"][0]
  d = np.sqrt(np.asarray(world["bon"]["kl"]))
  entries = {e["num_comparisons"]: e for e in world.get("data_sweep", [])}
  entries.setdefault(
    results["config"]["num_comparisons"],
    {"proxies": world["proxies"], "bon_gold": world["bon"]["gold"]},
  )
  out = []
  for n in sorted(entries):
    entry = entries[n]
    fits = [
      _fit_dict(scaling.fit_bon(d, g.mean(0)), d.max()) for g in np.asarray(entry["bon_gold"])
    ]
    acc = [float(np.mean(p["heldout_accuracy"])) for p in entry["proxies"]]
    out.append({"num_comparisons": n, "fits": fits, "heldout_accuracy": acc})
  return out


def _json_default(x):
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, (np.floating, np.integer, np.bool_)):
    return x.item()
  raise TypeError(f"not JSON-serialisable: {type(x)}")
