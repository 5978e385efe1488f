"""Figures and the markdown summary of the over-optimisation study (from analysed results)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

ESS_MIN = 30.0  # pi_beta points are drawn only where the pooled ESS reaches this


def _plt():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _colours(n: int):
  import matplotlib

  cmap = matplotlib.colormaps["viridis"]
  return [cmap(0.85 * i / max(n - 1, 1)) for i in range(n)]


def _rl_panel(ax, unit, colours):
  rl = unit["rl"]
  for i, name in enumerate(unit["names"]):
    arm = rl["arms"].get(name)
    if arm is None:
      continue
    d = np.sqrt(np.maximum(arm["kl_exact"], 0)).mean(0)
    g = arm["gold"]
    gm = g.mean(0)
    se = g.std(0, ddof=1) / math.sqrt(len(g)) if len(g) > 1 else 0 * gm
    ax.plot(d, gm, "-", color=colours[i], lw=2, label=name)
    ax.fill_between(d, gm - 2 * se, gm + 2 * se, color=colours[i], alpha=0.2, lw=0)
    ax.plot(d, arm["proxy"].mean(0), "--", color=colours[i], lw=1.2)
  if "gold" in rl["arms"]:
    arm = rl["arms"]["gold"]
    d = np.sqrt(np.maximum(arm["kl_exact"], 0)).mean(0)
    ax.plot(d, arm["gold"].mean(0), "-", color="k", lw=2, label="RL on gold (oracle)")
  ax.plot(np.sqrt(unit["kl"]), unit["oracle_gold"], ":", color="k", lw=1.2, label="BoN on gold")
  ax.set_title("RL: gold solid (±2 s.e. seeds), proxy dashed")


def plot_figure1(pooled: dict, units: list[dict], results: dict, path: str) -> None:
  """Gao et al. Figure 1 layout per unit (pooled first, then each world): BoN and RL panels.

  Best-of-n: gold (solid) with its bootstrap 95% band, proxy (dashed), the oracle best-of-n
  (black), pi_beta of gold (black dotted: the frontier) and pi_beta of each proxy (thin dotted),
  pi_beta only where its pooled ESS >= 30.
  """
  plt = _plt()
  labels = ["pooled"] + [f"world {w['world_seed']}" for w in results["worlds"]]
  rows = [pooled] + units
  has_rl = pooled["rl"] is not None
  cols = 2 if has_rl else 1
  fig, axes = plt.subplots(len(rows), cols, figsize=(6.2 * cols, 4.2 * len(rows)), squeeze=False)
  colours = _colours(len(pooled["names"]))
  smoke = " (SMOKE RUN: tiny settings, no statistics)" if results.get("smoke_run") else ""
  for r, (unit, label) in enumerate(zip(rows, labels)):
    ax = axes[r][0]
    d = np.sqrt(unit["kl"])
    for i, name in enumerate(unit["names"]):
      c = colours[i]
      lo, hi = np.percentile(unit["boot"][i], [2.5, 97.5], axis=0)
      ax.plot(d, unit["gold"][i], "-", color=c, lw=2, label=f"{name} ({int(unit['params'][i]):,})")
      ax.fill_between(d, lo, hi, color=c, alpha=0.2, lw=0)
      ax.plot(d, unit["proxy"][i], "--", color=c, lw=1.2)
      ok = unit["tilted_ess"][i] >= ESS_MIN
      ax.plot(np.sqrt(unit["tilted_kl"][i][ok]), unit["tilted_gold"][i][ok], ":", color=c, lw=1)
    lo, hi = np.percentile(unit["boot_oracle"], [2.5, 97.5], axis=0)
    ax.plot(d, unit["oracle_gold"], "-", color="k", lw=1.5, label="BoN on gold (oracle)")
    ax.fill_between(d, lo, hi, color="k", alpha=0.1, lw=0)
    ok = unit["oracle_tilted_ess"] >= ESS_MIN
    ax.plot(
      np.sqrt(unit["oracle_tilted_kl"][ok]),
      unit["oracle_tilted_gold"][ok],
      ":",
      color="k",
      lw=1.5,
      label="pi_beta of gold (frontier)",
    )
    ax.set_xlim(0, d.max() * 1.05)
    ax.set_title(f"{label}: best-of-n (band: bootstrap 95%){smoke if r == 0 else ''}", fontsize=9)
    if has_rl and unit["rl"] is not None:
      _rl_panel(axes[r][1], unit, colours)
    for ax in axes[r]:
      ax.axhline(0, color="grey", lw=0.5)
      ax.set_xlabel("sqrt(KL(pi || pi_init))")
      ax.set_ylabel(f"reward ({label}; pi_init = 0)")
  axes[0][0].legend(fontsize=6, loc="upper left")
  if has_rl:
    axes[0][1].legend(fontsize=6, loc="upper left")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_coefficients(results: dict[str, Any], path: str) -> None:
  """alpha_bon, beta_bon (95% CI) and the observed gold peak (bootstrap 95%) vs parameters."""
  plt = _plt()
  params = np.array([p["num_params"] for p in results["proxies"]], float)
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
  for k, a in enumerate(results["analysis"]):
    pooled = a["label"] == "pooled"
    style = dict(fmt="o-" if pooled else "x:", capsize=3, alpha=1 if pooled else 0.6)
    x = params * (1 + 0.04 * (k - 1))
    for ax, name in zip(axes[:2], ("alpha", "beta")):
      v = np.array([f[name] for f in a["fits"]["bon"]])
      ci = np.array([f[f"{name}_ci"] for f in a["fits"]["bon"]])
      ax.errorbar(x, v, yerr=[v - ci[:, 0], ci[:, 1] - v], label=a["label"], **style)
    peaks = a["stats"]["observed_peaks"]
    v = np.array([p["peak_gold"] for p in peaks])
    ci = np.array([p["peak_gold_ci"] for p in peaks])
    axes[2].errorbar(x, v, yerr=[v - ci[:, 0], ci[:, 1] - v], label=a["label"], **style)
  for ax, title in zip(axes, ("alpha_bon", "beta_bon", "observed BoN gold peak")):
    ax.set_xscale("log")
    ax.set_xlabel("proxy RM parameters")
    ax.set_title(title)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_decomposition(pooled: dict, path: str) -> None:
  """Gold's parts (planted feature vs the rest) along best-of-n and RL, pooled over worlds."""
  plt = _plt()
  has_rl = pooled["rl"] is not None and any(
    "gold_feature" in a for a in pooled["rl"]["arms"].values()
  )
  rows = 2 if has_rl else 1
  fig, axes = plt.subplots(rows, 2, figsize=(12, 4 * rows), squeeze=False)
  colours = _colours(len(pooled["names"]))
  d = np.sqrt(pooled["kl"])
  for j, part in enumerate(("gold_rest", "gold_feature")):
    ax = axes[0][j]
    for i, name in enumerate(pooled["names"]):
      ax.plot(d, pooled[part][i], "-", color=colours[i], label=name)
    ax.plot(d, pooled[f"oracle_{part}"], "-", color="k", label="BoN on gold")
    ax.set_title(f"best-of-n: {part}")
    if has_rl:
      ax = axes[1][j]
      for i, name in enumerate(pooled["names"] + ["gold"]):
        arm = pooled["rl"]["arms"].get(name)
        if arm is None or part not in arm:
          continue
        dr = np.sqrt(np.maximum(arm["kl_exact"], 0)).mean(0)
        ax.plot(dr, arm[part].mean(0), "-", color=(colours + ["k"])[i], label=name)
      ax.set_title(f"RL: {part}")
  for ax in axes.flat:
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("sqrt(KL)")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_data_sweep(results: dict[str, Any], path: str) -> None:
  """alpha_bon, beta_bon and held-out accuracy against comparison-data size (first world)."""
  plt = _plt()
  sweep = results["data_fits"]
  sizes = [e["num_comparisons"] for e in sweep]
  colours = _colours(len(results["proxies"]))
  fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
  for i, p in enumerate(results["proxies"]):
    series = {
      "alpha_bon": [e["fits"][i]["alpha"] for e in sweep],
      "beta_bon": [e["fits"][i]["beta"] for e in sweep],
      "held-out accuracy": [e["heldout_accuracy"][i] for e in sweep],
    }
    for ax, (name, values) in zip(axes, series.items()):
      ax.plot(sizes, values, "o-", color=colours[i], label=p["name"])
      ax.set_title(name)
  for ax in axes:
    ax.set_xscale("log")
    ax.set_xlabel("comparisons")
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _fmt_ci(v, ci) -> str:
  return f"{v:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def _seed_means_and_peak(arm: dict) -> tuple[dict[str, np.ndarray], int]:
  """An RL arm's curves averaged over seeds, and the evaluation where the mean gold peaks."""
  mean = {k: np.asarray(v).mean(0) for k, v in arm.items()}
  return mean, int(np.argmax(mean["gold"]))


