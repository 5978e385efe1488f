"""The RL calibration of the over-optimisation study (``experiments/rl_calibration.py``).

See that script's docstring for what is measured and written.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrm.data import synthetic
from jaxrm.data.pairs import validate_fixed_length_rl, validate_world
from jaxrm.io import rundir
from jaxrm.math import best_of_n as bon_lib
from jaxrm.models.policy import transformer_policy
from jaxrm.steps import rl as rl_lib
from jaxrm.steps import rl_diagnostics


def _default_rl() -> rl_lib.RLConfig:
  # The study's PPO (experiments/overoptimization_lib._default_ppo): fixed-length responses.
  return rl_lib.RLConfig(max_new_tokens=12, eos_id=None, num_epochs=2, num_minibatches=2)


@dataclasses.dataclass
class CalibrationConfig:
  """Settings of one calibration run (defaults: the study's RL stage, the audit's recipe).

  Attributes:
    world, world_seed: the synthetic world (``synthetic.init_world(world, key(world_seed))``
      split as the study's ``build_world`` does, so the world is the study's).
    algo: ``'ppo'``, ``'rloo'``, ``'grpo'`` or ``'reinforce'``.
    rl: the algorithm's hyperparameters (``rl.num_samples`` responses per prompt for RLOO and
      GRPO); ``max_new_tokens`` must equal ``world.response_len``, ``eos_id`` None.
    learning_rate: Adam's learning rate.
    batch_size: prompts per RL step (sequences per step: ``batch_size * rl.num_samples`` for
      RLOO/GRPO, ``batch_size`` otherwise).
    steps: RL steps (a multiple of ``eval_every``).
    kl_coef: fixed KL-penalty coefficient (``rl.target_kl`` adapts it).
    num_seeds: RL seeds, vmapped.
    eval_every: steps between evaluations (and the scan length of one compiled chunk).
    eval_prompts: held-out prompts of the fixed evaluation batch (one response each).
    bon_prompts, bon_samples, bon_max_n: the best-of-n-on-gold curve.
    threshold: the pass mark of the oracle fraction at ``KL*``.
    smoke: labels a smoke run (the ``quick`` variant) in the outputs.
  """

  world: synthetic.WorldConfig = dataclasses.field(default_factory=synthetic.WorldConfig)
  world_seed: int = 0
  algo: str = "ppo"
  rl: rl_lib.RLConfig = dataclasses.field(default_factory=_default_rl)
  learning_rate: float = 1e-5
  batch_size: int = 64
  steps: int = 300
  kl_coef: float = 0.0
  num_seeds: int = 2
  eval_every: int = 25
  eval_prompts: int = 512
  bon_prompts: int = 128
  bon_samples: int = 2048
  bon_max_n: int = 1024
  threshold: float = 0.7
  smoke: bool = False

  @property
  def sequences_per_step(self) -> int:
    grouped = self.algo in ("rloo", "grpo")
    return self.batch_size * (self.rl.num_samples if grouped else 1)


def validate(cfg: CalibrationConfig) -> None:
  """Raises :class:`jaxrm.io.rundir.ConfigError` naming the offending field."""
  need = functools.partial(rundir.check, cfg)
  rundir.check_finite_fields(cfg)
  validate_world(cfg.world, field="world")
  need(cfg.algo in rl_lib.ALGORITHMS, "algo", f"must be one of {rl_lib.ALGORITHMS}")
  validate_fixed_length_rl(cfg.rl, cfg.world, field="rl")
  for name in ("batch_size", "steps", "num_seeds", "eval_every", "eval_prompts", "bon_prompts"):
    need(rundir.is_int(getattr(cfg, name)) and getattr(cfg, name) >= 1, name, "must be an int >= 1")
  need(rundir.is_int(cfg.world_seed) and cfg.world_seed >= 0, "world_seed", "must be an int >= 0")
  need(
    cfg.steps % cfg.eval_every == 0, "steps", f"must be a multiple of eval_every={cfg.eval_every}"
  )
  need(rundir.is_num(cfg.learning_rate) and cfg.learning_rate > 0, "learning_rate", "must be > 0")
  need(rundir.is_num(cfg.kl_coef) and cfg.kl_coef >= 0, "kl_coef", "must be >= 0")
  need(rundir.is_int(cfg.bon_max_n) and cfg.bon_max_n >= 2, "bon_max_n", "must be an int >= 2")
  need(
    rundir.is_int(cfg.bon_samples) and cfg.bon_samples >= cfg.bon_max_n,
    "bon_samples",
    f"must be an int >= bon_max_n={cfg.bon_max_n}",
  )
  need(rundir.is_num(cfg.threshold) and 0 < cfg.threshold, "threshold", "must be > 0")
  if cfg.algo in ("ppo", "grpo"):
    need(
      cfg.sequences_per_step % cfg.rl.num_minibatches == 0,
      "rl.num_minibatches",
      f"must divide the sequences per step ({cfg.sequences_per_step})",
    )


# ----------------------------------------------------------------------------- the world
def build_world(cfg: CalibrationConfig) -> synthetic.World:
  """The study's world of seed ``world_seed`` (the key split of its ``build_world``)."""
  k_world = jax.random.split(jax.random.key(cfg.world_seed), 3)[0]
  return synthetic.init_world(cfg.world, k_world)


