"""Analysis of the DPL study: the paper's hypotheses as pre-registered PASS/FAIL checks.

Every statistic below, its threshold and its interval were fixed in this file before the
default run was made (none was changed after seeing a result). Each check is evaluated per
world and pooled (the mean of the per-world statistics); the verdict is the pooled one. Its
95% interval is the 2.5-97.5 percentile of a bootstrap that resamples model seeds and, for the
diagnostics, the held-out responses, for best-of-n the prompts and the samples within each
prompt (``experiments.overoptimization_bon.bootstrap_bon``); pooled replicates average the
worlds' replicates.

The checks (``kind`` is each DPL head, mean-variance and categorical):

* ``variance_tracks_disagreement[kind]`` (the paper: DPL "identifies hidden context"): the
  Spearman correlation, over held-out responses, of the predicted standard deviation with the
  true hidden-context standard deviation ``sqrt(p (1 - p)) |g1 - g2|``; mean over seeds.
  PASS: interval above 0.
* ``r2_lower_with_hidden_context[kind]`` (the paper's r^2 is lower for the model trained on
  data with hidden context): ``r^2(hidden labels) - r^2(control labels)``, the control being
  the same pairs labelled by group 1 alone; mean over seeds. PASS: interval below 0.
* ``risk_averse_raises_worst_group_gold[kind]`` (the paper: optimising a lower quantile
  protects against what some annotators reject, e.g. jailbreaks): best-of-n at n =
  ``bon_max_n``; for each seed the worse of the two groups' gold, quantile objective minus mean
  objective; mean over seeds. PASS: interval above 0.
* ``risk_averse_improves_both_groups[kind]`` (the risk-averse objective still optimises: the
  paper keeps helpfulness): best-of-n at ``bon_max_n`` with the quantile objective, each
  group's gold above pi_init's (0); mean over seeds. PASS: both intervals above 0.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from experiments import dpl_lib
from jaxrm.data import hidden_context
from jaxrm.math.metrics import spearman

BOOT_SEED = 0  # the diagnostics bootstrap's generator (the best-of-n one is the stage's)


def _ci(samples) -> list[float]:
  s = np.asarray(samples, float)
  s = s[np.isfinite(s)]
  return [float(np.percentile(s, 2.5)), float(np.percentile(s, 97.5))] if s.size else [math.nan] * 2


def _r2(mean: np.ndarray, std: np.ndarray) -> float:
  v = np.var(mean)
  return float(v / (v + np.mean(np.square(std))))


def diagnostics_stats(cfg: dpl_lib.DPLConfig, world: dict, num_boot: int) -> dict[str, Any]:
  """Per arm and seed: r^2, Spearman(std, true std), accuracy; bootstrap replicates."""
  diag = world["diagnostics"]
  golds = diag["golds"]
  true_std = np.asarray(
    hidden_context.utility_moments(golds, group2_prob=cfg.hidden.group2_prob)["std"], np.float64
  )
  n = golds.shape[0]
  half = n // 2  # responses [:half] were chosen, [half:] rejected, pair by pair
  rng = np.random.default_rng(BOOT_SEED + int(world["world_seed"]))
  idx = rng.integers(0, n, size=(num_boot, n))
  seed_idx = rng.integers(0, cfg.num_seeds, size=(num_boot, cfg.num_seeds))
  out = {}
  for name, r in diag["arms"].items():
    mean, std = np.asarray(r["mean"], np.float64), np.asarray(r["std"], np.float64)
    stats = {
      "r2": [_r2(m, s) for m, s in zip(mean, std)],
      "mean_std": std.mean(axis=1).tolist(),
      "accuracy_group1": [], "accuracy_group2": [], "accuracy_expected_utility": [],
    }  # fmt: skip
    util = (1 - cfg.hidden.group2_prob) * golds[:, 0] + cfg.hidden.group2_prob * golds[:, 1]
    for m in mean:
      right = lambda g, m=m: float(np.mean((m[:half] > m[half:]) == (g[:half] > g[half:])))
      stats["accuracy_group1"].append(right(golds[:, 0]))
      stats["accuracy_group2"].append(right(golds[:, 1]))
      stats["accuracy_expected_utility"].append(right(util))
    if not name.startswith("bradley_terry"):
      stats["spearman_std"] = [spearman(s, true_std) for s in std]
      boot_sp = np.array([[spearman(s[i], true_std[i]) for s in std] for i in idx])  # [B, seeds]
      boot_r2 = np.array([[_r2(m[i], s[i]) for m, s in zip(mean, std)] for i in idx])
      stats["boot_spearman_std"] = np.take_along_axis(boot_sp, seed_idx, 1).mean(1)
      stats["boot_r2"] = np.take_along_axis(boot_r2, seed_idx, 1).mean(1)
      # Mean predicted std by quartile of the true hidden-context std (ties by rank order).
      order = np.argsort(true_std, kind="stable")
      q = np.array_split(order, 4)
      stats["std_by_true_std_quartile"] = [[float(s[j].mean()) for j in q] for s in std]
      stats["true_std_quartile_means"] = [float(true_std[j].mean()) for j in q]
    out[name] = stats
  return out


def bon_stats(cfg: dpl_lib.DPLConfig, world: dict) -> dict[str, Any]:
  """Best-of-n at ``bon_max_n``: each selector's group golds and worst-group gold (+ boot)."""
  bon = world["bon"]
  names = dpl_lib.selectors(cfg)
  gold, boot = np.asarray(bon["gold"], np.float64), np.asarray(bon["boot"], np.float64)
  rng = np.random.default_rng(BOOT_SEED + 100 + int(world["world_seed"]))
  nb = boot.shape[3]
  seed_idx = rng.integers(0, cfg.num_seeds, size=(nb, cfg.num_seeds))
  out = {}
  for i, name in enumerate(names):
    last = boot[i, :, :, :, -1]  # [seeds, 2, B]
    resampled = np.stack([last[seed_idx[b], :, b] for b in range(nb)])  # [B, seeds, 2]
    # [B, 2, n_values]: each replicate's seed-mean curves (resampled seeds, prompts, samples)
    boot_curves = np.stack([boot[i][seed_idx[b], :, b].mean(0) for b in range(nb)])
    out[name] = {
      "gold_at_max_n": gold[i, :, :, -1].mean(0).tolist(),  # [2]: per group, seed mean
      "worst_group_at_max_n": float(gold[i, :, :, -1].min(axis=1).mean()),
      "boot_groups": resampled.mean(1),  # [B, 2]
      "boot_worst": resampled.min(axis=2).mean(1),  # [B]
      "curve_mean": gold[i].mean(0).tolist(),  # [2, n_values]
      "curve_worst": gold[i].min(axis=1).mean(0).tolist(),  # [n_values]
      "curve_band": np.percentile(boot_curves, [2.5, 97.5], axis=0).tolist(),  # [2, 2, nv]
    }
  return out


