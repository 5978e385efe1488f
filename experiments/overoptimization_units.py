"""The over-optimisation study's measurements as analysis units: one per world, and pooled.

A unit holds one world's curves (or their mean over worlds: the pooled unit) as NumPy arrays,
with bootstrap replicates that combine every source of uncertainty:

* proxy seeds: resampled here, with replacement, independently in every replicate;
* prompts and samples within prompt: resampled in the best-of-n stage (nested, the estimator
  recomputed on each resample: ``experiments.overoptimization_bon.bootstrap_bon``);
* the replicates are re-centred on the estimate (bias-corrected; see :func:`world_unit`).

The pooled unit averages the worlds' curves; its replicate b averages the worlds' replicates b
(the worlds are independent). RL curves are normalised to the second edition's schema
(``arms``/``arm_info``); an old-schema RL output (``kl``, ``gold``, ``proxy`` per size) is
read as proxy arms whose ``kl_exact`` is the k1 estimate (``rl_kl_is_estimate`` says so).
"""

from __future__ import annotations

from typing import Any

import numpy as np

RL_KEYS = ("kl_exact", "kl_k1", "gold", "gold_rest", "gold_feature", "proxy")


def _arr(x) -> np.ndarray:
  return np.asarray(x, np.float64)


def seed_resampled(boot: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """``boot [S, seeds, B, n]`` -> ``[S, B, n]``: replicate b averages a resample of the seeds."""
  num_sizes, seeds, num_boot, _ = boot.shape
  idx = rng.integers(0, seeds, size=(num_sizes, num_boot, seeds))
  s = np.arange(num_sizes)[:, None, None]
  b = np.arange(num_boot)[None, :, None]
  return boot[s, idx, b].mean(axis=2)


def normalise_rl(rl: dict[str, Any] | None, names: list[str], kl_coef: float) -> dict | None:
  """RL output in the contract's schema: ``step``, ``arms``, ``arm_info`` (NumPy arrays)."""
  if not rl:
    return None
  if "arms" in rl:
    arms = {a: {k: _arr(v) for k, v in d.items()} for a, d in rl["arms"].items()}
    return {"step": _arr(rl["step"]), "arms": arms, "arm_info": rl["arm_info"], "estimate": False}
  arms, info = {}, {}
  for i, name in enumerate(names):
    arms[name] = {"kl_exact": _arr(rl["kl"][i]), "kl_k1": _arr(rl["kl"][i])}
    arms[name].update(gold=_arr(rl["gold"][i]), proxy=_arr(rl["proxy"][i]))
    info[name] = {"reward": name, "kl_coef": kl_coef}
  return {"step": _arr(rl["step"]), "arms": arms, "arm_info": info, "estimate": True}


def world_unit(world: dict[str, Any], kl_coef: float, rng: np.random.Generator) -> dict:
  """One world's arrays: seed-mean curves, bootstrap replicates, pi_beta curves and RL."""
  bon = {k: _arr(v) for k, v in world["bon"].items()}
  names = [p["name"] for p in world["proxies"]]
  unit = {
    "names": names,
    "params": _arr([p["num_params"] for p in world["proxies"]]),
    "accuracy": _arr([np.mean(p["heldout_accuracy"]) for p in world["proxies"]]),
    "ns": bon["ns"],
    "kl": bon["kl"],
    "ess": bon["ess"],
    "num_seeds": bon["gold"].shape[1],
    "seed_gold": bon["gold"],  # [S, seeds, n]
  }
  # Resampling samples with replacement leaves fewer distinct samples, which biases a
  # best-of-n estimate downwards at large n (an order statistic: the bootstrap's known failure
  # for extremes; measured in the smoke run as bands lying below the oracle's estimate). The
  # replicates are therefore shifted by the bootstrap's own bias (mean replicate minus the
  # estimate): the bands keep the bootstrap's spread, centred on the estimate.
  boot = seed_resampled(bon["boot_gold"], rng)  # [S, B, n]
  unit["boot"] = boot - boot.mean(axis=1, keepdims=True) + bon["gold"].mean(axis=1)[:, None]
  boot = bon["boot_oracle"]  # [B, n]
  unit["boot_oracle"] = boot - boot.mean(axis=0) + bon["oracle_gold"]
  for k in ("gold", "proxy", "gold_rest", "gold_feature"):
    unit[k] = bon[k].mean(axis=1)  # [S, n]: the seed mean
  for k in ("gold", "gold_rest", "gold_feature"):
    unit[f"oracle_{k}"] = bon[f"oracle_{k}"]
    unit[f"oracle_tilted_{k}"] = bon[f"oracle_tilted_{k}"]
    unit[f"tilted_{k}"] = bon[f"tilted_{k}"].mean(axis=1)  # [S, T]
  unit["tilted_proxy"] = bon["tilted_proxy"].mean(axis=1)
  unit["tilted_kl"] = bon["tilted_kl"].mean(axis=1)
  unit["tilted_ess"] = bon["tilted_ess"].min(axis=1)  # the worst seed
  unit["oracle_tilted_kl"] = bon["oracle_tilted_kl"]
  unit["oracle_tilted_ess"] = bon["oracle_tilted_ess"]
  unit["rl"] = normalise_rl(world.get("rl"), names, kl_coef)
  return unit


_STATIC = ("names", "params", "ns", "kl", "num_seeds")


def pooled_unit(units: list[dict]) -> dict:
  """The mean over worlds of every curve (replicate by replicate for the bootstrap)."""
  pooled = {k: units[0][k] for k in _STATIC}
  for k in units[0]:
    if k in _STATIC or k == "rl":
      continue
    values = [u[k] for u in units]
    pooled[k] = np.min(values, axis=0) if "ess" in k else np.mean(values, axis=0)
  pooled["ess"] = np.min([u["ess"] for u in units], axis=0)
  rls = [u["rl"] for u in units if u["rl"] is not None]
  pooled["rl"] = None
  if len(rls) == len(units) and rls:
    arms = {}
    for a in rls[0]["arms"]:
      keys = [k for k in rls[0]["arms"][a] if all(k in r["arms"].get(a, {}) for r in rls)]
      arms[a] = {k: np.mean([r["arms"][a][k] for r in rls], axis=0) for k in keys}
    pooled["rl"] = dict(rls[0], arms=arms)
  return pooled