def gold_fn(wc: synthetic.WorldConfig):
  """``reward_fn(world, tokens, mask) -> gold [b]`` (the world is a jit argument)."""
  return lambda world, tokens, mask: synthetic.gold_reward(world, wc, tokens, mask)


def gold_diagnostics(wc: synthetic.WorldConfig):
  """Logged-only parts of gold: the planted feature's count and term, the transformer part."""

  def fn(world, tokens, mask):
    parts = synthetic.gold_components(world, wc, tokens, mask)
    return {
      "feature_count": synthetic.feature_count(wc, tokens, mask),
      "gold_feature": parts["feature"],
      "gold_rest": parts["rest"],
    }

  return fn


# ----------------------------------------------------------------------------- best-of-n
def bon_ns(max_n: int) -> np.ndarray:
  """``1, 2, 4, ..., max_n`` (``max_n`` appended when not a power of two)."""
  ns = [1 << i for i in range(int(math.log2(max_n)) + 1)]
  return np.asarray(ns + ([max_n] if ns[-1] != max_n else []), np.int64)


def best_of_n_on_gold(cfg: CalibrationConfig, world: synthetic.World) -> dict[str, Any]:
  """Best-of-n selected by gold on ``pi_init`` samples: ``{'n', 'kl', 'gold'}`` curves.

  ``bon_samples`` responses to each of ``bon_prompts`` prompts (stream ``world_seed + 101``,
  disjoint from the RL and eval streams); gold is the selector and the score.
  """
  wc = cfg.world
  ns = bon_ns(cfg.bon_max_n)
  k_prompts, k_samples = jax.random.split(jax.random.key(cfg.world_seed + 101))
  prompts = synthetic.sample_prompts(wc, k_prompts, cfg.bon_prompts)

  @jax.jit
  def one_prompt(world, prompt, key):
    rep = jnp.broadcast_to(prompt, (cfg.bon_samples, wc.prompt_len))
    tokens, mask = synthetic.sample_responses(world, wc, rep, key)
    return synthetic.gold_reward(world, wc, tokens, mask)

  keys = jax.random.split(k_samples, cfg.bon_prompts)
  gold = np.stack([np.asarray(one_prompt(world, p, k)) for p, k in zip(prompts, keys)])
  gold_n, _ = bon_lib.batched_best_of_n_expected_reward(gold, gold, ns)
  return {
    "n": ns.tolist(),
    "kl": np.asarray(bon_lib.kl_bon(ns.astype(np.float64))).tolist(),
    "gold": np.asarray(gold_n, np.float64).tolist(),
  }