def _check(name, hypothesis, per_world, pooled_value, pooled_boot, passed_fn, detail_fmt):
  ci = _ci(pooled_boot)
  return {
    "name": name,
    "hypothesis": hypothesis,
    "value": pooled_value,
    "ci95": ci,
    "passed": bool(passed_fn(ci)),
    "per_world": per_world,
    "detail": detail_fmt.format(v=pooled_value, lo=ci[0], hi=ci[1]),
  }


def checks(cfg: dpl_lib.DPLConfig, worlds: list[dict]) -> list[dict[str, Any]]:
  """The pre-registered checks (module docstring), per world and pooled."""
  out = []

  def per_world_and_pooled(values, boots, passed_fn):
    per = {}
    for w, v, b in zip(worlds, values, boots):
      per[f"world{w['world_seed']}"] = {
        "value": float(v),
        "ci95": _ci(b),
        "passed": bool(passed_fn(_ci(b))),
      }
    m = min(len(b) for b in boots)
    return per, float(np.mean(values)), np.mean([np.asarray(b)[:m] for b in boots], axis=0)

  above = lambda ci: ci[0] > 0
  below = lambda ci: ci[1] < 0
  for kind in dpl_lib.DPL_KINDS:
    arm = f"{kind}/hidden"
    vals = [np.mean(w["stats"]["diagnostics"][arm]["spearman_std"]) for w in worlds]
    boots = [w["stats"]["diagnostics"][arm]["boot_spearman_std"] for w in worlds]
    per, v, b = per_world_and_pooled(vals, boots, above)
    out.append(_check(
      f"variance_tracks_disagreement[{kind}]",
      "DPL's predicted std rises with the annotators' disagreement (Spearman > 0)",
      per, v, b, above, "Spearman(pred std, true hidden-context std) {v:.3f} [{lo:.3f}, {hi:.3f}]",
    ))  # fmt: skip
    if cfg.control:
      ctrl = f"{kind}/control"
      vals, boots = [], []
      for w in worlds:
        d = w["stats"]["diagnostics"]
        vals.append(np.mean(d[arm]["r2"]) - np.mean(d[ctrl]["r2"]))
        boots.append(np.asarray(d[arm]["boot_r2"]) - np.asarray(d[ctrl]["boot_r2"]))
      per, v, b = per_world_and_pooled(vals, boots, below)
      out.append(_check(
        f"r2_lower_with_hidden_context[{kind}]",
        "r^2 is lower for the model trained with hidden context than without",
        per, v, b, below, "r^2(hidden) - r^2(control) {v:.3f} [{lo:.3f}, {hi:.3f}]",
      ))  # fmt: skip
    q, m = f"{kind}/quantile", f"{kind}/mean"
    vals = [w["stats"]["bon"][q]["worst_group_at_max_n"] - w["stats"]["bon"][m]["worst_group_at_max_n"] for w in worlds]  # fmt: skip
    boots = [w["stats"]["bon"][q]["boot_worst"] - w["stats"]["bon"][m]["boot_worst"] for w in worlds]  # fmt: skip
    per, v, b = per_world_and_pooled(vals, boots, above)
    out.append(_check(
      f"risk_averse_raises_worst_group_gold[{kind}]",
      f"best-of-{cfg.bon_max_n} on the {cfg.alpha:g}-quantile gives the worse-off group more gold "
      "than on the mean",
      per, v, b, above, "worst-group gold, quantile - mean: {v:.3f} [{lo:.3f}, {hi:.3f}]",
    ))  # fmt: skip
    for g in range(2):
      vals = [w["stats"]["bon"][q]["gold_at_max_n"][g] for w in worlds]
      boots = [w["stats"]["bon"][q]["boot_groups"][:, g] for w in worlds]
      per, v, b = per_world_and_pooled(vals, boots, above)
      out.append(_check(
        f"risk_averse_improves_group{g + 1}[{kind}]",
        f"best-of-{cfg.bon_max_n} on the quantile raises group {g + 1}'s gold above pi_init's",
        per, v, b, above, f"group {g + 1} gold " + "{v:.3f} [{lo:.3f}, {hi:.3f}]",
      ))  # fmt: skip
  return out


