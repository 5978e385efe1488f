"""Analysis of the over-optimisation study: fits, PASS/FAIL checks, figures and summary.

Everything here is computed from the study's own measurements (``results`` below); nothing
is tuned to make a check pass. The checks are those of the study's issue:

* the proxy score of best-of-n rises monotonically with n for every proxy;
* gold rises, peaks and falls for the smaller proxies (best-of-n);
* the best-of-n fits ``R_bon(d) = d (alpha - beta d)`` reach R^2 >= 0.9;
* across proxy sizes beta_bon falls and the fitted gold peak rises (Spearman with log
  parameters <= -0.8 and >= +0.8);
* RL reaches a given gold score only at a larger KL than best-of-n;
* >= 3 seeds, shown as mean and band.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from jaxrm.math import scaling
from jaxrm.math.metrics import spearman


def _fit_dict(fit: scaling.Fit) -> dict[str, Any]:
  peak_d, peak_r = scaling.gold_peak(fit)
  return {
    "alpha": fit.alpha,
    "beta": fit.beta,
    "alpha_ci": list(fit.alpha_ci),
    "beta_ci": list(fit.beta_ci),
    "r_squared": fit.r_squared,
    "num_points": fit.num_points,
    "peak_sqrt_kl": peak_d,
    "peak_gold": peak_r,
  }


def fit_curves(results: dict[str, Any]) -> dict[str, Any]:
  """Fits R_bon / R_RL to every proxy's seed-mean best-of-n / RL gold curve.

  The functional forms describe the expected curve, so they are fitted to the mean over
  seeds (as the figure shows it); R^2 is that of the mean curve. For RL the mean is taken
  over seeds at each logged window, of ``sqrt(KL)`` and gold alike.
  """
  bon, fits = results["bon"], {"bon": [], "rl": []}
  d_bon = np.sqrt(np.asarray(bon["kl"]))
  for gold in np.asarray(bon["gold"]):  # [seeds, n]
    fits["bon"].append(_fit_dict(scaling.fit_bon(d_bon, gold.mean(0))))
  rl = results.get("rl")
  if rl is not None:
    for kl, gold in zip(np.asarray(rl["kl"]), np.asarray(rl["gold"])):  # [seeds, t]
      d = np.sqrt(np.maximum(kl, 0.0)).mean(0)
      fits["rl"].append(_fit_dict(scaling.fit_rl(d, gold.mean(0))))
  return fits


def fit_data_sweep(results: dict[str, Any]) -> list[dict[str, Any]]:
  """R_bon fits for every (comparison-data size, proxy size): the main run and ``--data_sizes``."""
  d = np.sqrt(np.asarray(results["bon"]["kl"]))
  main = {
    "num_comparisons": results["config"]["num_comparisons"],
    "proxies": results["proxies"],
    "bon_gold": results["bon"]["gold"],
  }
  entries = {e["num_comparisons"]: e for e in results.get("data_sweep", [])}
  entries.setdefault(main["num_comparisons"], main)
  out = []
  for entry in (entries[n] for n in sorted(entries)):
    fits = []
    for gold in np.asarray(entry["bon_gold"]):  # [seeds, n]: fitted on the seed mean
      fits.append(_fit_dict(scaling.fit_bon(d, gold.mean(0))))
    out.append(
      {
        "num_comparisons": entry["num_comparisons"],
        "fits": fits,
        "heldout_accuracy": [float(np.mean(p["heldout_accuracy"])) for p in entry["proxies"]],
      }
    )
  return out


def plot_data_sweep(results: dict[str, Any], path: str) -> None:
  """alpha_bon, beta_bon and the fitted gold peak against comparison-data size."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  sweep = results["data_fits"]
  sizes = [e["num_comparisons"] for e in sweep]
  colours = _colours(len(results["proxies"]))
  fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
  for i, p in enumerate(results["proxies"]):
    series = {
      "alpha_bon": [e["fits"][i]["alpha"] for e in sweep],
      "beta_bon": [e["fits"][i]["beta"] for e in sweep],
      "fitted gold peak": [e["fits"][i]["peak_gold"] for e in sweep],
      "held-out accuracy": [e["heldout_accuracy"][i] for e in sweep],
    }
    for ax, (name, values) in zip(axes, series.items()):
      ax.plot(sizes, values, "o-", color=colours[i], label=p["name"])
      ax.set_title(name)
  for ax in axes:
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.minorticks_off()
    ax.set_xlabel("comparisons")
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _first_reach(d: np.ndarray, r: np.ndarray, target: float) -> float:
  """Smallest d at which the curve ``r(d)`` (sorted by d) reaches ``target`` (inf if never)."""
  order = np.argsort(d)
  d, r = d[order], r[order]
  hit = np.nonzero(r >= target)[0]
  return float(d[hit[0]]) if hit.size else math.inf


