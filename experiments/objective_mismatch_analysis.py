"""Analysis of the objective-mismatch study: correlations, checks, figures and summary.

Everything is computed from the study's measurements; the thresholds of the checks were fixed
in this file before any default run was seen. The checks are the papers' hypotheses (Lambert &
Calandra 2023; Wen et al. 2024; Kim et al. 2024; Frick et al. 2024), reported whichever way
they come out:

* ``accuracy_gold_correlation_positive``: Spearman(held-out accuracy, primary outcome) over
  all proxies has a bootstrap 95% interval above 0;
* ``weaker_within_size_than_across``: the mean of the within-(world, size) Spearman
  correlations is below the correlation across all proxies;
* ``near_equal_accuracy_proxies_differ``: of the pairs of proxies (same world) within
  ``near_equal_accuracy`` held-out accuracy, more than 10% (twice the ~5% a 2 s.e. rule gives
  by chance) differ in best-of-n gold by more than 2 paired standard errors (over prompts);
* ``best_of_k_predicts_better_than_pairwise`` and ``one_vs_many_predicts_better_than_pairwise``:
  the paired bootstrap 95% interval of Spearman(evaluation, primary) - Spearman(accuracy,
  primary) lies above 0;
* ``within_run_correlation_collapses_after_peak``: along the runs whose gold peaks inside the
  run, the mean proxy-gold Spearman correlation after the peak is below that before it (each
  optimiser with such runs);
* ``accuracy_predicts_rl_weaker_than_bon`` (with RL): Spearman(accuracy, RL gold peak) over the
  RL subset is below Spearman(accuracy, primary) over the same proxies.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from jaxrm.io import rundir
from jaxrm.math import rm_evals

# (key, label, sign): sign orients each evaluation so that higher means "better RM".
EVALUATIONS = (
  ("acc", "pairwise accuracy (pi_init pairs)", 1),
  ("acc_small_gap", "accuracy, small gold gap", 1),
  ("acc_large_gap", "accuracy, large gold gap", 1),
  ("log_loss", "-log-loss", -1),
  ("ece", "-ECE", -1),
  ("bok_acc", "best-of-K accuracy", 1),
  ("bok_regret", "-best-of-K gold regret", -1),
  ("ovm_acc", "one-vs-many accuracy", 1),
  ("spearman_all", "Spearman with gold (all)", 1),
  ("spearman_top", "Spearman with gold (top quantile)", 1),
  ("kendall_top", "Kendall with gold (top quantile)", 1),
  ("offdist_acc", "accuracy, optimised-policy pairs", 1),
)
NEAR_EQUAL_SHARE = 0.10


def outcomes(results: dict[str, Any], p: dict[str, Any]) -> dict[str, float]:
  """The downstream outcomes of one proxy (NaN where not measured)."""
  cfg = results["config"]
  ns = results["bon_ns"]
  oracle = results["oracle"][str(p["world"])]
  out = {}
  for n in cfg["bon_outcome_ns"]:
    i = ns.index(n)
    out[f"bon_gold_n{n}"] = p["bon_gold"][i]
    out[f"bon_regret_n{n}"] = oracle["bon"][i] - p["bon_gold"][i]
  out["bon_gold_peak"] = max(p["bon_gold"])
  rl = p.get("rl")
  gold_rl = oracle.get("rl")
  for b in cfg["rl_kl_budgets"]:
    v = _at_kl(rl, b) if rl else math.nan
    out[f"rl_gold_kl{b:g}"] = v
    out[f"rl_regret_kl{b:g}"] = (_at_kl(gold_rl, b) - v) if (rl and gold_rl) else math.nan
  out["rl_gold_peak"] = max([0.0] + rl["gold"]) if rl else math.nan
  return out


def _at_kl(curves: dict[str, list[float]] | None, budget: float) -> float:
  """Gold of a run at KL ``budget``: linear interpolation along the run (0 at KL 0); NaN
  if the run never reaches the budget."""
  if not curves:
    return math.nan
  kl = np.r_[0.0, np.asarray(curves["kl"])]
  gold = np.r_[0.0, np.asarray(curves["gold"])]
  hit = np.nonzero(kl >= budget)[0]
  if not hit.size:
    return math.nan
  j = hit[0]
  if j == 0 or kl[j] == kl[j - 1]:
    return float(gold[j])
  w = (budget - kl[j - 1]) / (kl[j] - kl[j - 1])
  return float(gold[j - 1] + w * (gold[j] - gold[j - 1]))


def _matrix(proxies, keys_signs):
  def value(p, k, s):  # a NaN evaluation is stored as null in JSON
    return math.nan if p[k] is None else s * p[k]

  return np.array([[value(p, k, s) for k, _, s in keys_signs] for p in proxies], float).T


def _groups(proxies) -> dict[str, list[int]]:
  groups = {"all": list(range(len(proxies)))}
  for i, p in enumerate(proxies):
    groups.setdefault(f"world {p['world']}", []).append(i)
    groups.setdefault(f"world {p['world']} / size {p['size']}", []).append(i)
    data = f"data n={p['num_comparisons']} noise={p['label_noise']:g}"
    groups.setdefault(f"world {p['world']} / {data}", []).append(i)
  return groups


def correlations(results, outs, *, resamples: int) -> dict[str, Any]:
  """Spearman and Kendall (bootstrap 95% CI, resampling proxies) of every evaluation with
  every outcome, in every group with >= 4 proxies where the outcome is measured."""
  proxies = results["proxies"]
  x_all = _matrix(proxies, EVALUATIONS)  # [E, P]
  table = {}
  for oname in outs[0]:
    y_all = np.array([o[oname] for o in outs])
    for gname, idx in _groups(proxies).items():
      idx = [i for i in idx if np.isfinite(y_all[i]) and np.all(np.isfinite(x_all[:, i]))]
      if len(idx) < 4 or np.ptp(y_all[idx]) == 0:
        continue
      entry = {"n": len(idx)}
      for method in ("spearman", "kendall"):
        ci = rm_evals.bootstrap_correlation(
          x_all[:, idx], y_all[idx], method=method, num_resamples=resamples, seed=len(idx)
        )
        entry[method] = {
          k: {"estimate": float(e), "low": float(lo), "high": float(hi)}
          for (k, _, _), e, lo, hi in zip(EVALUATIONS, ci.estimate, ci.low, ci.high)
        }
      table.setdefault(oname, {})[gname] = entry
  return table


def _within_mean(table, outcome, key, kind="size") -> float:
  vals = [
    g["spearman"][key]["estimate"]
    for name, g in table.get(outcome, {}).items()
    if f"/ {kind}" in name or (kind == "data" and "/ data" in name)
  ]
  vals = [v for v in vals if np.isfinite(v)]
  return float(np.mean(vals)) if vals else math.nan


def near_equal(results, outs, *, tolerance: float) -> dict[str, Any]:
  """Pairs of proxies (same world) within ``tolerance`` accuracy: how different is their gold?"""
  cfg, proxies = results["config"], results["proxies"]
  n_out = cfg["bon_outcome_ns"]
  primary = cfg["primary_outcome"]
  col = n_out.index(int(primary.split("_n")[1])) if "_n" in primary else len(n_out) - 1
  pairs, sig, diffs = 0, 0, []
  for i in range(len(proxies)):
    for j in range(i + 1, len(proxies)):
      a, b = proxies[i], proxies[j]
      if a["world"] != b["world"] or abs(a["acc"] - b["acc"]) > tolerance:
        continue
      d = np.asarray(a["bon_gold_prompts"])[:, col] - np.asarray(b["bon_gold_prompts"])[:, col]
      se = d.std(ddof=1) / math.sqrt(len(d))
      pairs += 1
      sig += bool(abs(d.mean()) > 2 * se)
      diffs.append(abs(float(d.mean())))
  return {
    "outcome": f"bon_gold_n{n_out[col]}",
    "tolerance": tolerance,
    "num_pairs": pairs,
    "num_differ_2se": sig,
    "share_differ_2se": sig / pairs if pairs else math.nan,
    "median_abs_gold_diff": float(np.median(diffs)) if diffs else math.nan,
    "max_abs_gold_diff": float(np.max(diffs)) if diffs else math.nan,
  }


def _before_after(proxy_curve, gold_curve) -> tuple[float, float, int]:
  """Spearman(proxy, gold) along a run up to and from the gold peak (NaN if < 3 points)."""
  p, g = np.asarray(proxy_curve, float), np.asarray(gold_curve, float)
  k = int(np.argmax(g))
  before = rm_evals.batch_spearman(p[: k + 1], g[: k + 1])[0] if k + 1 >= 3 else math.nan
  after = rm_evals.batch_spearman(p[k:], g[k:])[0] if len(g) - k >= 3 else math.nan
  return float(before), float(after), k


def within_run(results) -> dict[str, Any]:
  """Within-run proxy-gold correlation before and after the gold peak, per optimiser."""
  out = {}
  for kind in ("bon", "rl"):
    runs = []
    for p in results["proxies"]:
      if kind == "bon":
        before, after, k = _before_after(p["bon_proxy"], p["bon_gold"])
        x = results["bon_kl"][k]
      elif p.get("rl"):
        c = p["rl"]
        before, after, k = _before_after([0.0] + c["proxy"], [0.0] + c["gold"])
        x = ([0.0] + c["kl"])[k]
      else:
        continue
      runs.append({"before": before, "after": after, "peak_kl": float(x)})
    interior = [r for r in runs if np.isfinite(r["before"]) and np.isfinite(r["after"])]
    out[kind] = {
      "num_runs": len(runs),
      "num_interior_peak": len(interior),
      "mean_before": float(np.mean([r["before"] for r in interior])) if interior else math.nan,
      "mean_after": float(np.mean([r["after"] for r in interior])) if interior else math.nan,
      "runs": runs,
    }
  return out


def ranking(table, results) -> list[dict[str, Any]]:
  """Evaluations ordered by Spearman with the primary outcome over all proxies."""
  primary = results["config"]["primary_outcome"]
  rows = []
  gold_outcomes = [o for o in table if "_gold_" in o]
  for key, label, _ in EVALUATIONS:
    cell = table[primary]["all"]["spearman"][key]
    mean_all = np.nanmean(
      [table[o]["all"]["spearman"][key]["estimate"] for o in gold_outcomes if "all" in table[o]]
    )
    rows.append(
      {
        "evaluation": key,
        "label": label,
        "spearman_primary": cell["estimate"],
        "ci": [cell["low"], cell["high"]],
        "kendall_primary": table[primary]["all"]["kendall"][key]["estimate"],
        "mean_within_size": _within_mean(table, primary, key, "size"),
        "mean_within_data": _within_mean(table, primary, key, "data"),
        "mean_over_gold_outcomes": float(mean_all),
      }
    )
  return sorted(rows, key=lambda r: -r["spearman_primary"])


def run_checks(results, outs, table, near, runs) -> list[dict[str, Any]]:
  checks = []

  def check(name, passed, detail):
    checks.append({"name": name, "passed": bool(passed), "detail": detail})

  cfg = results["config"]
  primary = cfg["primary_outcome"]
  acc = table[primary]["all"]["spearman"]["acc"]
  check(
    "accuracy_gold_correlation_positive",
    acc["low"] > 0,
    f"Spearman(accuracy, {primary}) = {acc['estimate']:.2f} [{acc['low']:.2f}, {acc['high']:.2f}] "
    f"over {table[primary]['all']['n']} proxies (need lower end > 0)",
  )
  within = _within_mean(table, primary, "acc", "size")
  check(
    "weaker_within_size_than_across",
    within < acc["estimate"],
    f"mean within-(world, size) Spearman {within:.3f} vs across all {acc['estimate']:.3f}",
  )
  check(
    "near_equal_accuracy_proxies_differ",
    near["num_pairs"] > 0 and near["share_differ_2se"] > NEAR_EQUAL_SHARE,
    f"{near['num_differ_2se']}/{near['num_pairs']} pairs within {near['tolerance']:.3f} accuracy "
    f"differ in {near['outcome']} by > 2 paired s.e. (need > {NEAR_EQUAL_SHARE:.0%}); median "
    f"|diff| {near['median_abs_gold_diff']:.3f}, max {near['max_abs_gold_diff']:.3f}",
  )
  proxies = results["proxies"]
  y = np.array([o[primary] for o in outs])
  base = np.array([p["acc"] for p in proxies])
  for key, name in (("bok_acc", "best_of_k"), ("ovm_acc", "one_vs_many")):
    d = rm_evals.bootstrap_correlation_difference(
      np.array([p[key] for p in proxies]),
      base,
      y,
      num_resamples=cfg["bootstrap_resamples"],
      seed=1,
    )
    check(
      f"{name}_predicts_better_than_pairwise",
      d.low[0] > 0,
      f"Spearman({key}, {primary}) - Spearman(acc, {primary}) = {d.estimate[0]:+.3f} "
      f"[{d.low[0]:+.3f}, {d.high[0]:+.3f}] (need lower end > 0)",
    )
  parts, ok = [], True
  for kind, r in runs.items():
    if not r["num_runs"]:
      continue
    if r["num_interior_peak"] == 0:
      ok = False
      parts.append(f"{kind}: no run peaks inside (0/{r['num_runs']})")
      continue
    ok &= r["mean_after"] < r["mean_before"]
    parts.append(
      f"{kind}: before {r['mean_before']:+.2f}, after {r['mean_after']:+.2f} "
      f"({r['num_interior_peak']}/{r['num_runs']} runs peak inside)"
    )
  check("within_run_correlation_collapses_after_peak", ok, "; ".join(parts))
  rl_idx = [i for i, o in enumerate(outs) if np.isfinite(o["rl_gold_peak"])]
  if len(rl_idx) >= 4:
    a = base[rl_idx]
    s_rl = rm_evals.batch_spearman(a, [outs[i]["rl_gold_peak"] for i in rl_idx])[0]
    s_bon = rm_evals.batch_spearman(a, y[rl_idx])[0]
    check(
      "accuracy_predicts_rl_weaker_than_bon",
      s_rl < s_bon,
      f"over the {len(rl_idx)} RL proxies: Spearman(acc, rl_gold_peak) = {s_rl:.2f} vs "
      f"Spearman(acc, {primary}) = {s_bon:.2f}",
    )
  return checks


# ----------------------------------------------------------------------------- figures
def _plt():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


FACTORS = (
  ("size", "size"),
  ("num_comparisons", "comparisons"),
  ("label_noise", "label noise"),
  ("loss", "loss"),
  ("train_steps", "train steps"),
)


def plot_scatter(results, outs, path):
  """Accuracy vs downstream gold: one column per optimiser outcome, one row per factor."""
  plt = _plt()
  cfg = results["config"]
  cols = [cfg["primary_outcome"], "bon_gold_peak"]
  if any(np.isfinite(o["rl_gold_peak"]) for o in outs):
    cols += [f"rl_gold_kl{cfg['rl_kl_budgets'][-1]:g}", "rl_gold_peak"]
  proxies = results["proxies"]
  acc = np.array([p["acc"] for p in proxies])
  fig, axes = plt.subplots(
    len(FACTORS), len(cols), figsize=(3.6 * len(cols), 2.9 * len(FACTORS)), squeeze=False
  )
  markers = {w: m for w, m in zip(sorted({p["world"] for p in proxies}), "osD^v")}
  for r, (fk, flabel) in enumerate(FACTORS):
    levels = sorted({p[fk] for p in proxies}, key=str)
    colours = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(levels)))
    for c, oname in enumerate(cols):
      ax = axes[r][c]
      y = np.array([o[oname] for o in outs])
      for lv, colour in zip(levels, colours):
        for w, mk in markers.items():
          sel = [
            i
            for i, p in enumerate(proxies)
            if p[fk] == lv and p["world"] == w and np.isfinite(y[i])
          ]
          ax.scatter(
            acc[sel],
            y[sel],
            s=12,
            color=colour,
            marker=mk,
            alpha=0.8,
            label=f"{lv}" if w == min(markers) else None,
          )
      if r == 0:
        ax.set_title(oname, fontsize=9)
      if c == 0:
        ax.set_ylabel(f"gold (by {flabel})", fontsize=8)
        ax.legend(fontsize=6, title=flabel, title_fontsize=6)
      if r == len(FACTORS) - 1:
        ax.set_xlabel("held-out pairwise accuracy")
  title = "Accuracy vs downstream gold (marker = world)"
  fig.suptitle(("SMOKE RUN (not evidence): " if results["smoke_run"] else "") + title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_correlations(results, table, path):
  """Spearman (95% bootstrap CI) of every evaluation with each gold outcome, all proxies."""
  plt = _plt()
  gold_outcomes = [o for o in table if "_gold_" in o and "all" in table[o]]
  fig, ax = plt.subplots(figsize=(8, 0.45 * len(EVALUATIONS) * max(1, len(gold_outcomes)) / 2 + 2))
  h = 0.8 / max(len(gold_outcomes), 1)
  for j, oname in enumerate(gold_outcomes):
    cells = [table[oname]["all"]["spearman"][k] for k, _, _ in EVALUATIONS]
    est = np.array([c["estimate"] for c in cells])
    lo, hi = np.array([c["low"] for c in cells]), np.array([c["high"] for c in cells])
    ypos = np.arange(len(EVALUATIONS)) + j * h
    ax.errorbar(
      est,
      ypos,
      xerr=[est - lo, hi - est],
      fmt="o",
      ms=3,
      capsize=2,
      label=f"{oname} (n={table[oname]['all']['n']})",
    )
  ax.set_yticks(
    np.arange(len(EVALUATIONS)) + 0.4 - h / 2, [lbl for _, lbl, _ in EVALUATIONS], fontsize=8
  )
  ax.axvline(0, color="grey", lw=0.5)
  ax.set_xlabel("Spearman with downstream gold (95% bootstrap CI over proxies)")
  ax.invert_yaxis()
  ax.legend(fontsize=7, loc="lower right")
  ax.set_title(("SMOKE RUN: " if results["smoke_run"] else "") + "Which evaluation predicts gold?")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_within_run(results, runs, path):
  """Left: within-run Spearman(proxy, gold) before vs after the gold peak; right: RL curves."""
  plt = _plt()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  data, labels = [], []
  for kind, r in runs.items():
    for part in ("before", "after"):
      v = [x[part] for x in r["runs"] if np.isfinite(x[part])]
      if v:
        data.append(v)
        labels.append(f"{kind} {part}\n(n={len(v)})")
  if data:
    axes[0].boxplot(data)
    axes[0].set_xticks(np.arange(1, len(data) + 1), labels, fontsize=8)
  axes[0].axhline(0, color="grey", lw=0.5)
  axes[0].set_ylabel("Spearman(proxy, gold) along the run")
  axes[0].set_title("Within-run proxy-gold correlation around the gold peak")
  ax = axes[1]
  rl = [p for p in results["proxies"] if p.get("rl")]
  for p in rl:
    d = np.sqrt(np.maximum([0.0] + p["rl"]["kl"], 0.0))
    (line,) = ax.plot(d, [0.0] + p["rl"]["gold"], "-", lw=1)
    ax.plot(d, [0.0] + p["rl"]["proxy"], "--", lw=0.7, color=line.get_color())
  for w, o in results["oracle"].items():
    if "rl" in o:
      d = np.sqrt(np.maximum([0.0] + o["rl"]["kl"], 0.0))
      ax.plot(
        d,
        [0.0] + o["rl"]["gold"],
        "k-",
        lw=2,
        label="PPO on gold" if w == min(results["oracle"]) else None,
      )
  ax.set_xlabel("sqrt(KL)")
  ax.set_ylabel("reward (pi_init = 0)")
  ax.set_title("PPO: gold solid, proxy dashed" if rl else "no RL runs")
  if rl:
    ax.legend(fontsize=7)
  fig.suptitle("SMOKE RUN (not evidence)" if results["smoke_run"] else "")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


# ----------------------------------------------------------------------------- summary
def write_summary(results, path):
  cfg, lines = results["config"], []
  lines.append("# Objective-mismatch study (synthetic world)\n")
  if results["smoke_run"]:
    lines.append(
      "**SMOKE RUN (`--quick`): tiny settings; the numbers and checks are not evidence.**\n"
    )
  proxies = results["proxies"]
  lines.append(
    f"{len(proxies)} proxies in {len(cfg['world_seeds'])} worlds "
    f"({', '.join(str(sum(p['world'] == w for p in proxies)) for w in cfg['world_seeds'])} per "
    f"world); sizes {cfg['proxy_sizes']}, comparisons {cfg['data_sizes']}, label noise "
    f"{cfg['label_noises']}, losses {cfg['losses']}, train steps {cfg['train_steps']}, "
    f"{cfg['bt_replicates']} BT seeds; PPO on {sum(bool(p.get('rl')) for p in proxies)} "
    f"(stratified by accuracy, {cfg['rl_per_size']} per world of size {cfg['rl_sizes']}) and "
    f"on gold. Primary outcome: "
    f"`{cfg['primary_outcome']}`.\n"
  )
  acc = np.array([p["acc"] for p in proxies])
  lines.append(f"Held-out accuracy range {acc.min():.3f} - {acc.max():.3f}.\n")
  lines.append("## Evaluations ranked by Spearman with the primary outcome (all proxies)\n")
  lines.append(
    "| evaluation | Spearman [95% CI] | Kendall | mean within size | mean within data | mean over gold outcomes |"
  )
  lines.append("|---|---:|---:|---:|---:|---:|")
  for r in results["ranking"]:
    lines.append(
      f"| {r['label']} | {r['spearman_primary']:+.2f} [{r['ci'][0]:+.2f}, {r['ci'][1]:+.2f}] | "
      f"{r['kendall_primary']:+.2f} | {r['mean_within_size']:+.2f} | {r['mean_within_data']:+.2f} | "
      f"{r['mean_over_gold_outcomes']:+.2f} |"
    )
  lines.append("\n## Spearman of held-out accuracy with each outcome, by group\n")
  lines.append("| outcome | group | n | Spearman [95% CI] | Kendall [95% CI] |")
  lines.append("|---|---|---:|---:|---:|")
  for oname, groups in results["correlations"].items():
    for gname, g in groups.items():
      if "/ data" in gname:
        continue
      s, k = g["spearman"]["acc"], g["kendall"]["acc"]
      lines.append(
        f"| {oname} | {gname} | {g['n']} | {s['estimate']:+.2f} [{s['low']:+.2f}, {s['high']:+.2f}] | "
        f"{k['estimate']:+.2f} [{k['low']:+.2f}, {k['high']:+.2f}] |"
      )
  n = results["near_equal"]
  lines.append("\n## Proxies of near-equal accuracy\n")
  lines.append(
    f"{n['num_pairs']} pairs (same world) within {n['tolerance']:.3f} accuracy; "
    f"{n['num_differ_2se']} differ in {n['outcome']} by > 2 paired s.e.; median |diff| "
    f"{n['median_abs_gold_diff']:.3f}, max {n['max_abs_gold_diff']:.3f} (gold in pi_init s.d.).\n"
  )
  lines.append("## Within-run proxy-gold correlation\n")
  for kind, r in results["within_run"].items():
    lines.append(
      f"- {kind}: {r['num_interior_peak']}/{r['num_runs']} runs peak inside; mean Spearman before "
      f"the peak {r['mean_before']:+.2f}, after {r['mean_after']:+.2f}"
    )
  lines.append("\n## Checks (thresholds fixed in code before the run)\n")
  for c in results["checks"]:
    lines.append(f"- **{'PASS' if c['passed'] else 'FAIL'}** {c['name']}: {c['detail']}")
  lines.append("\n## Wall-clock of this invocation (s; stages loaded from cache take ~1 s)\n")
  lines.append(", ".join(f"{k}: {v:.0f}" for k, v in results["timing_this_invocation"].items()))
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def analyse(results: dict[str, Any], workdir: str) -> dict[str, Any]:
  """Adds outcomes, correlations, checks to ``results``; writes results.json, figures, summary."""
  cfg = results["config"]
  outs = [outcomes(results, p) for p in results["proxies"]]
  for p, o in zip(results["proxies"], outs):
    p["outcomes"] = o
  table = correlations(results, outs, resamples=cfg["bootstrap_resamples"])
  results["correlations"] = table
  results["ranking"] = ranking(table, results)
  results["near_equal"] = near_equal(results, outs, tolerance=cfg["near_equal_accuracy"])
  runs = within_run(results)
  results["within_run"] = runs
  results["checks"] = run_checks(results, outs, table, results["near_equal"], runs)
  plot_scatter(results, outs, os.path.join(workdir, "scatter.png"))
  plot_correlations(results, table, os.path.join(workdir, "correlations.png"))
  plot_within_run(results, runs, os.path.join(workdir, "within_run.png"))
  write_summary(results, os.path.join(workdir, "summary.md"))
  rundir.write_json(os.path.join(workdir, "results.json"), results)
  return results
