"""Stages of the objective-mismatch study (Lambert & Calandra 2023; Wen et al. 2024).

Does a reward model's evaluation score predict what optimising it buys? In each of several
synthetic worlds a population of proxy reward models is trained that differ the way a
practitioner's do (size, comparisons, label noise, training length, loss, seed); each proxy is
evaluated (:mod:`jaxrm.math.rm_evals`) and optimised against (best-of-n for every proxy, PPO
for a stratified subset), and the analysis (``objective_mismatch_analysis``) asks which
evaluation predicts the downstream gold.

The world, the proxy architectures, scoring, best-of-n and PPO are the over-optimisation
study's (:mod:`experiments.overoptimization_lib`), reused through its ``StudyConfig``
(:func:`overopt_config`). Each stage caches its result under ``<workdir>/world<seed>/``,
keyed by the fingerprint of every field it reads, so an interrupted run resumes from its
finished stages and a changed setting recomputes only what depends on it:

1. ``world.npz``: ``pi_init``, gold, the largest comparison set, held-out pairs
   (``overoptimization_lib.build_world``);
2. ``sets.npz``: the evaluation sets (best-of-K groups, off-distribution pairs from gold's
   best-of-n policy, best-of-n samples), all scored by gold;
3. ``proxies/<size>_<loss>_n<N>_e<noise>.npz``: one vmapped sweep per data setting, with a
   parameter snapshot at every ``train_steps`` entry (under- to over-fitted);
4. ``evals_<size>.json``: every evaluation and best-of-n outcome of every proxy of a size;
5. ``rl/<size>.npz`` and ``rl/gold.npz``: PPO curves of the subset, and of PPO on gold.

This module holds the config and stages 1-3; stages 4-5 and the driver ``run_study`` are in
:mod:`experiments.objective_mismatch_outcomes`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import overoptimization_lib as oo
from jaxrm.data import synthetic
from jaxrm.data.pairs import validate_fixed_length_rl, validate_world
from jaxrm.io import compile_cache, rundir
from jaxrm.math import preference
from jaxrm.steps import rl as rl_lib
from jaxrm.steps.rm_sweep import RewardModelSweep

LOSSES = ("bt", "bt_margin", "bt_center")
ProxySize = oo.ProxySize


def _default_ppo() -> rl_lib.RLConfig:
  return rl_lib.RLConfig(max_new_tokens=12, eos_id=None, num_epochs=2, num_minibatches=2)


@dataclasses.dataclass
class MismatchConfig:
  """All settings of the study; every stage's cache is keyed by the fields it reads.

  Returned by ``experiments/configs/objective_mismatch.py``; any field is overridable from the
  command line (``--config.world_seeds="(0,1,2)"``, ``--config.rl_per_size=3``).

  Attributes:
    world, world_seeds: the synthetic world and one world per seed.
    num_heldout, labels: held-out pairs (always noise-free deterministic gold labels) and the
      labelling of the training pairs (``'deterministic'`` or ``'bradley_terry'``).
    proxy_sizes: proxy architectures ``LAYERSxWIDTHxHEADS``.
    data_sizes: comparison counts; the largest must be a multiple of each (smaller sets are
      its prefixes, tiled to the largest so that every sweep has one shape).
    label_noises: rates of flipped training labels.
    losses: subset of ``('bt', 'bt_margin', 'bt_center')``: Bradley–Terry, with a constant
      ``loss_margin``, with the reward-centring penalty ``center_coef`` (Eisenstein et al.).
    bt_replicates: seeds of the plain BT proxies (the other losses train one).
    train_steps: ascending step counts; a proxy is kept at each (training-length factor).
    eval_prompts, eval_k: best-of-K evaluation: ``eval_k`` ``pi_init`` responses per prompt.
    ovm_k: one-vs-many uses the first ``ovm_k`` of each group (gold's best against the rest).
    top_quantile: rank correlation on responses above this gold quantile.
    offdist_pairs, offdist_n: off-distribution pairs: both sides drawn from gold's
      best-of-``offdist_n`` policy.
    bon_prompts, bon_samples, bon_outcome_ns: best-of-n outcomes (``bon_samples`` per prompt;
      gold reached at each ``n`` of ``bon_outcome_ns``; for best-of-n a fixed n is a fixed KL).
    rl_sizes: the proxy sizes optimised by PPO (each costs one PPO compilation per world,
      minutes on a busy 2-core CPU; PPO on gold always runs when ``rl_per_size > 0``).
    rl_per_size: proxies of each ``rl_sizes`` size optimised by PPO, stratified by held-out
      accuracy; 0 = no RL.
    rl_*, kl_coef, ppo: PPO settings (as the over-optimisation study's).
    rl_kl_budgets: KL (nats) at which RL gold is read off each run.
    bootstrap_resamples, near_equal_accuracy, primary_outcome: analysis settings (fixed
      before any result was seen).
    fast_compiles: compile every program with XLA's backend optimisations off
      (:func:`jaxrm.io.compile_cache.optimizations_off`; the quick variant); in every
      stage's key. ``rl_compile_opt_level`` (not -1) still sets the RL chunk's level.
    smoke: a smoke run (``--quick``): outputs say so and the checks are not evidence.
  """

  world: synthetic.WorldConfig = dataclasses.field(default_factory=synthetic.WorldConfig)
  world_seeds: tuple[int, ...] = (0, 1)
  num_heldout: int = 2000
  labels: str = "deterministic"
  proxy_sizes: tuple[str, ...] = ("1x4x1", "1x8x2", "1x16x2")
  data_sizes: tuple[int, ...] = (500, 2000)
  label_noises: tuple[float, ...] = (0.0, 0.25)
  losses: tuple[str, ...] = LOSSES
  bt_replicates: int = 2
  train_steps: tuple[int, ...] = (50, 250)
  rm_batch_size: int = 64
  rm_learning_rate: float = 1e-3
  loss_margin: float = 1.0
  center_coef: float = 0.1
  eval_prompts: int = 128
  eval_k: int = 16
  ovm_k: int = 4
  top_quantile: float = 0.9
  offdist_pairs: int = 256
  offdist_n: int = 16
  bon_prompts: int = 64
  bon_samples: int = 256
  bon_outcome_ns: tuple[int, ...] = (16, 128)
  rl_sizes: tuple[str, ...] = ("1x8x2",)
  rl_per_size: int = 6
  rl_steps: int = 150
  rl_batch_size: int = 64
  rl_learning_rate: float = 1e-5
  rl_log_every: int = 10
  kl_coef: float = 0.0
  rl_kl_budgets: tuple[float, ...] = (1.0, 3.0)
  ppo: rl_lib.RLConfig = dataclasses.field(default_factory=_default_ppo)
  rl_compile_opt_level: int = -1  # the RL chunk's XLA backend level (StudyConfig's field)
  fast_compiles: bool = False  # every program at XLA's -O0 (StudyConfig's field)
  bootstrap_resamples: int = 1000
  near_equal_accuracy: float = 0.01
  primary_outcome: str = "bon_gold_n128"
  smoke: bool = False

  @property
  def sizes(self) -> tuple[oo.ProxySize, ...]:
    return tuple(oo.ProxySize.parse(s) for s in self.proxy_sizes)

  def fingerprint(self, *fields: str, **extra: Any) -> str:
    return rundir.fingerprint({**{f: getattr(self, f) for f in fields}, **extra})


# The fields each stage reads (its cache key); a test checks that they cover every field.
WORLD_FIELDS = ("world", "num_heldout", "labels", "data_sizes", "fast_compiles")
SET_FIELDS = WORLD_FIELDS + (
  "eval_prompts",
  "eval_k",
  "offdist_pairs",
  "offdist_n",
  "bon_prompts",
  "bon_samples",
)
PROXY_FIELDS = WORLD_FIELDS + (
  "bt_replicates",
  "train_steps",
  "rm_batch_size",
  "rm_learning_rate",
  "loss_margin",
  "center_coef",
)
EVAL_FIELDS = (
  SET_FIELDS
  + PROXY_FIELDS
  + (
    "proxy_sizes",
    "label_noises",
    "losses",
    "ovm_k",
    "top_quantile",
    "bon_outcome_ns",
  )
)
RL_FIELDS = EVAL_FIELDS + (
  "rl_sizes",
  "rl_per_size",
  "rl_steps",
  "rl_batch_size",
  "rl_learning_rate",
  "rl_log_every",
  "kl_coef",
  "ppo",
  "rl_compile_opt_level",
)
# Read by the analysis only (recomputed on every run, never cached), and the selection of
# worlds (each world's caches live in their own directory, named by its seed).
ANALYSIS_FIELDS = (
  "rl_kl_budgets",
  "bootstrap_resamples",
  "near_equal_accuracy",
  "primary_outcome",
  "smoke",
  "world_seeds",
)


def overopt_config(cfg: MismatchConfig, world_seed: int, num_members: int = 1) -> oo.StudyConfig:
  """The over-optimisation study's config for one world (its stages are reused here)."""
  return oo.StudyConfig(
    world=cfg.world,
    world_seeds=(world_seed,),
    num_comparisons=max(cfg.data_sizes),
    num_heldout=cfg.num_heldout,
    labels=cfg.labels,
    label_noise=0.0,
    num_seeds=num_members,
    rm_batch_size=cfg.rm_batch_size,
    rm_learning_rate=cfg.rm_learning_rate,
    rl_steps=cfg.rl_steps,
    rl_batch_size=cfg.rl_batch_size,
    rl_learning_rate=cfg.rl_learning_rate,
    kl_coef=cfg.kl_coef,
    rl_log_every=cfg.rl_log_every,
    ppo=cfg.ppo,
    rl_compile_opt_level=cfg.rl_compile_opt_level,
    fast_compiles=cfg.fast_compiles,
  )


def bon_ns(cfg: MismatchConfig) -> np.ndarray:
  """The n grid of the best-of-n curves: half powers of two and every outcome n."""
  return np.unique(np.concatenate([oo.bon_ns(cfg.bon_samples), cfg.bon_outcome_ns]))


# ----------------------------------------------------------------------------- eval sets
def build_sets(cfg: MismatchConfig, data: oo.WorldData, world_seed: int, wdir: str) -> dict:
  """Samples (or loads) the evaluation and best-of-n sets of one world, scored by gold.

  Returns a dict of arrays: ``kset_tokens [P_e * K, s]``, ``kset_gold``; ``off_tokens
  [2 * pairs, s]`` (side a then side b), ``off_gold``; ``bon_tokens [P_b * N, s]``,
  ``bon_gold``. Every sequence has the world's fixed length and an all-True mask.
  """
  wc = cfg.world
  s = wc.seq_len
  e, off, b = (
    cfg.eval_prompts * cfg.eval_k,
    2 * cfg.offdist_pairs,
    cfg.bon_prompts * cfg.bon_samples,
  )
  shapes = {"kset": e, "off": off, "bon": b}
  template = {}
  for k, n in shapes.items():
    template[f"{k}_tokens"] = jax.ShapeDtypeStruct((n, s), jnp.int32)
    template[f"{k}_gold"] = jax.ShapeDtypeStruct((n,), jnp.float32)
  path, fp = os.path.join(wdir, "sets.npz"), cfg.fingerprint(*SET_FIELDS, world_seed=world_seed)
  loaded = oo.load_tree(path, template, fp)
  if loaded is not None:
    return {k: np.asarray(v) for k, v in loaded[0].items()}
  t = time.perf_counter()
  keys = jax.random.split(jax.random.key(world_seed * 7919 + 31), 6)
  sample = jax.jit(lambda p, k: synthetic.sample_responses(data.world, wc, p, k))
  gold_fn = jax.jit(lambda tk: synthetic.gold_reward(data.world, wc, tk, jnp.ones(tk.shape, bool)))

  def draw(num_prompts, per_prompt, kp, ks):
    prompts = jnp.repeat(synthetic.sample_prompts(wc, kp, num_prompts), per_prompt, axis=0)
    tok = jnp.concatenate(
      [
        sample(prompts[i : i + 8192], jax.random.fold_in(ks, i))[0]
        for i in range(0, prompts.shape[0], 8192)
      ]
    )
    return np.asarray(tok), np.concatenate(
      [np.asarray(gold_fn(tok[i : i + 8192])) for i in range(0, tok.shape[0], 8192)]
    )

  out = {}
  out["kset_tokens"], out["kset_gold"] = draw(cfg.eval_prompts, cfg.eval_k, keys[0], keys[1])
  tok, gold = draw(cfg.offdist_pairs, 2 * cfg.offdist_n, keys[2], keys[3])
  # Gold's best-of-offdist_n policy: the gold argmax of each group of offdist_n samples.
  groups = gold.reshape(cfg.offdist_pairs, 2, cfg.offdist_n)
  pick = groups.argmax(-1)  # [pairs, 2]
  flat = (np.arange(cfg.offdist_pairs)[:, None] * 2 + np.arange(2)[None]) * cfg.offdist_n + pick
  out["off_tokens"] = tok[flat.T.reshape(-1)]  # side a of every pair, then side b
  out["off_gold"] = gold[flat.T.reshape(-1)]
  out["bon_tokens"], out["bon_gold"] = draw(cfg.bon_prompts, cfg.bon_samples, keys[4], keys[5])
  oo.save_tree(path, out, {"fingerprint": fp, "seconds": time.perf_counter() - t})
  logging.info("evaluation sets of world %d built in %.1fs", world_seed, time.perf_counter() - t)
  return out


# ----------------------------------------------------------------------------- proxies
def _loss_fn(cfg: MismatchConfig, loss: str):
  if loss == "bt":
    return preference.bradley_terry_loss
  if loss == "bt_margin":
    return functools.partial(preference.bradley_terry_loss, margin=cfg.loss_margin)

  def centred(rc, rr, *, weights=None, labels=None):
    return preference.bradley_terry_loss(
      rc, rr, weights=weights, labels=labels
    ) + preference.reward_centering_penalty(rc, rr, coef=cfg.center_coef)

  return centred


@functools.cache
def _sweep(world: synthetic.WorldConfig, size: oo.ProxySize, loss_fn, batch: int, lr: float):
  """One sweep object per (architecture, loss): its compiled chunk is reused by every call."""
  model = oo.proxy_model(oo.StudyConfig(world=world), size)
  x = jnp.zeros((1, world.seq_len), jnp.int32)
  m = jnp.ones((1, world.seq_len), bool)
  return RewardModelSweep(
    init_fn=lambda k: model.init(k, x, m),
    apply_fn=model.apply,
    loss_fn=loss_fn,
    optimizer=optax.adamw(lr),
    batch_size=batch,
  )


@functools.cache
def _loss_fns(cfg_key: tuple) -> dict:
  margin, coef = cfg_key
  c = MismatchConfig(loss_margin=margin, center_coef=coef)
  return {loss: _loss_fn(c, loss) for loss in LOSSES}


def training_pairs(data: oo.WorldData, num: int, noise: float, key: jax.Array) -> dict:
  """The first ``num`` comparisons with a ``noise`` share of labels flipped, tiled so that
  every data setting has the largest set's shape (an epoch of the tiled set visits each of
  the ``num`` pairs ``max / num`` times)."""
  full = data.train.as_batch()
  total = full["chosen"].shape[0]
  pairs = {k: np.asarray(v[:num]) for k, v in full.items()}
  flip = np.asarray(jax.random.uniform(key, (num,)) < noise)
  c, r = pairs["chosen"].copy(), pairs["rejected"].copy()
  pairs["chosen"], pairs["rejected"] = np.where(flip[:, None], r, c), np.where(flip[:, None], c, r)
  return {
    k: jnp.asarray(np.tile(v, (total // num,) + (1,) * (v.ndim - 1))) for k, v in pairs.items()
  }


def population(cfg: MismatchConfig) -> list[dict[str, Any]]:
  """The training runs of one world: one per (size, loss, data size, label noise)."""
  runs = []
  for si, size in enumerate(cfg.sizes):
    for loss in cfg.losses:
      for ni, n in enumerate(cfg.data_sizes):
        for ei, noise in enumerate(cfg.label_noises):
          runs.append(
            {
              "size": size,
              "loss": loss,
              "num_comparisons": n,
              "label_noise": noise,
              "replicates": cfg.bt_replicates if loss == "bt" else 1,
              "index": (si, LOSSES.index(loss), ni, ei),
            }
          )
  return runs


def train_population(cfg, data, world_seed: int, wdir: str) -> list[dict[str, Any]]:
  """Trains (or loads) every proxy of one world.

  Returns:
    One dict per proxy (a run's replicate at one snapshot): its factors, ``params`` (host)
    and ``train_loss`` (mean of the last 10 steps before the snapshot).
  """
  fns = _loss_fns((cfg.loss_margin, cfg.center_coef))
  fp_base = cfg.fingerprint(*PROXY_FIELDS, world_seed=world_seed)
  proxies = []
  runs = population(cfg)
  t0 = time.perf_counter()
  for ri, run in enumerate(runs):
    size, loss, n, noise = run["size"], run["loss"], run["num_comparisons"], run["label_noise"]
    name = f"{size.name}_{loss}_n{n}_e{noise:g}"
    sweep = _sweep(cfg.world, size, fns[loss], cfg.rm_batch_size, cfg.rm_learning_rate)
    seed = (world_seed * 100003 + 7) * 1000 + sum(i * 10**k for k, i in enumerate(run["index"]))
    keys = jax.random.split(jax.random.key(seed), run["replicates"])
    template_params = jax.eval_shape(lambda s=sweep, k=keys: s.init(k).params)
    template = {f"s{st}": template_params for st in cfg.train_steps}
    path = os.path.join(wdir, "proxies", f"{name}.npz")
    fp = f"{fp_base}-{name}-{size.num_heads}"
    loaded = oo.load_tree(path, template, fp)
    if loaded is None:
      t = time.perf_counter()
      # The data of (world, n, noise) is shared by every size and loss: "same data" groups.
      data_key = jax.random.fold_in(
        jax.random.fold_in(jax.random.key(world_seed * 1000 + 17), n), int(round(noise * 1e6))
      )
      pairs = training_pairs(data, n, noise, data_key)
      states, done, snaps, losses = sweep.init(keys), 0, {}, {}
      # One chunk length that divides every snapshot's steps: one compiled program per sweep.
      chunk = functools.reduce(math.gcd, np.diff((0,) + tuple(cfg.train_steps)).tolist())
      for st in cfg.train_steps:
        states, m = sweep.train(
          states, pairs, num_steps=st - done, chunk=chunk, log_every_chunk=False
        )
        done = st
        snaps[f"s{st}"] = jax.tree.map(np.asarray, states.params)
        losses[f"s{st}"] = np.asarray(m["loss"][:, -10:].mean(axis=1)).tolist()
      meta = {"fingerprint": fp, "train_loss": losses, "seconds": time.perf_counter() - t}
      oo.save_tree(path, snaps, meta)
      params = snaps
    else:
      params, meta = loaded
    elapsed = time.perf_counter() - t0
    logging.info(
      "world %d proxies: run %d/%d %s (%d replicates)  %.0fs elapsed  ETA %.0fs",
      world_seed,
      ri + 1,
      len(runs),
      name,
      run["replicates"],
      elapsed,
      elapsed / (ri + 1) * (len(runs) - ri - 1),
    )
    for st in cfg.train_steps:
      for rep in range(run["replicates"]):
        proxies.append(
          {
            "world": world_seed,
            "size": size.name,
            "num_params": oo.param_count(template_params) // run["replicates"],
            "loss": loss,
            "num_comparisons": n,
            "label_noise": noise,
            "replicate": rep,
            "train_steps": st,
            "train_loss": meta["train_loss"][f"s{st}"][rep],
            "params": jax.tree.map(lambda x, r=rep: np.asarray(x[r]), params[f"s{st}"]),
          }
        )
  return proxies


# ----------------------------------------------------------------------------- driver
def validate(cfg: MismatchConfig) -> None:
  """Raises :class:`jaxrm.io.rundir.ConfigError` naming the offending field."""
  need = functools.partial(rundir.check, cfg)
  need(len(cfg.world_seeds) >= 1, "world_seeds", "must name at least one world seed")
  need(len(set(cfg.world_seeds)) == len(cfg.world_seeds), "world_seeds", "must be distinct")
  need(all(isinstance(s, int) and s >= 0 for s in cfg.world_seeds), "world_seeds", "must be >= 0")
  need(len(cfg.proxy_sizes) > 0, "proxy_sizes", "must name at least one architecture")
  names = [size.name for size in cfg.sizes]  # parses every size; a bad one is named
  need(
    len(set(names)) == len(names),
    "proxy_sizes",
    f"must have distinct layers x width: a proxy's name and caches are {names}",
  )
  need(rundir.is_int(cfg.rm_batch_size) and cfg.rm_batch_size >= 1, "rm_batch_size", "must be >= 1")
  need(cfg.rm_learning_rate > 0, "rm_learning_rate", "must be > 0")
  need(cfg.center_coef >= 0, "center_coef", "must be >= 0")
  need(len(cfg.data_sizes) > 0, "data_sizes", "must name at least one size")
  big = max(cfg.data_sizes)
  need(
    all(n >= cfg.rm_batch_size and big % n == 0 for n in cfg.data_sizes),
    "data_sizes",
    f"every size must be >= rm_batch_size={cfg.rm_batch_size} and divide the largest ({big})",
  )
  need(all(0.0 <= e <= 0.5 for e in cfg.label_noises), "label_noises", "must lie in [0, 0.5]")
  need(len(cfg.label_noises) > 0, "label_noises", "must name at least one rate")
  need(len(set(cfg.label_noises)) == len(cfg.label_noises), "label_noises", "must be distinct")
  need(
    len(cfg.losses) > 0 and all(x in LOSSES for x in cfg.losses),
    "losses",
    f"must be a non-empty subset of {LOSSES}",
  )
  need(cfg.bt_replicates >= 1, "bt_replicates", "must be >= 1")
  steps = tuple(cfg.train_steps)
  need(
    len(steps) > 0 and steps[0] >= 1 and all(a < b for a, b in zip(steps, steps[1:])),
    "train_steps",
    "must be ascending positive step counts",
  )
  need(
    cfg.labels in ("deterministic", "bradley_terry"),
    "labels",
    "must be 'deterministic' or 'bradley_terry'",
  )
  need(cfg.num_heldout >= 2, "num_heldout", "must be >= 2")
  need(cfg.eval_k >= 2 and cfg.eval_prompts >= 1, "eval_k", "eval_k >= 2 and eval_prompts >= 1")
  need(2 <= cfg.ovm_k <= cfg.eval_k, "ovm_k", f"must lie in [2, eval_k={cfg.eval_k}]")
  need(0.0 <= cfg.top_quantile < 1.0, "top_quantile", "must lie in [0, 1)")
  need(
    (1.0 - cfg.top_quantile) * cfg.eval_prompts * cfg.eval_k >= 3,
    "top_quantile",
    "leaves fewer than 3 responses of the best-of-K set",
  )
  need(
    cfg.offdist_pairs >= 1 and cfg.offdist_n >= 1, "offdist_pairs", "offdist_pairs, offdist_n >= 1"
  )
  need(cfg.bon_prompts >= 2, "bon_prompts", "must be >= 2 (standard errors over prompts)")
  need(
    all(1 <= n <= cfg.bon_samples for n in cfg.bon_outcome_ns) and len(cfg.bon_outcome_ns) > 0,
    "bon_outcome_ns",
    f"must lie in [1, bon_samples={cfg.bon_samples}]",
  )
  need(cfg.rl_per_size >= 0, "rl_per_size", "must be >= 0")
  need(
    {oo.ProxySize.parse(s) for s in cfg.rl_sizes} <= set(cfg.sizes),
    "rl_sizes",
    f"must be a subset of proxy_sizes {tuple(cfg.proxy_sizes)}",
  )
  if cfg.rl_per_size:
    need(cfg.rl_steps >= 1, "rl_steps", "must be >= 1 when rl_per_size > 0")
    need(
      rundir.is_int(cfg.rl_batch_size) and cfg.rl_batch_size >= 1,
      "rl_batch_size",
      "must be >= 1 when rl_per_size > 0",
    )
    need(cfg.rl_learning_rate > 0, "rl_learning_rate", "must be > 0")
    need(
      cfg.rl_batch_size % cfg.ppo.num_minibatches == 0,
      "ppo.num_minibatches",
      f"must divide the {cfg.rl_batch_size} sequences of a step (rl_batch_size)",
    )
    need(
      1 <= cfg.rl_log_every <= cfg.rl_steps,
      "rl_log_every",
      f"must lie in [1, rl_steps={cfg.rl_steps}]",
    )
    need(all(b > 0 for b in cfg.rl_kl_budgets), "rl_kl_budgets", "must be > 0")
    need(cfg.kl_coef >= 0, "kl_coef", "must be >= 0")
    need(
      cfg.rl_compile_opt_level in compile_cache.OPT_LEVELS,
      "rl_compile_opt_level",
      "must be -1 (XLA's default) or 0..3",
    )
    validate_fixed_length_rl(cfg.ppo, cfg.world, field="ppo")
  need(cfg.bootstrap_resamples >= 10, "bootstrap_resamples", "must be >= 10")
  need(0 < cfg.near_equal_accuracy < 1, "near_equal_accuracy", "must lie in (0, 1)")
  outcomes = [f"bon_gold_n{n}" for n in cfg.bon_outcome_ns] + ["bon_gold_peak"]
  need(cfg.primary_outcome in outcomes, "primary_outcome", f"must be one of {outcomes}")
  validate_world(cfg.world, field="world")