def half_max_kl(kl: np.ndarray, gold: np.ndarray) -> tuple[float, float]:
  """``(KL*, half)``: ``half = max(gold) / 2`` and the KL of the curve's first crossing of it.

  Linear interpolation between the two grid points around the crossing (``gold[0]`` is the
  ``pi_init`` mean, 0 by construction, below the half-maximum when the maximum is positive).
  """
  kl, gold = np.asarray(kl, np.float64), np.asarray(gold, np.float64)
  half = float(gold.max()) / 2
  return float(crossing(kl, gold, half)), half


def crossing(x: np.ndarray, y: np.ndarray, level: float) -> float:
  """The ``x`` where the piecewise-linear ``y(x)`` first reaches ``level`` (NaN if never)."""
  above = np.nonzero(y >= level)[0]
  if above.size == 0:
    return math.nan
  i = int(above[0])
  if i == 0:
    return float(x[0])
  x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
  return float(x0 + (level - y0) * (x1 - x0) / (y1 - y0))


def gold_at_kl(kl: np.ndarray, gold: np.ndarray, kl_star: float) -> float:
  """An RL curve's gold at ``kl_star``: linear interpolation at its first KL crossing.

  Evaluation points in step order, ``(0, gold_init)`` first; NaN if the run never reaches
  ``kl_star``.
  """
  kl, gold = np.asarray(kl, np.float64), np.asarray(gold, np.float64)
  above = np.nonzero(kl >= kl_star)[0]
  if above.size == 0:
    return math.nan
  i = int(above[0])
  if i == 0:
    return float(gold[0])
  t = (kl_star - kl[i - 1]) / (kl[i] - kl[i - 1])
  return float(gold[i - 1] + t * (gold[i] - gold[i - 1]))


def oracle_fractions(bon: dict[str, Any], rl_kl: np.ndarray, rl_gold: np.ndarray) -> np.ndarray:
  """RL gold / best-of-n gold at the same KL, elementwise (best-of-n interpolated in KL).

  Beyond the largest measured ``KL_bon`` the best-of-n value is its last point (a lower
  bound, as the curve rises); NaN where best-of-n gold is <= 0 (no gain to compare with).
  """
  ref = np.interp(rl_kl, bon["kl"], bon["gold"])
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(ref > 0, np.asarray(rl_gold) / np.where(ref > 0, ref, 1.0), np.nan)


