"""Stages of the reward-model ensembles study (Coste, Anwar, Kirk & Krueger 2023).

In each synthetic world (the over-optimisation study's, ``StudyConfig.for_world(seed)``) and
for each label-noise rate, ``num_ensembles`` disjoint ensembles of ``ensemble_size`` proxy
reward models are trained (``ensemble_size * num_ensembles`` seeds of one architecture, each
with its own initialisation and data order: ``jaxrm.steps.rm_sweep``), and best-of-n and RL
optimise, for every ensemble: one member (``single``), the ensemble mean (``mean``), the
worst case (``wco``) and the uncertainty-weighted objective for every ``uwo_coefs`` lambda
(``uwo{lambda:g}``). Members are put on one scale by fixed ``pi_init`` statistics
(``jaxrm.math.objectives.normalize_members``: each member's mean and standard deviation on
4,096 ``pi_init`` samples) before the min and the variance.

Everything below is the over-optimisation study's machinery (:mod:`experiments.
overoptimization_lib`: ``build_world``, ``train_proxies``, ``bon_samples``, ``score_batches``;
:mod:`experiments.overoptimization_bon`: the unbiased best-of-n estimator and its nested
bootstrap), run through its ``StudyConfig`` (:func:`study_config`). Caches, each keyed by the
fingerprint of every field it reads (a changed setting recomputes only what depends on it):

1. ``world{seed}/noise{rate:g}/world.npz``, ``.../proxies/*.npz``: the world, its comparisons
   with that noise rate, the members;
2. ``world{seed}/noise{rate:g}/bon.npz``: best-of-n curves and bootstrap replicates;
3. ``world{seed}/rl/*.npz``: RL curves (:mod:`experiments.ensembles_rl`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from experiments import overoptimization_bon as ob
from experiments import overoptimization_lib as oo
from experiments import overoptimization_rl as orl
from jaxrm.data import synthetic
from jaxrm.data.pairs import validate_world
from jaxrm.io import compile_cache, environment, rundir
from jaxrm.math import best_of_n as bon_lib
from jaxrm.math import objectives
from jaxrm.steps import rl as rl_lib


def _default_ppo() -> rl_lib.RLConfig:
  return rl_lib.RLConfig(max_new_tokens=12, eos_id=None, num_epochs=2, num_minibatches=2)


@dataclasses.dataclass
class EnsembleConfig:
  """All settings of the ensembles study; every stage's cache is keyed by the fields it reads.

  Returned by ``experiments/configs/ensembles.py``; any field is overridable from the command
  line (``--config.uwo_coefs="(0.5,2.0)"``, ``--config.ensemble_size=8``).

  Attributes:
    world, world_seeds: the synthetic world and one world per seed.
    num_comparisons, num_heldout, labels: the members' training pairs, held-out pairs (always
      noise-free gold labels) and their labelling (``'deterministic'``, ``'bradley_terry'``).
    label_noises: rates of flipped training labels; each trains its own members.
    proxy_size: the members' architecture ``LAYERSxWIDTHxHEADS``.
    ensemble_size: members per ensemble (k); num_ensembles: disjoint ensembles (the seed unit
      of every interval: RL seed e optimises ensemble e).
    rm_epochs, rm_batch_size, rm_learning_rate: member training.
    uwo_coefs: the UWO lambdas (in units of the normalised members' variance);
      uwo_check_coef: the one the checks (a) and (c) use (one of ``uwo_coefs``).
    bon_prompts, bon_samples, bon_max_n, bon_bootstrap: best-of-n (as the over-optimisation
      study's: ``bon_samples`` pi_init samples per prompt, n up to ``bon_max_n``, bootstrap
      replicates over prompts and samples within prompt).
    rl_*, kl_coef, ppo: RL settings (the over-optimisation study's RL stage);
      ``rl_steps=0``: best-of-n only.
    fast_compiles: compile every program with XLA's backend optimisations off
      (:func:`jaxrm.io.compile_cache.optimizations_off`; the quick variant); in every
      stage's key. ``rl_compile_opt_level`` (not -1) still sets the RL chunk's level.
    smoke: a smoke run (``--quick``): outputs say so and the checks are not evidence.
  """

  world: synthetic.WorldConfig = dataclasses.field(default_factory=synthetic.WorldConfig)
  world_seeds: tuple[int, ...] = (0, 1)
  num_comparisons: int = 2500
  num_heldout: int = 2000
  labels: str = "deterministic"
  label_noises: tuple[float, ...] = (0.0, 0.25)
  proxy_size: str = "1x8x2"
  ensemble_size: int = 5
  num_ensembles: int = 3
  rm_epochs: int = 3
  rm_batch_size: int = 64
  rm_learning_rate: float = 1e-3
  uwo_coefs: tuple[float, ...] = (0.25, 1.0, 4.0)
  uwo_check_coef: float = 1.0
  bon_prompts: int = 64
  bon_samples: int = 1024
  bon_max_n: int = 512
  bon_bootstrap: int = 200
  rl_steps: int = 120
  rl_batch_size: int = 64
  rl_learning_rate: float = 1e-5
  rl_log_every: int = 15
  rl_eval_prompts: int = 128
  rl_algorithm: str = "ppo"
  kl_coef: float = 0.0
  ppo: rl_lib.RLConfig = dataclasses.field(default_factory=_default_ppo)
  rl_compile_opt_level: int = -1  # the RL chunk's XLA backend level (StudyConfig's field)
  fast_compiles: bool = False  # every program at XLA's -O0 (StudyConfig's field)
  smoke: bool = False

  @property
  def num_members(self) -> int:
    return self.ensemble_size * self.num_ensembles

  @property
  def objective_names(self) -> tuple[str, ...]:
    return ("single", "mean", "wco") + tuple(f"uwo{c:g}" for c in self.uwo_coefs)

  def fingerprint(self, *fields: str, **extra: Any) -> str:
    return rundir.fingerprint({**{f: getattr(self, f) for f in fields}, **extra})


# The fields each stage reads (its cache key); a test checks that they cover every field.
MEMBER_FIELDS = (
  "world",
  "fast_compiles",
  "num_comparisons",
  "num_heldout",
  "labels",
  "proxy_size",
  "ensemble_size",
  "num_ensembles",
  "rm_epochs",
  "rm_batch_size",
  "rm_learning_rate",
)
BON_FIELDS = MEMBER_FIELDS + (
  "uwo_coefs",
  "bon_prompts",
  "bon_samples",
  "bon_max_n",
  "bon_bootstrap",
)
RL_FIELDS = MEMBER_FIELDS + (
  "label_noises",
  "uwo_coefs",
  "rl_steps",
  "rl_batch_size",
  "rl_learning_rate",
  "rl_log_every",
  "rl_eval_prompts",
  "rl_algorithm",
  "kl_coef",
  "ppo",
  "rl_compile_opt_level",
)
# Read by the analysis only (never cached), and the selection of worlds (each world's caches
# live under world{seed}/, keyed by the seed through study_config's world_seed).
ANALYSIS_FIELDS = ("uwo_check_coef", "smoke", "world_seeds", "label_noises")


def study_config(cfg: EnsembleConfig, world_seed: int, noise: float) -> oo.StudyConfig:
  """The over-optimisation study's per-world config for one noise rate (its stages reused)."""
  return oo.StudyConfig(
    world=cfg.world,
    world_seeds=(int(world_seed),),
    num_comparisons=cfg.num_comparisons,
    num_heldout=cfg.num_heldout,
    labels=cfg.labels,
    label_noise=float(noise),
    proxy_sizes=(cfg.proxy_size,),
    num_seeds=cfg.num_members,
    rm_epochs=cfg.rm_epochs,
    rm_batch_size=cfg.rm_batch_size,
    rm_learning_rate=cfg.rm_learning_rate,
    bon_prompts=cfg.bon_prompts,
    bon_samples=cfg.bon_samples,
    bon_max_n=cfg.bon_max_n,
    bon_bootstrap=cfg.bon_bootstrap,
    rl_steps=cfg.rl_steps,
    rl_batch_size=cfg.rl_batch_size,
    rl_learning_rate=cfg.rl_learning_rate,
    kl_coef=cfg.kl_coef,
    rl_log_every=cfg.rl_log_every,
    ppo=cfg.ppo,
    rl_algorithm=cfg.rl_algorithm,
    rl_eval_prompts=cfg.rl_eval_prompts,
    kl_sweep=(),
    rl_compile_opt_level=cfg.rl_compile_opt_level,
    fast_compiles=cfg.fast_compiles,
  )


def validate(cfg: EnsembleConfig) -> None:
  """Raises :class:`jaxrm.io.rundir.ConfigError` naming the offending field."""
  need = functools.partial(rundir.check, cfg)
  rundir.check_finite_fields(cfg)
  need(rundir.is_int(cfg.ensemble_size) and cfg.ensemble_size >= 2, "ensemble_size", "must be >= 2")
  need(
    rundir.is_int(cfg.num_ensembles) and cfg.num_ensembles >= 2,
    "num_ensembles",
    "must be >= 2 (the seed unit of every interval)",
  )
  seeds = cfg.world_seeds
  need(isinstance(seeds, (tuple, list)) and len(seeds) >= 1, "world_seeds", "must name >= 1 seed")
  need(all(rundir.is_int(x) and x >= 0 for x in seeds), "world_seeds", "must be ints >= 0")
  need(len(set(seeds)) == len(seeds), "world_seeds", "must be distinct")
  noises = cfg.label_noises
  need(
    isinstance(noises, tuple) and len(noises) >= 1 and all(rundir.is_num(x) for x in noises),
    "label_noises",
    "must be a non-empty tuple of numbers",
  )
  need(all(0.0 <= x <= 0.5 for x in noises), "label_noises", "must lie in [0, 0.5]")
  need(len(set(f"{x:g}" for x in noises)) == len(noises), "label_noises", "must be distinct")
  coefs = cfg.uwo_coefs
  need(
    isinstance(coefs, tuple) and len(coefs) >= 1 and all(rundir.is_num(c) and c > 0 for c in coefs),
    "uwo_coefs",
    "must be a non-empty tuple of numbers > 0",
  )
  need(len(set(f"{c:g}" for c in coefs)) == len(coefs), "uwo_coefs", "must be distinct")
  need(
    any(f"{c:g}" == f"{cfg.uwo_check_coef:g}" for c in coefs),
    "uwo_check_coef",
    f"must be one of uwo_coefs={coefs}",
  )
  need(isinstance(cfg.proxy_size, str), "proxy_size", "must be a string LAYERSxWIDTHxHEADS")
  sc = study_config(cfg, 0, 0.0)
  try:
    oo.ProxySize.parse(cfg.proxy_size)
    oo.validate(dataclasses.replace(sc, world_seeds=(0,)))
  except rundir.ConfigError as e:  # the StudyConfig's field names, mapped to this config's
    field = {"proxy_sizes": "proxy_size", "num_seeds": "ensemble_size"}.get(e.field, e.field)
    raise rundir.ConfigError(field, getattr_path(cfg, field, e.value), e.message) from None
  validate_world(cfg.world, field="world")


def getattr_path(obj: Any, path: str, default: Any) -> Any:
  for part in path.split("."):
    if not hasattr(obj, part):
      return default
    obj = getattr(obj, part)
  return obj


# ----------------------------------------------------------------------------- members
def member_stats(sc: oo.StudyConfig, data: oo.WorldData, members: dict) -> np.ndarray:
  """Fixed normalisation statistics ``[2, M]`` (mean, std) of every member on ``pi_init``.

  The 4,096 ``pi_init`` samples of the RL stage's offsets (``overoptimization_rl.
  init_samples``: fresh prompts, key ``world_seed + 11``), disjoint from best-of-n's.
  """
  tokens, mask = orl.init_samples(sc, data)
  size = members["size"]
  scores = oo.score_batches(oo.proxy_model(sc, size).apply, members["params"], tokens, mask)
  return np.stack([scores.mean(axis=1), scores.std(axis=1)])


def objective_scores(cfg: EnsembleConfig, z: np.ndarray) -> dict[str, np.ndarray]:
  """Every objective of every ensemble from normalised member scores ``z [M, ...]``.

  Ensemble ``e`` is members ``e*k .. e*k+k-1``. Returns ``{'mean' | 'wco' | 'uwo{c:g}':
  [E, ...]}`` (``single`` is each member's own score, handled by the callers).
  """
  k, out = cfg.ensemble_size, {}
  groups = [jnp.asarray(z[e * k : (e + 1) * k]) for e in range(cfg.num_ensembles)]
  out["mean"] = np.stack([objectives.ensemble_mean(g) for g in groups])
  out["wco"] = np.stack([objectives.ensemble_worst_case(g) for g in groups])
  for c in cfg.uwo_coefs:
    out[f"uwo{c:g}"] = np.stack(
      [objectives.ensemble_uncertainty_weighted(g, coef=c) for g in groups]
    )
  return out


# ----------------------------------------------------------------------------- best-of-n
def best_of_n(
  cfg: EnsembleConfig,
  sc: oo.StudyConfig,
  members: dict,
  stats: np.ndarray,
  samples: dict,
  wdir: str,
) -> dict[str, np.ndarray]:
  """Best-of-n gold of every objective of every ensemble, and of the gold oracle.

  Returns (``E`` ensembles, ``B`` = ``bon_bootstrap``; gold re-centred so pi_init scores 0):
    ``ns``, ``kl`` (analytic ``kl_bon``) ``[n_values]``; for each objective ``gold_OBJ [E,
    n_values]`` and ``boot_OBJ [E, B, n_values]`` (``single``: the mean over the ensemble's
    members of each member's curve, replicate by replicate); ``oracle_gold [n_values]``,
    ``boot_oracle [B, n_values]``. Replicates resample prompts and samples within prompt,
    the same draws for every selector (paired).
  """
  path, fp = os.path.join(wdir, "bon.npz"), cfg.fingerprint(*BON_FIELDS, world_seed=sc.world_seed)
  ns = oo.bon_ns(cfg.bon_max_n)
  nv, e, nb, k = len(ns), cfg.num_ensembles, cfg.bon_bootstrap, cfg.ensemble_size
  shapes = {"oracle_gold": (nv,), "boot_oracle": (nb, nv)}
  for name in cfg.objective_names:
    shapes.update({f"gold_{name}": (e, nv), f"boot_{name}": (e, nb, nv)})
  template = {n: jax.ShapeDtypeStruct(s, jnp.float32) for n, s in shapes.items()}
  loaded = oo.load_tree(path, template, fp)
  if loaded is None:
    t = time.perf_counter()
    size = members["size"]
    raw = oo.score_batches(
      oo.proxy_model(sc, size).apply, members["params"], samples["tokens"], samples["mask"]
    )  # [M, P * N]
    z = np.asarray(objectives.normalize_members(raw, mean=stats[0], std=stats[1]))
    shape = (cfg.bon_prompts, cfg.bon_samples)
    obj = objective_scores(cfg, z)
    names = [n for n in cfg.objective_names if n != "single"]
    select = np.concatenate(
      [samples["gold"][None], z.reshape((-1,) + shape)]
      + [obj[n].reshape((-1,) + shape) for n in names]
    )  # [1 + M + E * len(names), P, N]
    curves = ob.bon_curves(select, samples["gold"][None], ns)[:, 0]  # [K, nv]
    curves = curves - curves[:, :1]
    boot = ob.bootstrap_bon(
      select, samples["gold"], ns, key=jax.random.key(sc.world_seed + 13), num_boot=nb
    )  # [K, B, nv]
    m = cfg.num_members
    result = {"oracle_gold": curves[0], "boot_oracle": boot[0]}
    result["gold_single"] = curves[1 : 1 + m].reshape(e, k, nv).mean(axis=1)
    result["boot_single"] = boot[1 : 1 + m].reshape(e, k, nb, nv).mean(axis=1)
    for j, n in enumerate(names):
      rows = slice(1 + m + j * e, 1 + m + (j + 1) * e)
      result[f"gold_{n}"], result[f"boot_{n}"] = curves[rows], boot[rows]
    result = {n: np.asarray(v, np.float32) for n, v in result.items()}
    oo.save_tree(path, result, {"fingerprint": fp, "seconds": time.perf_counter() - t})
    logging.info("best-of-n: %d selectors in %.1fs", len(select), time.perf_counter() - t)
  else:
    result = loaded[0]
  result = {n: np.asarray(v) for n, v in result.items()}
  return dict(result, ns=ns, kl=np.asarray(bon_lib.kl_bon(ns)))


# ----------------------------------------------------------------------------- driver
class Log:
  """Appends one JSON line per finished stage to ``workdir/metrics.jsonl`` (and times it)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.timing: dict[str, float] = {}

  def __call__(self, name: str, fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    seconds = time.perf_counter() - t
    self.timing[name] = seconds
    row = {"stage": name, "seconds": round(seconds, 2), "load_average": os.getloadavg()[0]}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    logging.info("stage %s: %.1fs", name, seconds)
    return out


def _tag(noise: float) -> str:
  return f"noise{noise:g}"


def run_world(cfg: EnsembleConfig, seed: int, workdir: str, log: Log) -> dict[str, Any]:
  """Every stage of one world; caches under ``workdir/world{seed}``."""
  from experiments import ensembles_rl  # noqa: PLC0415  (it imports this module)

  wdir = os.path.join(workdir, f"world{seed}")
  out: dict[str, Any] = {"world_seed": seed, "members": {}, "bon": {}}
  trained, samples = {}, None
  for noise in cfg.label_noises:
    sc, ndir = study_config(cfg, seed, noise), os.path.join(wdir, _tag(noise))
    name = f"world{seed}/{_tag(noise)}"
    data = log(f"{name}/world", oo.build_world, sc, ndir)
    members = log(f"{name}/members", oo.train_proxies, sc, data, ndir)[0]
    stats = member_stats(sc, data, members)
    if samples is None:  # pi_init samples: the same for every noise rate of a world
      samples = log(f"world{seed}/bon_samples", oo.bon_samples, sc, data)
    out["bon"][_tag(noise)] = log(
      f"{name}/best_of_n", best_of_n, cfg, sc, members, stats, samples, ndir
    )
    out["members"][_tag(noise)] = {
      "heldout_accuracy": members["heldout_accuracy"],
      "train_loss": members["train_loss"],
      "num_params": members["num_params"],
      "pi_init_mean": stats[0].tolist(),
      "pi_init_std": stats[1].tolist(),
    }
    trained[noise] = (sc, data, members, stats)
  if cfg.rl_steps > 0:
    out["rl"] = log(f"world{seed}/rl", ensembles_rl.run_rl, cfg, trained, wdir)
  return out


def run_study(cfg: EnsembleConfig, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) every stage in every world; returns the measurements (NumPy arrays).

  ``results['worlds'][i]`` holds world ``world_seeds[i]``: ``members[noise]`` (accuracy,
  normalisation statistics), ``bon[noise]`` (:func:`best_of_n`) and ``rl``
  (``ensembles_rl.run_rl``).
  """
  validate(cfg)
  log = Log(workdir)
  results = {"config": rundir.config_to_json(cfg), "environment": environment.environment()}
  with compile_cache.optimizations_off(cfg.fast_compiles):
    results["worlds"] = [run_world(cfg, s, workdir, log) for s in cfg.world_seeds]
  results["timing_this_invocation"] = log.timing
  return results
