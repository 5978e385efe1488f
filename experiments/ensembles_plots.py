"""Figure and summary of the ensembles study (``experiments/ensembles_analysis.py``)."""

from __future__ import annotations

from typing import Any

import numpy as np

TITLES = {"bon": "best-of-n", "rl": "RL (PPO)"}


def _plt():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _band(c: dict) -> tuple[np.ndarray, np.ndarray]:
  return np.percentile(c["boot"], 2.5, axis=0), np.percentile(c["boot"], 97.5, axis=0)


def curves_json(pooled: dict) -> dict[str, Any]:
  """The pooled curves (KL, gold, 95% band) for ``results.json``: a few KB."""
  out = {}
  for tag, cur in pooled["noises"].items():
    out[tag] = {}
    for opt in ("bon", "rl"):
      out[tag][opt] = {}
      for name, c in cur[opt].items():
        lo, hi = _band(c)
        out[tag][opt][name] = {
          "kl": np.round(c["x"], 4).tolist(),
          "gold": np.round(c["gold"], 4).tolist(),
          "lo": np.round(lo, 4).tolist(),
          "hi": np.round(hi, 4).tolist(),
        }
  return out


def plot_figure(pooled: dict, cfg: dict, path: str) -> None:
  """Gold vs KL: rows noise rates, columns best-of-n / RL, a line per objective, 95% bands."""
  import matplotlib

  plt = _plt()
  tags = list(pooled["noises"])
  opts = [o for o in ("bon", "rl") if pooled["noises"][tags[0]][o]]
  fig, axes = plt.subplots(
    len(tags), len(opts), figsize=(5.5 * len(opts), 3.8 * len(tags)), squeeze=False
  )
  names = list(pooled["noises"][tags[0]]["bon"])
  ens = [n for n in names if n not in ("single", "mean", "wco", "oracle")]
  cmap = matplotlib.colormaps["viridis"]
  colours = {"single": "tab:red", "mean": "tab:orange", "wco": "tab:blue", "oracle": "black"}
  colours.update({n: cmap(0.35 + 0.5 * i / max(len(ens) - 1, 1)) for i, n in enumerate(ens)})
  for i, tag in enumerate(tags):
    for j, opt in enumerate(opts):
      ax = axes[i, j]
      for name, c in pooled["noises"][tag][opt].items():
        lo, hi = _band(c)
        style = "--" if name == "oracle" else "-"
        label = "gold oracle" if name == "oracle" else name
        ax.plot(c["x"], c["gold"], style, color=colours[name], label=label, marker=".")
        ax.fill_between(c["x"], lo, hi, color=colours[name], alpha=0.15, linewidth=0)
      ax.set_xscale("symlog", linthresh=0.1)
      ax.set_xlabel("KL(pi || pi_init), nats" + (" (analytic)" if opt == "bon" else " (exact)"))
      ax.set_ylabel("gold (pi_init = 0)")
      ax.set_title(f"{TITLES[opt]}, label noise {tag.removeprefix('noise')}")
      ax.axhline(0, color="grey", linewidth=0.5)
  axes[0, -1].legend(fontsize=7, loc="best")
  smoke = " -- SMOKE RUN (quick settings)" if cfg.get("smoke") else ""
  fig.suptitle(
    f"Ensembles (Coste et al. 2023): {cfg['num_ensembles']} ensembles x k={cfg['ensemble_size']},"
    f" mean over worlds {list(cfg['world_seeds'])}, 95% bootstrap bands{smoke}",
    fontsize=10,
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_summary(results: dict[str, Any], path: str) -> None:
  """``summary.md``: settings, the checks, and every unit's statistics."""
  cfg = results["config"]
  lines = ["# Reward-model ensembles study (Coste et al. 2023; synthetic world)", ""]
  if results["smoke_run"]:
    lines += ["**SMOKE RUN (--quick): tiny settings; the checks below are not evidence.**", ""]
  lines += [
    f"Worlds {list(cfg['world_seeds'])}; label noise {list(cfg['label_noises'])}; "
    f"{cfg['num_ensembles']} ensembles x k={cfg['ensemble_size']} members "
    f"({cfg['proxy_size']}, {cfg['num_comparisons']} comparisons); best-of-n over "
    f"{cfg['bon_prompts']} prompts x {cfg['bon_samples']} samples, n <= {cfg['bon_max_n']}; "
    f"RL: {cfg['rl_algorithm']} {cfg['rl_steps']} steps x {cfg['rl_batch_size']}, "
    f"kl_coef {cfg['kl_coef']}, held-out eval on {cfg['rl_eval_prompts']} prompts every "
    f"{cfg['rl_log_every']} steps. UWO lambdas {list(cfg['uwo_coefs'])} (checks use "
    f"{cfg['uwo_check_coef']}). Intervals: bootstrap 95% ({cfg['bon_bootstrap']} replicates) "
    "over ensembles and, for best-of-n, prompts and samples within prompt.",
    "",
    "## Checks (pooled verdict; per world beside it)",
    "",
  ]
  for c in results["checks"]:
    per = ", ".join(f"{k}: {'PASS' if v else 'FAIL'}" for k, v in c["per_world"].items())
    lines.append(f"- {'PASS' if c['passed'] else 'FAIL'} `{c['name']}` ({per}): {c['detail']}")
  lines.append("")
  for unit, fr in results["oracle_fraction"].items():
    if fr:
      lines.append(f"- RL oracle fraction ({unit}, reported): {fr['detail']}")
  lines.append("")
  for unit, table in results["statistics"].items():
    lines += [f"## {unit}", ""]
    for tag, opts in table.items():
      for opt, rows in opts.items():
        if not rows:
          continue
        lines += [
          f"### {TITLES[opt]}, label noise {tag.removeprefix('noise')}",
          "",
          "| objective | peak gold | final gold | drop from peak | final KL |",
          "|---|---:|---:|---:|---:|",
        ]
        for name, s in rows.items():
          cells = [
            f"{s[k][0]:.2f} [{s[k][1]:.2f}, {s[k][2]:.2f}]" for k in ("peak", "final", "drop")
          ]
          lines.append(f"| {name} | " + " | ".join(cells) + f" | {s['final_kl']:.2f} |")
        lines.append("")
    for c in results["checks"]:
      if unit in c["per_world_detail"]:
        ok = "PASS" if c["per_world"][unit] else "FAIL"
        lines.append(f"- {ok} `{c['name']}`: {c['per_world_detail'][unit]}")
    lines.append("")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
