"""RL side of the over-optimisation analysis: oracle fraction, KL-penalty sweep, KL efficiency.

Reads one analysis unit's ``rl`` (the contract's schema: ``arms[ARM][key]`` arrays
``[num_seeds, T]`` on held-out prompts, ``arm_info[ARM] = {'reward', 'kl_coef'}``) next to its
best-of-n curves. Every comparison interpolates curves in KL (``kl_exact``, seed means);
nothing is read off a grid point.
"""

from __future__ import annotations

import math

import numpy as np

from jaxrm.math import scaling

ORACLE_FRACTION_MIN = 0.7
EFFICIENCY_NS = (4, 16, 64)  # best-of-n levels at which RL's KL cost is compared


def first_reach(x: np.ndarray, y: np.ndarray, target: float) -> float:
  """Smallest x (linear interpolation along the curve in its order) where y reaches target."""
  x, y = np.asarray(x, float), np.asarray(y, float)
  hit = np.nonzero(y >= target)[0]
  if not hit.size:
    return math.inf
  j = int(hit[0])
  if j == 0:
    return float(x[0])
  t = (target - y[j - 1]) / (y[j] - y[j - 1])
  return float(x[j - 1] + t * (x[j] - x[j - 1]))


def value_at(x: np.ndarray, y: np.ndarray, at: float) -> float:
  """y interpolated at x = at on a curve sorted by x (NaN outside the measured range)."""
  x, y = np.asarray(x, float), np.asarray(y, float)
  order = np.argsort(x, kind="stable")
  x, y = x[order], y[order]
  if not x[0] <= at <= x[-1]:
    return math.nan
  return float(np.interp(at, x, y))


def _curve(arm: dict, key: str) -> tuple[np.ndarray, np.ndarray]:
  """(seed-mean kl_exact with pi_init's 0 prepended, seed-mean key with 0 prepended)."""
  kl = np.concatenate([[0.0], np.maximum(arm["kl_exact"], 0.0).mean(0)])
  return kl, np.concatenate([[0.0], arm[key].mean(0)])


def oracle_fraction(unit: dict) -> tuple[bool, str, dict]:
  """RL-on-gold / best-of-n-on-gold at the KL where best-of-n-on-gold reaches half its max."""
  arm = unit["rl"]["arms"].get("gold")
  if arm is None:
    return False, "no 'gold' arm in the RL output: not measured", {}
  bon_kl, bon_gold = unit["kl"], unit["oracle_gold"]
  half = 0.5 * float(bon_gold.max())
  kl_star = first_reach(bon_kl, bon_gold, half)
  rl_kl, rl_gold = _curve(arm, "gold")
  rl_at = value_at(rl_kl, rl_gold, kl_star)
  frac = rl_at / half if np.isfinite(rl_at) and half > 0 else math.nan
  stats = {"kl": kl_star, "bon_oracle_gold": half, "rl_gold": rl_at, "fraction": frac}
  detail = (
    f"at KL {kl_star:.2f} (best-of-n-on-gold reaches half its max, {half:.2f}) RL-on-gold "
    f"reaches {rl_at:.2f}: fraction {frac:.2f} (need >= {ORACLE_FRACTION_MIN})"
  )
  if not np.isfinite(rl_at):
    detail += f"; RL's KL stops at {rl_kl.max():.2f}"
  return bool(np.isfinite(frac) and frac >= ORACLE_FRACTION_MIN), detail, stats


def penalty_sweep(unit: dict) -> tuple[bool, str, list[dict]]:
  """Does each KL-penalised arm's final point lie on its unpenalised arm's gold-vs-KL curve?

  "On the curve": the penalised final gold minus the unpenalised curve's gold at the same KL
  (interpolated) lies within its 95% t-interval half-width ``t_{0.975, seeds-1} * s.e.``
  (s.e. from the penalised arm's seed spread; the unpenalised curve's own noise is not added).
  """
  rl = unit["rl"]
  rows = []
  for name, info in rl["arm_info"].items():
    if not info.get("kl_coef"):
      continue
    base = next(
      (a for a, i in rl["arm_info"].items() if i["reward"] == info["reward"] and not i["kl_coef"]),
      None,
    )
    if base is None:
      continue
    arm = rl["arms"][name]
    kl_final = float(np.maximum(arm["kl_exact"][:, -1], 0).mean())
    gold_final = arm["gold"][:, -1]
    se = gold_final.std(ddof=1) / math.sqrt(len(gold_final)) if len(gold_final) > 1 else math.inf
    half_width = (
      scaling.student_t_quantile(0.975, len(gold_final) - 1) * se if len(gold_final) > 1 else se
    )
    on = value_at(*_curve(rl["arms"][base], "gold"), kl_final)
    diff = float(gold_final.mean() - on) if np.isfinite(on) else math.nan
    rows.append(
      {
        "arm": name,
        "kl_coef": info["kl_coef"],
        "final_kl": kl_final,
        "final_gold": float(gold_final.mean()),
        "unpenalised_gold_at_kl": on,
        "difference": diff,
        "se": float(se),
        "half_width_95": float(half_width),
        "on_curve": bool(np.isfinite(diff) and abs(diff) <= half_width),
      }
    )
  if not rows:
    return False, "no KL-penalty arms in the RL output: not measured", rows
  detail = "; ".join(
    f"{r['arm']}: final KL {r['final_kl']:.2f}, gold {r['final_gold']:.2f} vs "
    f"{r['unpenalised_gold_at_kl']:.2f} unpenalised (diff {r['difference']:+.2f}, 95% "
    f"half-width {r['half_width_95']:.2f})"
    for r in rows
  )
  return all(r["on_curve"] for r in rows), detail, rows