# ----------------------------------------------------------------------------- RL
def run_rl(cfg: CalibrationConfig, world: synthetic.World) -> dict[str, Any]:
  """RL against gold, every seed vmapped; evaluations at step 0 and every ``eval_every``.

  Returns:
    ``step [T+1]`` and per-seed curves ``[num_seeds, T+1]`` of the eval metrics (``gold``,
    ``kl_exact``, ``kl_k1``, ``entropy``, ``feature_count``, ``gold_feature``,
    ``gold_rest``) and of the training batches (``train_gold``, ``train_kl``; window means,
    NaN at step 0), plus ``seconds`` (RL steps and evals, compilation included).
  """
  wc = cfg.world
  rl_cfg = dataclasses.replace(cfg.rl)
  optimizer = optax.adam(cfg.learning_rate)
  value_head = rl_lib.uses_value_head(cfg.algo)
  policy = transformer_policy(wc.policy_config(), value_head=value_head)
  reward_fn = gold_fn(wc)
  step_fn = rl_lib.make_step(
    cfg.algo, policy=policy, config=rl_cfg, reward_fn=reward_fn, optimizer=optimizer
  )
  ones = jnp.ones((cfg.batch_size, wc.prompt_len), bool)

  def one_step(state, world):
    # Prompts: stream 2 of the step key (the steps use 0 for sampling, 1 for minibatches).
    key = jax.random.fold_in(jax.random.fold_in(state.key, state.step), 2)
    prompts = synthetic.sample_prompts(wc, key, cfg.batch_size)
    state, m = step_fn(state, {"prompts": prompts, "prompt_mask": ones}, world, world.policy_params)
    return state, {"train_gold": m["score"], "train_kl": m["kl_k1"]}

  @functools.partial(jax.jit, donate_argnums=0)
  def chunk(states, world):
    def seed_scan(state):
      return jax.lax.scan(lambda s, _: one_step(s, world), state, None, length=cfg.eval_every)

    states, m = jax.vmap(seed_scan)(states)
    return states, jax.tree.map(lambda x: x.mean(axis=1), m)

  k_eval_prompts, k_eval = jax.random.split(jax.random.key(cfg.world_seed + 202))
  eval_batch = {
    "prompts": synthetic.sample_prompts(wc, k_eval_prompts, cfg.eval_prompts),
    "prompt_mask": jnp.ones((cfg.eval_prompts, wc.prompt_len), bool),
  }

  @jax.jit
  def evaluate(states, world, batch):
    def one(params):
      return rl_diagnostics.evaluate(
        params,
        world.policy_params,
        world,
        batch,
        k_eval,
        policy=policy,
        config=rl_cfg,
        reward_fn=reward_fn,
        diagnostics_fn=gold_diagnostics(wc),
      )

    return jax.vmap(one)(states.params)

  start = world.policy_params
  if value_head:
    start = rl_lib.init_value_head(start, jax.random.key(0), config=wc.policy_config())
  keys = jax.random.split(jax.random.key(3000 + cfg.world_seed), cfg.num_seeds)
  states = jax.vmap(lambda k: rl_lib.create_rl_state(start, optimizer, k, kl_coef=cfg.kl_coef))(
    keys
  )

  t0 = time.perf_counter()
  rows = []
  nan = np.full(cfg.num_seeds, np.nan)

  def record(step, m, train):
    m = {k: np.asarray(v, np.float64) for k, v in jax.device_get(m).items()}
    m["gold"] = m.pop("score")  # the eval reward is gold
    m.update({k: np.asarray(v, np.float64) for k, v in train.items()})
    rows.append((step, m))

  record(0, evaluate(states, world, eval_batch), {"train_gold": nan, "train_kl": nan})
  progress = rundir.Progress(cfg.steps, items_per_step=cfg.sequences_per_step * cfg.num_seeds)
  done = 0
  while done < cfg.steps:
    states, train = chunk(states, world)
    done += cfg.eval_every
    progress.start(done)
    record(done, evaluate(states, world, eval_batch), jax.device_get(train))
    m = rows[-1][1]
    logging.info(
      "rl %s: %s",
      cfg.algo,
      progress.line(done, {"gold": m["gold"].mean(), "kl_exact": m["kl_exact"].mean()}),
    )
  seconds = time.perf_counter() - t0
  keys = [k for k in rows[0][1] if k in _CURVE_KEYS]
  out = {k: np.stack([m[k] for _, m in rows], axis=1) for k in keys}
  out["step"] = np.asarray([s for s, _ in rows])
  out["seconds"] = seconds
  return out


_CURVE_KEYS = (
  "gold",
  "kl_exact",
  "kl_k1",
  "entropy",
  "feature_count",
  "gold_feature",
  "gold_rest",
  "train_gold",
  "train_kl",
)


# ----------------------------------------------------------------------------- outputs
def summarize(cfg: CalibrationConfig, bon: dict[str, Any], rl: dict[str, Any]) -> dict[str, Any]:
  """``results.json``'s content: KL*, the fractions per seed and at every eval point."""
  kl_star, half = half_max_kl(np.asarray(bon["kl"]), np.asarray(bon["gold"]))
  per_seed = [
    gold_at_kl(rl["kl_exact"][s], rl["gold"][s], kl_star) / half for s in range(cfg.num_seeds)
  ]
  mean_frac = float(np.mean(per_seed))
  fractions = oracle_fractions(bon, rl["kl_exact"], rl["gold"])
  return {
    "smoke": cfg.smoke,
    "config": dataclasses.asdict(cfg),
    "world_seed": cfg.world_seed,
    "best_of_n": bon,
    "bon_half_max": half,
    "kl_star": kl_star,
    "rl": {
      "step": rl["step"].tolist(),
      **{k: _json(v) for k, v in rl.items() if k not in ("step", "seconds")},
      "oracle_fraction": _json(fractions),
    },
    "oracle_fraction_at_kl_star": {
      "per_seed": [_num(f) for f in per_seed],
      "mean": _num(mean_frac),
      "threshold": cfg.threshold,
      "pass": bool(np.isfinite(mean_frac) and mean_frac >= cfg.threshold),
    },
    "cost": {
      "rl_seconds": rl["seconds"],
      "bon_seconds": bon.get("seconds"),
      "steps": cfg.steps,
      "sequences_per_step": cfg.sequences_per_step,
      "num_seeds": cfg.num_seeds,
      "load_average": list(os.getloadavg()),
    },
  }