def _jsonable(tree):
  if isinstance(tree, dict):
    return {k: _jsonable(v) for k, v in tree.items() if not k.startswith("boot")}
  if isinstance(tree, (list, tuple)):
    return [_jsonable(v) for v in tree]
  if isinstance(tree, (str, bool)) or tree is None:
    return tree
  if isinstance(tree, (int, float, np.floating, np.integer)):
    return float(tree) if isinstance(tree, (float, np.floating)) else int(tree)
  return np.asarray(tree).tolist()


def analyse(cfg: dpl_lib.DPLConfig, results: dict[str, Any]) -> dict[str, Any]:
  """Adds ``stats`` to every world, the ``checks``; returns the JSON-able results."""
  worlds = results["worlds"]
  for w in worlds:
    w["stats"] = {
      "diagnostics": diagnostics_stats(cfg, w, cfg.bon_bootstrap),
      "bon": bon_stats(cfg, w),
    }
  results["checks"] = checks(cfg, worlds)
  results["smoke_run"] = bool(cfg.smoke)
  return results


def to_json(results: dict[str, Any]) -> dict[str, Any]:
  """The results without the raw per-response and bootstrap arrays (``results.json``)."""
  out = {k: v for k, v in results.items() if k != "worlds"}
  out["worlds"] = []
  for w in results["worlds"]:
    bon = {k: w["bon"][k] for k in ("ns", "kl", "oracle")}
    out["worlds"].append(
      _jsonable(
        {
          "world_seed": w["world_seed"],
          "group2_label_share": w["group2_label_share"],
          "training": w["training"],
          "bon": bon,
          "stats": w["stats"],
        }
      )
    )
  return _jsonable(out)