def rl_gold_peak(unit: dict, name: str) -> tuple[float, float] | None:
  """The RL arm ``name``'s observed gold peak in ``unit``: the maximum over evaluations of the
  seed-mean held-out gold, and the seed-mean exact KL there; None without that arm."""
  arm = (unit.get("rl") or {}).get("arms", {}).get(name)
  if arm is None:
    return None
  mean, j = _seed_means_and_peak(arm)
  return float(mean["gold"][j]), float(mean["kl_exact"][j])


def rl_table(unit: dict) -> list[str]:
  """Markdown rows: every RL arm's observed gold peak and its final evaluation (seed means,
  exact KL), with gold's two parts (planted feature, the rest) at the peak and at the end, and
  best-of-n on gold at the largest n for reference."""
  rl = unit.get("rl")
  if not rl:
    return []
  lines = [
    f"RL arms (seed means of held-out gold; best-of-n on gold reaches "
    f"{unit['oracle_gold'][-1]:.2f} at KL {unit['kl'][-1]:.2f}, n={int(unit['ns'][-1])}):\n",
    "| RL arm | reward | KL coef | gold peak (KL) | final gold (KL) | feature part: peak, final |"
    " rest: peak, final |",
    "|---|---|---:|---:|---:|---:|---:|",
  ]
  for name, arm in rl["arms"].items():
    info = rl["arm_info"][name]
    mean, j = _seed_means_and_peak(arm)
    parts = [
      f"{mean[k][j]:+.2f}, {mean[k][-1]:+.2f}" if k in mean else "–"
      for k in ("gold_feature", "gold_rest")
    ]
    lines.append(
      f"| {name} | {info['reward']} | {info['kl_coef']:g} | "
      f"{mean['gold'][j]:.2f} ({mean['kl_exact'][j]:.1f}) | "
      f"{mean['gold'][-1]:.2f} ({mean['kl_exact'][-1]:.1f}) | {parts[0]} | {parts[1]} |"
    )
  return lines + [""]