def _num(x: float) -> float | None:
  return float(x) if np.isfinite(x) else None


def _json(a: np.ndarray) -> Any:
  return [[_num(x) for x in row] for row in np.asarray(a, np.float64)]


def write_outputs(workdir: str, results: dict[str, Any]) -> None:
  """``results.json``, ``metrics.jsonl`` (a row per eval step and seed) and the figure."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1, allow_nan=False)
  rl = results["rl"]
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for s in range(len(rl["gold"])):
      for i, step in enumerate(rl["step"]):
        row = {"step": step, "seed": s}
        row.update({k: rl[k][s][i] for k in rl if k != "step"})
        f.write(json.dumps(row, allow_nan=False) + "\n")
  plot(workdir, results)


def plot(workdir: str, results: dict[str, Any]) -> str:
  """``rl_calibration.png``: gold vs KL, best-of-n-on-gold and each RL seed, KL* marked."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  bon, rl = results["best_of_n"], results["rl"]
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(bon["kl"], bon["gold"], "k-o", ms=3, label="best-of-n on gold")
  for s, (kl, gold) in enumerate(zip(rl["kl_exact"], rl["gold"])):
    ax.plot(kl, gold, "-", marker=".", label=f"{results['config']['algo']} on gold, seed {s}")
  ax.axvline(results["kl_star"], color="grey", ls=":", label="KL* (best-of-n half max)")
  frac = results["oracle_fraction_at_kl_star"]["mean"]
  title = f"oracle fraction at KL*: {frac:.2f}" if frac is not None else "RL never reached KL*"
  ax.set(xlabel="KL(pi || pi_init) [nats] (RL: exact)", ylabel="gold (held-out)", title=title)
  if results["smoke"]:
    ax.text(0.5, 0.5, "SMOKE RUN", transform=ax.transAxes, alpha=0.3, ha="center", size=30)
  ax.legend(fontsize=7)
  fig.tight_layout()
  path = os.path.join(workdir, "rl_calibration.png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def run_calibration(cfg: CalibrationConfig, workdir: str) -> dict[str, Any]:
  """Builds the world, measures both curves, writes the outputs and returns the results."""
  validate(cfg)
  workdir = rundir.prepare(workdir)
  t = time.perf_counter()
  world = build_world(cfg)
  bon = best_of_n_on_gold(cfg, world)
  bon["seconds"] = time.perf_counter() - t
  logging.info("best-of-n on gold (%.1fs): %s", bon["seconds"], np.round(bon["gold"], 3))
  rl = run_rl(cfg, world)
  results = summarize(cfg, bon, rl)
  write_outputs(workdir, results)
  o = results["oracle_fraction_at_kl_star"]
  verdict = "PASS" if o["pass"] else "FAIL"
  mean = "nan (RL never reached KL*)" if o["mean"] is None else f"{o['mean']:.3f}"
  print(
    f"{verdict} oracle_fraction >= {cfg.threshold} at KL*: {mean} (per seed {o['per_seed']}; "
    f"KL*={results['kl_star']:.3f}, best-of-n half max {results['bon_half_max']:.3f}; "
    f"RL {cfg.steps} steps x {cfg.sequences_per_step} seq x {cfg.num_seeds} seeds in "
    f"{rl['seconds']:.1f}s)" + (" [smoke run]" if cfg.smoke else "")
  )
  return results
