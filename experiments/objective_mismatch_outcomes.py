"""Outcome stages of the objective-mismatch study: evaluations, best-of-n, PPO; the driver.

Continues :mod:`experiments.objective_mismatch_lib` (config, world, evaluation sets, proxy
population): every evaluation and best-of-n outcome of every proxy (cached per world and size
in ``evals_<size>.json``), PPO on gold and on a stratified subset (``rl/<name>.npz``), and
:func:`run_study`, which runs (or resumes) every stage of every world.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from experiments import overoptimization_lib as oo
from experiments import overoptimization_rl as oo_rl
from experiments.objective_mismatch_lib import (
  EVAL_FIELDS,
  RL_FIELDS,
  MismatchConfig,
  bon_ns,
  build_sets,
  overopt_config,
  train_population,
  validate,
)
from jaxrm.io import compile_cache, rundir
from jaxrm.math import best_of_n as bon_lib
from jaxrm.math import rm_evals


# ----------------------------------------------------------------------------- evaluations
@functools.cache
def _bon_fn(ns: tuple[int, ...]):
  """``(scores [m, P, N], gold [P, N]) -> (gold_n, proxy_n)``, each ``[m, P, len(ns)]``."""
  one = lambda p, g: bon_lib.best_of_n_expected_reward(p, g, np.asarray(ns))
  return jax.jit(jax.vmap(jax.vmap(one), in_axes=(0, None)))


def evaluate_size(cfg, data, sets, members, size: oo.ProxySize) -> list[dict[str, Any]]:
  """Every evaluation and best-of-n outcome of ``members`` (proxies of one architecture).

  Returns one dict per member: the evaluations (``acc``, ``acc_small_gap``,
  ``acc_large_gap``, ``log_loss``, ``ece``, ``bok_acc``, ``bok_regret``, ``ovm_acc``,
  ``spearman_all``, ``spearman_top``, ``kendall_top``, ``offdist_acc``), the best-of-n
  curves ``bon_gold`` / ``bon_proxy`` ``[len(ns)]`` (pi_init = 0), the gold of best-of-n at
  each outcome n per prompt (``bon_gold_prompts`` ``[P, len(outcome ns)]``, for standard
  errors) and ``bon_oracle`` (best-of-n on gold itself).
  """
  held = data.heldout
  nh = held.chosen.shape[0]
  tokens = np.concatenate(
    [
      np.asarray(held.chosen),
      np.asarray(held.rejected),
      sets["kset_tokens"],
      sets["off_tokens"],
      sets["bon_tokens"],
    ]
  )
  stacked = jax.tree.map(lambda *x: np.stack(x), *[m["params"] for m in members])
  model = oo.proxy_model(oo.StudyConfig(world=cfg.world), size)
  scores = oo.score_batches(model.apply, stacked, jnp.asarray(tokens), jnp.ones(tokens.shape, bool))
  e, o = sets["kset_gold"].shape[0], sets["off_gold"].shape[0]
  bounds = np.cumsum([nh, nh, e, o])
  rc, rr, ks, off, bon = np.split(scores, bounds, axis=1)
  gc, gr = np.asarray(held.gold_chosen), np.asarray(held.gold_rejected)
  kg = sets["kset_gold"].reshape(cfg.eval_prompts, cfg.eval_k)
  og = sets["off_gold"].reshape(2, -1)
  ovm_g = kg[:, : cfg.ovm_k]
  best = ovm_g.argmax(1)
  rest = np.array([[j for j in range(cfg.ovm_k) if j != b] for b in best])
  ns = bon_ns(cfg)
  bon_gold_np = sets["bon_gold"].reshape(cfg.bon_prompts, cfg.bon_samples)
  gold_n, proxy_n = _bon_fn(tuple(int(n) for n in ns))(
    jnp.asarray(bon.reshape(len(members), cfg.bon_prompts, cfg.bon_samples)),
    jnp.asarray(bon_gold_np),
  )
  gold_n, proxy_n = np.asarray(gold_n), np.asarray(proxy_n)  # [m, P, ns]
  oracle = np.asarray(_bon_fn(tuple(int(n) for n in ns))(bon_gold_np[None], bon_gold_np)[0][0])
  base = gold_n[:, :, :1]  # n = 1: the pi_init mean of each prompt
  out_idx = [int(np.searchsorted(ns, n)) for n in cfg.bon_outcome_ns]
  results = []
  for i in range(len(members)):
    gap = rm_evals.accuracy_by_gold_gap(rc[i], rr[i], gc, gr)
    bok = rm_evals.best_of_k_accuracy(ks[i].reshape(kg.shape), kg)
    ksi = ks[i].reshape(kg.shape)[:, : cfg.ovm_k]
    top = rm_evals.top_quantile_rank_correlation(
      ks[i], sets["kset_gold"], quantile=cfg.top_quantile
    )
    ofs = off[i].reshape(2, -1)
    results.append(
      {
        "acc": float(rm_evals.pairwise_accuracy(rc[i], rr[i])),
        "acc_small_gap": float(gap.small),
        "acc_large_gap": float(gap.large),
        "log_loss": float(rm_evals.log_loss(rc[i], rr[i])),
        "ece": float(rm_evals.expected_calibration_error(rc[i], rr[i]).ece),
        "bok_acc": float(bok.accuracy),
        "bok_regret": float(bok.regret),
        "ovm_acc": float(
          rm_evals.one_vs_many_accuracy(
            ksi[np.arange(len(best)), best], np.take_along_axis(ksi, rest, 1)
          )
        ),
        "spearman_all": rm_evals.top_quantile_rank_correlation(
          ks[i], sets["kset_gold"], quantile=0.0
        )["spearman"],
        "spearman_top": top["spearman"],
        "kendall_top": top["kendall_tau"],
        "offdist_acc": float(rm_evals.policy_pair_accuracy(ofs[0], ofs[1], og[0], og[1])),
        "bon_gold": (gold_n[i] - base[i]).mean(0).tolist(),
        "bon_proxy": (proxy_n[i] - proxy_n[i, :, :1]).mean(0).tolist(),
        "bon_gold_prompts": (gold_n[i][:, out_idx] - base[i]).tolist(),
        "bon_oracle": (oracle - oracle[:, :1]).mean(0).tolist(),
      }
    )
  return results


def evaluate_world(cfg, data, sets, proxies, world_seed: int, wdir: str) -> None:
  """Adds the evaluations and best-of-n outcomes to every proxy dict (cached per size)."""
  fp = cfg.fingerprint(*EVAL_FIELDS, world_seed=world_seed)
  for size in cfg.sizes:
    members = [p for p in proxies if p["size"] == size.name]
    path = os.path.join(wdir, f"evals_{size.name}.json")
    cached = None
    if os.path.exists(path):
      with open(path) as f:
        cached = json.load(f)
      if cached.get("fingerprint") != fp or len(cached["evals"]) != len(members):
        cached = None
    if cached is None:
      t = time.perf_counter()
      evals = evaluate_size(cfg, data, sets, members, size)
      rundir.write_json(path, {"fingerprint": fp, "evals": evals})
      logging.info(
        "world %d: evaluated %d proxies %s in %.0fs",
        world_seed,
        len(members),
        size.name,
        time.perf_counter() - t,
      )
    else:
      evals = cached["evals"]
    for m, ev in zip(members, evals):
      m.update(ev)


# ----------------------------------------------------------------------------- RL
def rl_subset(cfg: MismatchConfig, members: list[dict[str, Any]]) -> list[int]:
  """``rl_per_size`` members stratified by held-out accuracy: the median of each of
  ``rl_per_size`` equal strata of the members sorted by accuracy."""
  order = np.argsort([m["acc"] for m in members], kind="stable")
  k = min(cfg.rl_per_size, len(members))
  strata = np.array_split(order, k) if k else []
  return sorted(int(s[len(s) // 2]) for s in strata)


def run_rl_world(cfg, data, proxies, world_seed: int, wdir: str) -> dict[str, Any]:
  """PPO on gold and on the stratified subset of each size; adds ``rl`` curves to proxies.

  Returns the gold run's curves ``{'kl', 'gold', 'proxy'}`` (each ``[T]``).
  """
  fp = cfg.fingerprint(*RL_FIELDS, world_seed=world_seed)
  windows = cfg.rl_steps // cfg.rl_log_every

  def run(name, num, params, size, seed):
    shape = (num, windows)
    template = {k: jax.ShapeDtypeStruct(shape, jnp.float32) for k in ("kl", "gold", "proxy")}
    path = os.path.join(wdir, "rl", f"{name}.npz")
    loaded = oo.load_tree(path, template, fp)
    if loaded is not None:
      return {k: np.asarray(v) for k, v in loaded[0].items()}
    t = time.perf_counter()
    occ = overopt_config(cfg, world_seed, num)
    proxy = {"size": size, "params": params}
    curves = oo_rl.run_rl_one(  # the over-optimisation study's RL loop (training curves)
      occ, data, proxy, seed=seed, reward="gold" if size is None else "proxy"
    )
    if size is not None:  # re-centre the proxy so that pi_init scores 0
      curves["proxy"] = curves["proxy"] - oo_rl.proxy_offsets(occ, data, proxy)[:, None]
    curves = {k: np.asarray(v) for k, v in curves.items()}
    oo.save_tree(path, curves, {"fingerprint": fp, "seconds": time.perf_counter() - t})
    return curves

  gold = run("gold", 1, None, None, world_seed * 100 + 99)
  gold = {k: v[0] for k, v in gold.items()}
  for si, size in enumerate(cfg.sizes):
    if size not in {oo.ProxySize.parse(s) for s in cfg.rl_sizes}:
      continue
    members = [p for p in proxies if p["size"] == size.name]
    chosen = rl_subset(cfg, members)
    if not chosen:
      continue
    params = jax.tree.map(lambda *x: np.stack(x), *[members[i]["params"] for i in chosen])
    curves = run(size.name, len(chosen), params, size, world_seed * 100 + si)
    for j, i in enumerate(chosen):
      members[i]["rl"] = {k: v[j].tolist() for k, v in curves.items()}
  return gold


def run_study(cfg: MismatchConfig, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) every stage of every world; returns the raw measurements (JSON-able)."""
  validate(cfg)
  timing, proxies, oracles = {}, [], {}

  def timed(name, fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    timing[name] = timing.get(name, 0.0) + time.perf_counter() - t
    logging.info("stage %s: %.1fs", name, time.perf_counter() - t)
    return out

  with compile_cache.optimizations_off(cfg.fast_compiles):
    for w in cfg.world_seeds:
      wdir = os.path.join(workdir, f"world{w}")
      data = timed("world", oo.build_world, overopt_config(cfg, w), wdir)
      sets = timed("sets", build_sets, cfg, data, w, wdir)
      pop = timed("proxies", train_population, cfg, data, w, wdir)
      timed("evaluations", evaluate_world, cfg, data, sets, pop, w, wdir)
      oracle = {"bon": pop[0]["bon_oracle"]}
      if cfg.rl_per_size:
        oracle["rl"] = {
          k: v.tolist() for k, v in timed("rl", run_rl_world, cfg, data, pop, w, wdir).items()
        }
      oracles[str(w)] = oracle
      for p in pop:
        p.pop("params")
        p.pop("bon_oracle")
      proxies.extend(pop)
  ns = bon_ns(cfg)
  return {
    "config": rundir.config_to_json(cfg),
    "smoke_run": bool(cfg.smoke),
    "bon_ns": ns.tolist(),
    "bon_kl": np.asarray(bon_lib.kl_bon(ns)).tolist(),
    "rl_step": (np.arange(1, cfg.rl_steps // cfg.rl_log_every + 1) * cfg.rl_log_every).tolist()
    if cfg.rl_per_size
    else [],
    "oracle": oracles,
    "proxies": proxies,
    "timing_this_invocation": timing,
  }