def kl_efficiency(unit: dict) -> tuple[bool, str, list[dict]]:
  """KL RL needs to reach the gold (and proxy) level best-of-n reaches at n, / best-of-n's KL.

  For n in ``EFFICIENCY_NS`` up to best-of-n's observed gold peak (interpolated on RL's
  seed-mean curve; inf where RL never reaches the level). Passes when every finite gold ratio
  exceeds 1.
  """
  rows = []
  for i, name in enumerate(unit["names"]):
    arm = unit["rl"]["arms"].get(name)
    if arm is None:
      continue
    peak_n = unit["ns"][int(np.argmax(unit["gold"][i]))]
    for n in EFFICIENCY_NS:
      j = np.nonzero(unit["ns"] == n)[0]
      # Past best-of-n's observed gold peak its gold level is one RL passes on the way up:
      # only levels on best-of-n's rising side are compared.
      if not j.size or n > peak_n:
        continue
      kl_b = float(unit["kl"][j[0]])
      row = {"proxy": name, "n": n, "bon_kl": kl_b}
      for key in ("gold", "proxy"):
        level = float(unit[key][i, j[0]])
        kl_r = first_reach(*_curve(arm, key), level) if level > 0 else math.nan
        row[f"{key}_level"] = level
        row[f"rl_kl_{key}"] = kl_r
        row[f"ratio_{key}"] = kl_r / kl_b if kl_b > 0 else math.nan
      rows.append(row)
  if not rows:
    return False, "no proxy arms in the RL output", rows
  gold_ratios = [r["ratio_gold"] for r in rows if np.isfinite(r["ratio_gold"])]
  detail = "; ".join(
    f"{r['proxy']} n={r['n']}: gold x{r['ratio_gold']:.2f}, proxy x{r['ratio_proxy']:.2f}"
    for r in rows
  )
  detail += " (x = KL_RL / KL_bon; inf: RL never reaches the level in its KL range)"
  return bool(gold_ratios) and min(gold_ratios) > 1, detail, rows


def gold_at_equal_proxy(unit: dict) -> list[dict]:
  """Gold of best-of-n and RL where each first reaches the same proxy score."""
  rows = []
  for i, name in enumerate(unit["names"]):
    arm = unit["rl"]["arms"].get(name)
    if arm is None:
      continue
    _, rl_proxy = _curve(arm, "proxy")
    _, rl_gold = _curve(arm, "gold")
    top = min(float(unit["proxy"][i].max()), float(rl_proxy.max()))
    for q in (0.25, 0.5, 0.75):
      level = q * top
      rows.append(
        {
          "proxy": name,
          "proxy_level": level,
          "bon_gold": value_at(unit["proxy"][i], unit["gold"][i], level),
          "rl_gold": _first_value(rl_proxy, rl_gold, level),
        }
      )
  return rows


def _first_value(x, y, level):
  """y where the curve x (in training order) first reaches level (interpolated)."""
  k = first_reach(np.arange(len(x)), x, level)
  return float(np.interp(k, np.arange(len(y)), y)) if np.isfinite(k) else math.nan


def advance_prediction_rl(unit: dict, tolerance: float) -> tuple[bool, str, list[dict]]:
  """R_RL fitted on the first third of the evaluations predicts the rest (error / peak)."""
  rows = []
  for name in unit["names"]:
    arm = unit["rl"]["arms"].get(name)
    if arm is None:
      continue
    d = np.sqrt(np.maximum(arm["kl_exact"], 0)).mean(0)
    g = arm["gold"].mean(0)
    k = len(d) // 3
    if k < 2 or len(d) - k < 1:
      rows.append({"proxy": name, "error": math.nan})
      continue
    fit = scaling.fit_rl(d[:k], g[:k])
    err = np.abs(fit.predict(d[k:]) - g[k:]).max() / max(abs(g.max()), 1e-12)
    rows.append({"proxy": name, "error": float(err)})
  errs = [r["error"] for r in rows]
  detail = f"R_RL fitted on the first third, error / observed peak (need <= {tolerance}): " + (
    ", ".join(f"{r['proxy']}: {r['error']:.2f}" for r in rows)
  )
  return bool(errs) and all(np.isfinite(e) and e <= tolerance for e in errs), detail, rows


def rl_checks(unit: dict, *, tolerance: float) -> tuple[dict[str, tuple[bool, str]], dict]:
  """Every RL check on one unit."""
  out, stats = {}, {}
  passed, detail, stats["oracle_fraction"] = oracle_fraction(unit)
  out["rl_oracle_fraction"] = (passed, detail)
  passed, detail, stats["penalty_sweep"] = penalty_sweep(unit)
  out["kl_penalty_acts_like_early_stopping"] = (passed, detail)
  passed, detail, stats["kl_efficiency"] = kl_efficiency(unit)
  out["rl_spends_more_kl_than_bon"] = (passed, detail)
  passed, detail, stats["advance_prediction_rl"] = advance_prediction_rl(unit, tolerance)
  out["rl_advance_prediction"] = (passed, detail)
  stats["gold_at_equal_proxy"] = gold_at_equal_proxy(unit)
  if unit["rl"].get("estimate"):
    stats["note"] = "old-schema RL output: kl_exact is the k1 estimate on training rollouts"
  return out, stats