def tilted_gold_max(unit: dict, i: int) -> float | None:
  """Proxy ``i``'s pi_beta gold maximum over the temperatures whose ESS reaches ESS_MIN."""
  ok = np.asarray(unit["tilted_ess"][i]) >= ESS_MIN
  return float(np.asarray(unit["tilted_gold"][i])[ok].max()) if ok.any() else None


def write_summary(results: dict[str, Any], pooled: dict, units: list[dict], path: str) -> None:
  """Markdown: pooled and per-world tables, ESS, the checks with per-world verdicts.

  ``pooled`` and ``units`` (one per world) are the arrays the analysis used
  (:mod:`experiments.overoptimization_units`); each table reads its own unit's arrays.
  """
  lines = ["# Reward over-optimisation study (synthetic world)\n"]
  if results.get("smoke_run"):
    lines.append("**SMOKE RUN** (the `quick` config): tiny settings; no conclusion follows.\n")
  cfg = results["config"]
  ess = np.asarray(results["worlds"][0]["bon"]["ess"])
  ns = results["worlds"][0]["bon"]["ns"]
  lines.append(
    f"{len(results['worlds'])} worlds (seeds {cfg['world_seeds']}), {cfg['num_seeds']} proxy "
    f"seeds per size, best-of-n over {cfg['bon_prompts']} prompts x {cfg['bon_samples']} "
    f"samples; estimator ESS at n={ns[-1]}: {ess[-1]:.1f} pooled "
    f"({ess[-1] / cfg['bon_prompts']:.2f} per prompt). Intervals: bootstrap 95% over proxy "
    f"seeds, prompts and samples within prompt ({cfg['bon_bootstrap']} replicates). Held-out "
    "accuracy: mean over proxy seeds (and worlds). RL gold peak: the maximum of the seed-mean "
    "held-out gold over RL evaluations, at its seed-mean exact KL.\n"
  )
  by_label = {"pooled": pooled} | {
    f"world{w['world_seed']}": u for w, u in zip(results["worlds"], units)
  }
  for a in results["analysis"]:
    lines.append(f"## {a['label']}\n")
    lines.append(
      "| proxy | params | held-out acc. | alpha_bon | beta_bon | R² | observed peak gold | "
      "at sqrt(KL) | fitted peak | pi_beta gold (max, ESS>=30) | RL gold peak (KL) |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    unit = by_label[a["label"]]
    for i, p in enumerate(results["proxies"]):
      f, pk = a["fits"]["bon"][i], a["stats"]["observed_peaks"][i]
      fitted = f"{f['peak_gold']:.2f}" if f["peak_inside_data"] else "beyond data"
      tilt = tilted_gold_max(unit, i)
      rl = rl_gold_peak(unit, p["name"])
      lines.append(
        f"| {p['name']} | {p['num_params']:,} | {unit['accuracy'][i]:.3f} | {f['alpha']:.3f} | "
        f"{f['beta']:.3f} | {f['r_squared']:.3f} | "
        f"{_fmt_ci(pk['peak_gold'], pk['peak_gold_ci'])} | "
        f"{_fmt_ci(pk['peak_sqrt_kl'], pk['peak_sqrt_kl_ci'])} | {fitted} | "
        f"{'–' if tilt is None else f'{tilt:.2f}'} | "
        f"{'–' if rl is None else f'{rl[0]:.2f} ({rl[1]:.1f})'} |"
      )
    lines.append("")
    lines += rl_table(unit)
    for name, (passed, detail) in a["checks"].items():
      lines.append(f"- {'PASS' if passed else 'FAIL'} {name}: {detail}")
    lines.append("")
  lines.append("## Checks (verdict: pooled over worlds; per-world verdicts in brackets)\n")
  for c in results["checks"]:
    per = ", ".join(f"{k}: {'PASS' if v else 'FAIL'}" for k, v in c["per_world"].items())
    lines.append(
      f"- **{'PASS' if c['passed'] else 'FAIL'}** {c['name']}: {c['detail']}"
      + (f" [{per}]" if per else "")
    )
  if "timing_this_invocation" in results:
    lines.append("\n## Wall-clock of this invocation (s; stages loaded from cache take ~1 s)\n")
    lines.append(", ".join(f"{k}: {v:.0f}" for k, v in results["timing_this_invocation"].items()))
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