def _spearman_or_nan(x, y) -> float:
  x, y = np.asarray(x, float), np.asarray(y, float)
  if len(x) < 3:
    return math.nan
  y = np.where(np.isposinf(y), np.finfo(float).max, y)
  return float(spearman(x, y))


def run_checks(results: dict[str, Any], fits: dict[str, Any]) -> tuple[list[dict], dict]:
  """Evaluates the study's checks; returns (checks, trend statistics)."""
  checks = []

  def check(name: str, passed: bool, detail: str):
    checks.append({"name": name, "passed": bool(passed), "detail": detail})

  bon = results["bon"]
  gold, proxy = np.asarray(bon["gold"]), np.asarray(bon["proxy"])  # [sizes, seeds, n]
  sizes = [p["name"] for p in results["proxies"]]
  params = np.array([p["num_params"] for p in results["proxies"]], float)
  num_seeds = gold.shape[1]

  mono = [bool(np.all(np.diff(proxy[i].mean(0)) >= -1e-6)) for i in range(len(sizes))]
  check(
    "bon_proxy_monotone",
    all(mono),
    "proxy best-of-n score non-decreasing in n for "
    + ", ".join(f"{s}: {m}" for s, m in zip(sizes, mono)),
  )

  # Gold rises, peaks and falls: the seed-mean curve has an interior maximum above pi_init,
  # and the fall from that n to the largest n, paired within seeds, exceeds two standard
  # errors of the paired differences (seeds differ in level, which says nothing about the
  # fall; the unpaired version is reported beside it).
  falls, details = [], []
  for i in range(len(sizes)):
    mean = gold[i].mean(0)
    peak = int(np.argmax(mean))
    drop = gold[i][:, peak] - gold[i][:, -1]  # [seeds]
    se = drop.std(ddof=1) / math.sqrt(num_seeds) if num_seeds > 1 else math.inf
    se_unpaired = gold[i][:, -1].std(ddof=1) / math.sqrt(num_seeds) if num_seeds > 1 else math.inf
    falls.append(bool(0 < peak < len(mean) - 1 and mean[peak] > 0 and drop.mean() > 2 * se))
    details.append(
      f"{sizes[i]}: {falls[-1]} (peak {mean[peak]:.2f} at n={bon['ns'][peak]}, "
      f"fall {drop.mean():.2f}, paired s.e. {se:.2f}, unpaired s.e. "
      f"{se_unpaired:.2f})"
    )
  smaller = list(range(len(sizes) // 2)) or [0]
  check(
    "bon_gold_peaks_for_smaller_proxies",
    all(falls[i] for i in smaller),
    "gold rises, peaks and falls (fall from the peak to the largest n > 2 paired s.e.): "
    + "; ".join(details)
    + f"; required for the {len(smaller)} smallest",
  )

  r2 = [f["r_squared"] for f in fits["bon"]]
  check(
    "bon_fit_r2",
    all(r >= 0.9 for r in r2),
    "R^2 of R_bon fits: " + ", ".join(f"{s}: {r:.3f}" for s, r in zip(sizes, r2)),
  )

  betas = [f["beta"] for f in fits["bon"]]
  peaks = [f["peak_gold"] for f in fits["bon"]]
  observed_peaks = gold.mean(1).max(1)
  trend = {
    "spearman_beta_bon_log_params": _spearman_or_nan(np.log(params), betas),
    "spearman_peak_gold_log_params": _spearman_or_nan(np.log(params), peaks),
    "spearman_observed_peak_log_params": _spearman_or_nan(np.log(params), observed_peaks),
    "spearman_alpha_bon_log_params": _spearman_or_nan(
      np.log(params), [f["alpha"] for f in fits["bon"]]
    ),
  }
  check(
    "beta_bon_falls_with_size",
    trend["spearman_beta_bon_log_params"] <= -0.8,
    f"Spearman(beta_bon, log params) = {trend['spearman_beta_bon_log_params']:.2f} (need <= -0.8)",
  )
  check(
    "gold_peak_rises_with_size",
    trend["spearman_peak_gold_log_params"] >= 0.8,
    f"Spearman(fitted gold peak, log params) = "
    f"{trend['spearman_peak_gold_log_params']:.2f} (need >= 0.8); observed-maximum "
    f"version {trend['spearman_observed_peak_log_params']:.2f}",
  )

  rl = results.get("rl")
  if rl is not None:
    d_bon = np.sqrt(np.asarray(bon["kl"]))
    rl_gold, rl_kl = np.asarray(rl["gold"]), np.asarray(rl["kl"])
    verdicts, details = [], []
    for i, s in enumerate(sizes):
      bon_curve = gold[i].mean(0)
      rl_curve, rl_d = rl_gold[i].mean(0), np.sqrt(np.maximum(rl_kl[i], 0.0)).mean(0)
      target = 0.5 * min(bon_curve.max(), rl_curve.max())
      if target <= 0:
        verdicts.append(False)
        details.append(f"{s}: no positive gold to compare")
        continue
      db, dr = _first_reach(d_bon, bon_curve, target), _first_reach(rl_d, rl_curve, target)
      verdicts.append(dr > db)
      details.append(f"{s}: gold {target:.2f} at sqrt(KL) {db:.2f} (BoN) vs {dr:.2f} (RL)")
    trend["rl_vs_bon_sqrt_kl_at_half_peak"] = details
    check("rl_spends_more_kl_than_bon", all(verdicts), "; ".join(details))

  check("seeds", num_seeds >= 3, f"{num_seeds} seeds per proxy size (mean and band shown)")
  return checks, trend


def _colours(n: int):
  import matplotlib

  cmap = matplotlib.colormaps["viridis"]
  return [cmap(0.85 * i / max(n - 1, 1)) for i in range(n)]


def plot_figure1(results: dict[str, Any], fits: dict[str, Any], path: str) -> None:
  """Gao et al. Figure 1 layout: gold (solid), proxy (dashed), fits (thin) vs sqrt(KL)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = [("bon", "Best-of-n")] + ([("rl", "RL (PPO)")] if results.get("rl") else [])
  fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.6), squeeze=False)
  colours = _colours(len(results["proxies"]))
  for ax, (kind, title) in zip(axes[0], panels):
    data = results[kind]
    for i, p in enumerate(results["proxies"]):
      c = colours[i]
      gold, proxy = np.asarray(data["gold"][i]), np.asarray(data["proxy"][i])
      if kind == "bon":
        d = np.broadcast_to(np.sqrt(np.asarray(data["kl"])), gold.shape)
      else:
        d = np.sqrt(np.maximum(np.asarray(data["kl"][i]), 0.0))
      dm, gm, pm = d.mean(0), gold.mean(0), proxy.mean(0)  # seed means
      gs = gold.std(0, ddof=1) / math.sqrt(gold.shape[0]) if gold.shape[0] > 1 else 0 * gm
      ax.plot(dm, gm, "-", color=c, lw=2, label=f"{p['name']} ({p['num_params']:,} params)")
      ax.fill_between(dm, gm - gs, gm + gs, color=c, alpha=0.2, lw=0)
      ax.plot(dm, pm, "--", color=c, lw=1.3)
      fit = fits[kind][i]
      grid = np.linspace(0, dm.max(), 200)
      form = scaling.bon_reward if kind == "bon" else scaling.rl_reward
      ax.plot(
        grid, form(grid, alpha=fit["alpha"], beta=fit["beta"]), "-", color=c, lw=0.7, alpha=0.8
      )
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("sqrt(KL(pi || pi_init))  [nats^0.5]")
    ax.set_ylabel("reward (pi_init = 0)")
    ax.set_title(f"{title}: gold solid, proxy dashed, fit thin")
  axes[0][0].legend(fontsize=7, loc="upper left")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_coefficients(results: dict[str, Any], fits: dict[str, Any], path: str) -> None:
  """Fitted alpha, beta (95% CI) and gold peak against proxy parameter count."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  params = np.array([p["num_params"] for p in results["proxies"]], float)
  kinds = [k for k in ("bon", "rl") if fits.get(k)]
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
  for kind, marker in zip(kinds, ("o", "s")):
    for ax, name in zip(axes[:2], ("alpha", "beta")):
      values = np.array([f[name] for f in fits[kind]])
      ci = np.array([f[f"{name}_ci"] for f in fits[kind]])
      ax.errorbar(
        params,
        values,
        yerr=[values - ci[:, 0], ci[:, 1] - values],
        fmt=marker + "-",
        capsize=3,
        label=f"{name}_{kind}",
      )
    peaks = np.array([f["peak_gold"] for f in fits[kind]], float)
    finite = np.isfinite(peaks)
    axes[2].plot(params[finite], peaks[finite], marker + "-", label=f"fitted peak ({kind})")
  observed = np.asarray(results["bon"]["gold"]).mean(1).max(1)
  axes[2].plot(params, observed, "^:", label="observed max (BoN)")
  for ax, title in zip(axes, ("alpha", "beta", "gold peak")):
    ax.set_xscale("log")
    ax.set_xlabel("proxy RM parameters")
    ax.set_title(title)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_summary(results: dict[str, Any], path: str) -> None:
  """Markdown summary: proxies, fitted coefficients, trend statistics and checks."""
  fits, lines = results["fits"], []
  lines.append("# Reward over-optimisation study (synthetic world)\n")
  lines.append(
    "| proxy | params | held-out acc. | alpha_bon | beta_bon | R² bon | "
    "peak gold (bon fit) | alpha_RL | beta_RL | R² RL |"
  )
  lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for i, p in enumerate(results["proxies"]):
    b = fits["bon"][i]
    r = fits["rl"][i] if fits.get("rl") else None
    rl_cols = f"{r['alpha']:.3f} | {r['beta']:.3f} | {r['r_squared']:.3f}" if r else "– | – | –"
    lines.append(
      f"| {p['name']} | {p['num_params']:,} | "
      f"{np.mean(p['heldout_accuracy']):.3f} | {b['alpha']:.3f} | {b['beta']:.3f} | "
      f"{b['r_squared']:.3f} | {b['peak_gold']:.3f} | {rl_cols} |"
    )
  lines.append("\n## Trends across proxy size\n")
  for k, v in results["trend"].items():
    lines.append(f"- {k}: {v if isinstance(v, list) else f'{v:.3f}'}")
  for entry in results.get("data_fits", []):
    lines.append(
      f"- {entry['num_comparisons']} comparisons: beta_bon "
      + ", ".join(f"{p['name']} {f['beta']:.3f}" for p, f in zip(results["proxies"], entry["fits"]))
    )
  lines.append("\n## Checks\n")
  for c in results["checks"]:
    lines.append(f"- **{'PASS' if c['passed'] else 'FAIL'}** {c['name']}: {c['detail']}")
  if "timing_this_invocation" in results:
    lines.append("\n## Wall-clock of this invocation (s; stages loaded from cache take ~1 s)\n")
    lines.append(", ".join(f"{k}: {v:.0f}" for k, v in results["timing_this_invocation"].items()))
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def analyse(results: dict[str, Any], workdir: str) -> dict[str, Any]:
  """Adds fits, trends and checks to ``results``; writes results.json, figures, summary.md."""
  results["fits"] = fit_curves(results)
  results["checks"], results["trend"] = run_checks(results, results["fits"])
  if results.get("data_sweep"):
    results["data_fits"] = fit_data_sweep(results)
    plot_data_sweep(results, os.path.join(workdir, "data_sizes.png"))
  plot_figure1(results, results["fits"], os.path.join(workdir, "figure1.png"))
  plot_coefficients(results, results["fits"], os.path.join(workdir, "coefficients.png"))
  write_summary(results, os.path.join(workdir, "summary.md"))
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1, default=_json_default)
  return results


def _json_default(x):
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  raise TypeError(f"not JSON serialisable: {type(x)}")
