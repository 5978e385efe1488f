"""Figures and the markdown summary of the DPL study (from analysed results)."""

from __future__ import annotations

import os

import numpy as np

from experiments import dpl_lib

STYLE = {
  "bradley_terry/mean": ("k", "-", "Bradley-Terry"),
  "mean_variance/mean": ("tab:blue", "-", "mean-variance: mean"),
  "mean_variance/quantile": ("tab:blue", "--", "mean-variance: quantile"),
  "categorical/mean": ("tab:orange", "-", "categorical: mean"),
  "categorical/quantile": ("tab:orange", "--", "categorical: quantile"),
}


def _plt():
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  return plt


def plot_bon(cfg: dpl_lib.DPLConfig, results: dict, path: str) -> None:
  """Gold of group 1, group 2 and the worse-off group vs KL_bon, one row per world.

  Lines: seed means; bands (group panels): bootstrap 95% over seeds, prompts and samples.
  """
  plt = _plt()
  worlds = results["worlds"]
  fig, axes = plt.subplots(len(worlds), 3, figsize=(16, 4.2 * len(worlds)), squeeze=False)
  smoke = " (SMOKE RUN)" if results.get("smoke_run") else ""
  for r, w in enumerate(worlds):
    kl = np.asarray(w["bon"]["kl"])
    oracle = np.asarray(w["bon"]["oracle"])  # [selector group, value group, nv]
    for name in dpl_lib.selectors(cfg):
      colour, ls, label = STYLE[name]
      s = w["stats"]["bon"][name]
      mean, band = np.asarray(s["curve_mean"]), np.asarray(s["curve_band"])
      for g in range(2):
        ax = axes[r][g]
        ax.plot(kl, mean[g], ls, color=colour, lw=1.8, label=label)
        ax.fill_between(kl, band[0, g], band[1, g], color=colour, alpha=0.12, lw=0)
      axes[r][2].plot(kl, s["curve_worst"], ls, color=colour, lw=1.8, label=label)
    for g in range(2):
      axes[r][g].plot(
        kl, oracle[g, g], ":", color="grey", lw=1.2, label=f"BoN on group {g + 1} gold"
      )
      axes[r][g].set_title(f"world {w['world_seed']}: group {g + 1} gold{smoke}")
    axes[r][2].set_title(f"world {w['world_seed']}: worse-off group's gold (per seed){smoke}")
    for ax in axes[r]:
      ax.axhline(0, color="grey", lw=0.5)
      ax.set_xlabel("KL_bon(n) = log n - (n-1)/n  [nats]")
      ax.set_ylabel("gold - pi_init's")
  axes[0][0].legend(fontsize=7)
  fig.suptitle(
    f"DPL: best-of-n on each model's mean (solid) and {cfg.alpha:g}-quantile (dashed); "
    f"group 2 labels {cfg.hidden.group2_prob:g} of the pairs"
  )
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def plot_variance(cfg: dpl_lib.DPLConfig, results: dict, raw_worlds: list[dict], path: str) -> None:
  """Per world: predicted std vs the true hidden-context std (each DPL head), and r^2 per arm."""
  from jaxrm.data import hidden_context  # noqa: PLC0415

  plt = _plt()
  rows = len(raw_worlds)
  fig, axes = plt.subplots(rows, 3, figsize=(15, 4.2 * rows), squeeze=False)
  rng = np.random.default_rng(0)
  for r, (w, stats) in enumerate(zip(raw_worlds, results["worlds"])):
    golds = w["diagnostics"]["golds"]
    true_std = np.asarray(
      hidden_context.utility_moments(golds, group2_prob=cfg.hidden.group2_prob)["std"]
    )
    levels = np.unique(np.round(true_std, 4))
    for ax, kind in zip(axes[r][:2], dpl_lib.DPL_KINDS):
      for j, (labels, colour) in enumerate((("hidden", "tab:red"), ("control", "tab:grey"))):
        arm = w["diagnostics"]["arms"].get(f"{kind}/{labels}")
        if arm is None:
          continue
        std = np.asarray(arm["std"])  # [seeds, n]
        jitter = rng.uniform(-0.01, 0.01, size=true_std.shape) + 0.02 * (j - 0.5)
        ax.scatter(true_std + jitter, std[0], s=2, alpha=0.15, color=colour)
        by_level = [std[:, np.round(true_std, 4) == v].mean() for v in levels]
        ax.plot(levels, by_level, "o-", color=colour, lw=2, label=f"{labels} labels")
      ax.set_xlabel("true hidden-context std sqrt(p(1-p)) |g1 - g2|")
      ax.set_ylabel("predicted std")
      ax.set_title(
        f"world {w['world_seed']}: {kind} (dots seed 0, line mean per level)", fontsize=9
      )
      ax.legend(fontsize=8)
    ax = axes[r][2]
    names = [n for n in stats["stats"]["diagnostics"] if not n.startswith("bradley_terry")]
    ax.bar(np.arange(len(names)), [np.mean(stats["stats"]["diagnostics"][n]["r2"]) for n in names])
    ax.set_xticks(np.arange(len(names)))
    ax.set_xticklabels([n.replace("/", "\n") for n in names], fontsize=8)
    ax.set_ylabel("r^2 (seed mean)")
    ax.set_title(f"world {w['world_seed']}: r^2 = Var[mu] / (Var[mu] + E[sigma^2])", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def summary_markdown(cfg: dpl_lib.DPLConfig, results: dict) -> str:
  lines = ["# DPL study (Siththaranjan, Laidlaw & Hadfield-Menell 2023) in the synthetic world", ""]
  if results.get("smoke_run"):
    lines += ["**SMOKE RUN** (`--quick`): tiny settings; the checks below mean nothing.", ""]
  lines += [
    f"Worlds {list(cfg.world_seeds)}; {cfg.num_comparisons} pairs, group 2 (feature weight "
    f"{cfg.hidden.group2_feature_weight:g}) labels each with probability "
    f"{cfg.hidden.group2_prob:g}; {cfg.num_seeds} seeds of each model ({cfg.proxy_size}); "
    f"best-of-n up to n = {cfg.bon_max_n} over {cfg.bon_prompts} prompts x {cfg.bon_samples} "
    f"samples; alpha = {cfg.alpha:g}.",
    "",
    "| check | pooled | 95% CI | per world | verdict |",
    "|---|---|---|---|---|",
  ]
  for c in results["checks"]:
    per = ", ".join(
      f"{k}: {v['value']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}] {'PASS' if v['passed'] else 'FAIL'}"
      for k, v in c["per_world"].items()
    )
    lines.append(
      f"| {c['name']} | {c['value']:.3f} | [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}] | {per} | "
      f"{'PASS' if c['passed'] else 'FAIL'} |"
    )
  lines += ["", "## Held-out diagnostics (seed means)", ""]
  lines += ["| world | model / labels | r^2 | mean std | Spearman(std, true std) | acc. group 1 | acc. group 2 | acc. E[utility] |"]  # fmt: skip
  lines += ["|---|---|---|---|---|---|---|---|"]
  for w in results["worlds"]:
    for name, s in w["stats"]["diagnostics"].items():
      sp = f"{np.mean(s['spearman_std']):.3f}" if "spearman_std" in s else "-"
      r2 = f"{np.mean(s['r2']):.3f}" if not name.startswith("bradley_terry") else "-"
      lines.append(
        f"| {w['world_seed']} | {name} | {r2} | {np.mean(s['mean_std']):.3f} | {sp} | "
        f"{np.mean(s['accuracy_group1']):.3f} | {np.mean(s['accuracy_group2']):.3f} | "
        f"{np.mean(s['accuracy_expected_utility']):.3f} |"
      )
  lines += ["", f"## Best-of-{cfg.bon_max_n} (gold minus pi_init's, seed means)", ""]
  lines += ["| world | selector | group 1 | group 2 | worse-off group |", "|---|---|---|---|---|"]
  for w in results["worlds"]:
    for name, s in w["stats"]["bon"].items():
      g = s["gold_at_max_n"]
      lines.append(
        f"| {w['world_seed']} | {name} | {g[0]:.3f} | {g[1]:.3f} | {s['worst_group_at_max_n']:.3f} |"
      )
  lines += ["", "Figures: `dpl_bon.png`, `dpl_variance.png`.", ""]
  return "\n".join(lines)


def write_outputs(cfg, results: dict, raw_worlds: list[dict], workdir: str) -> list[str]:
  paths = [os.path.join(workdir, n) for n in ("dpl_bon.png", "dpl_variance.png", "summary.md")]
  plot_bon(cfg, results, paths[0])
  plot_variance(cfg, results, raw_worlds, paths[1])
  with open(paths[2], "w") as f:
    f.write(summary_markdown(cfg, results))
  return paths
