"""Stages of the reward over-optimisation study (Gao et al. 2022) in the synthetic world.

Each stage is a function of the study config and the outputs of earlier stages, and caches
its result under ``workdir`` (``world.npz``, ``proxies/size_*.npz``, ``bon.npz``, ``rl/*``), so
a re-run (or a run resumed after a crash) recomputes only what is missing. A cache written by
a different config is detected by the config's fingerprint and recomputed, never reused.

The stages:
1. ``build_world``: ``pi_init``, gold and gold-labelled comparisons (``jaxrm.data.synthetic``).
2. ``train_proxies``: proxy reward models of several sizes, all seeds of one size at once
   (``jaxrm.steps.rm_sweep``), with held-out accuracy against noise-free gold labels.
3. ``best_of_n``: ``N`` samples per prompt from ``pi_init``, scored by gold and every proxy;
   the unbiased best-of-n estimator for n = 1 .. ``bon_max_n`` (``jaxrm.math.best_of_n``).
4. ``rl``: PPO against each proxy, all seeds at once, recording gold, proxy and KL.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
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
from jaxrm.io import compile_cache, environment, rundir
from jaxrm.io.rundir import ConfigError
from jaxrm.math import best_of_n as bon_lib
from jaxrm.math import metrics as metrics_lib
from jaxrm.math import preference
from jaxrm.models.reward_model import RewardModel
from jaxrm.steps import rl as rl_lib
from jaxrm.steps.rm_sweep import RewardModelSweep


@dataclasses.dataclass(frozen=True)
class ProxySize:
  """A proxy reward model architecture."""

  num_layers: int
  width: int
  num_heads: int

  @property
  def name(self) -> str:
    return f"L{self.num_layers}W{self.width}"

  @classmethod
  def parse(cls, text: str) -> ProxySize:
    """``'2x32x4'`` (LAYERSxWIDTHxHEADS) -> ``ProxySize(2, 32, 4)``.

    Raises:
      ConfigError: (``proxy_sizes``) for a malformed size or a width not divisible by heads.
    """
    try:
      layers, width, heads = (int(x) for x in str(text).lower().split("x"))
    except ValueError:
      raise ConfigError("proxy_sizes", text, "is not LAYERSxWIDTHxHEADS, e.g. 2x32x4") from None
    if min(layers, width, heads) < 1 or width % heads:
      raise ConfigError(
        "proxy_sizes", text, f"needs positive sizes and width {width} divisible by heads {heads}"
      )
    return cls(layers, width, heads)


def _default_ppo() -> rl_lib.RLConfig:
  # Fixed-length responses of the default world (validate() checks the length).
  return rl_lib.RLConfig(max_new_tokens=12, eos_id=None, num_epochs=2, num_minibatches=2)


@dataclasses.dataclass
class StudyConfig:
  """All settings of one study; every stage's cache is keyed by the fields it reads.

  Returned by ``experiments/configs/overoptimization.py``; every field is overridable from
  the command line (``--config.ppo.num_epochs=4``, ``--config.world.gold_width=32``,
  ``--config.proxy_sizes="('1x8x2','2x64x4')"``). Treated as immutable once a study starts.

  Attributes (beyond the stage settings named after their stage):
    world: the synthetic world.
    world_seeds: one world per seed; every stage runs per world on ``for_world(seed)`` (whose
      ``world_seed`` property is its only seed), with its caches under ``workdir/world{seed}/``.
    bon_prompts, bon_samples: best-of-n draws ``bon_samples`` responses for each of
      ``bon_prompts`` prompts; ``bon_max_n`` the largest n reported.
    bon_bootstrap: replicates of the bootstrap over prompts and samples within prompt (seeds
      are resampled in the analysis); bands and check intervals use it.
    tilted_betas: the KL-regularised optimum's temperatures, in units of the reward's standard
      deviation under ``pi_init`` (so one grid serves gold and every proxy).
    data_sizes: extra comparison-data sizes: every proxy size is also trained on each.
    proxy_sizes: proxy architectures as ``LAYERSxWIDTHxHEADS`` (:meth:`ProxySize.parse`).
    ppo: the PPO hyperparameters of the RL stage (:class:`jaxrm.steps.rl.RLConfig`);
      ``max_new_tokens`` must equal the world's ``response_len``.
  """

  world: synthetic.WorldConfig = dataclasses.field(default_factory=synthetic.WorldConfig)
  world_seeds: tuple[int, ...] = (0, 1, 2)
  num_comparisons: int = 2500
  data_sizes: tuple[int, ...] = ()
  num_heldout: int = 2000
  labels: str = "deterministic"
  label_noise: float = 0.0
  proxy_sizes: tuple[str, ...] = ("1x4x1", "1x8x2", "1x16x2", "2x32x4", "2x64x4")
  num_seeds: int = 3
  rm_epochs: int = 3
  rm_batch_size: int = 64
  rm_learning_rate: float = 1e-3
  bon_prompts: int = 64
  bon_samples: int = 1024
  bon_max_n: int = 512
  bon_bootstrap: int = 200
  tilted_betas: tuple[float, ...] = tuple(float(b) for b in np.round(np.geomspace(0.08, 8, 13), 4))
  rl_steps: int = 300
  rl_batch_size: int = 64
  rl_learning_rate: float = 1e-5
  kl_coef: float = 0.0
  rl_log_every: int = 10
  ppo: rl_lib.RLConfig = dataclasses.field(default_factory=_default_ppo)
  smoke: bool = False  # labels the outputs as a smoke run (the ``quick`` variant)
  # fast_compiles: compile every program with XLA's backend optimisations off
  # (compile_cache.optimizations_off: a cold run compiles ~2x faster, its steps run slower; the
  # quick variants use it). In every stage's key: it can change float rounding.
  fast_compiles: bool = False
  # --- RL arm (experiments/overoptimization_rl.py)
  # rl_algorithm: 'ppo', 'rloo', 'grpo' or 'reinforce' (hyperparameters: ``ppo``, an RLConfig).
  # rl_eval_prompts: fixed held-out prompts sampled at every evaluation (every rl_log_every).
  # kl_sweep: KL coefficients of the sweep arms f"{reward}_kl{coef:g}" for kl_sweep_reward and
  # gold; kl_sweep_reward: a proxy size ('L1W8' or '1x8x2'), '' = the smallest-but-one proxy.
  # rl_compile_opt_level: XLA backend optimisation level of the RL chunk alone (-1: XLA's
  # default, or fast_compiles' level 0 when that is set; 0 compiles it ~2x faster and runs it
  # ~4x slower on the CPU).
  rl_algorithm: str = "ppo"
  rl_eval_prompts: int = 256
  kl_sweep: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0)
  kl_sweep_reward: str = ""
  rl_compile_opt_level: int = -1
  # world_threads: worlds run at once, each in its own host thread, so that XLA runs their
  # programs concurrently. Each world runs the same programs on the same inputs either way:
  # the numbers do not depend on it. With more than one, an interrupt or a failure surfaces
  # only when the running worlds have finished.
  world_threads: int = 1

  @property
  def world_seed(self) -> int:
    """The seed of a per-world config (:meth:`for_world`)."""
    if len(self.world_seeds) != 1:
      raise ValueError(
        f"world_seed needs a per-world config (cfg.for_world(seed)); world_seeds={self.world_seeds}"
      )
    return int(self.world_seeds[0])

  def for_world(self, seed: int) -> StudyConfig:
    """This config restricted to the world ``seed`` (its stages read ``world_seed``)."""
    return dataclasses.replace(self, world_seeds=(int(seed),))

  @property
  def num_train(self) -> int:
    """Size of the generated comparison set (smaller data sizes use its prefixes)."""
    return max((self.num_comparisons,) + tuple(self.data_sizes))

  @property
  def sizes(self) -> tuple[ProxySize, ...]:
    """``proxy_sizes`` parsed."""
    return tuple(ProxySize.parse(s) for s in self.proxy_sizes)

  def fingerprint(self, *fields: str) -> str:
    """A short hash of the named fields and properties."""
    return rundir.fingerprint({f: getattr(self, f) for f in fields})


# The fields each stage reads (its cache key); tests check that together they cover every field.
WORLD_FIELDS = (  # every stage's key extends WORLD_FIELDS
  "world",
  "world_seed",
  "num_train",
  "num_heldout",
  "labels",
  "label_noise",
  "fast_compiles",
)
PROXY_FIELDS = WORLD_FIELDS + ("num_seeds", "rm_epochs", "rm_batch_size", "rm_learning_rate")
BON_FIELDS = PROXY_FIELDS + (
  "proxy_sizes",
  "bon_prompts",
  "bon_samples",
  "bon_max_n",
  "bon_bootstrap",
  "tilted_betas",
)
RL_FIELDS = PROXY_FIELDS + (
  "proxy_sizes",
  "rl_steps",
  "rl_batch_size",
  "rl_learning_rate",
  "kl_coef",
  "rl_log_every",
  "ppo",
  # --- RL arm (experiments/overoptimization_rl.py)
  "rl_algorithm",
  "rl_eval_prompts",
  "kl_sweep",
  "kl_sweep_reward",
  "rl_compile_opt_level",  # the level can change float rounding, so RL results are keyed by it
)
# ``num_comparisons`` and ``data_sizes`` select the proxies' data (``num_train`` and the file
# names of each size's cache) and so enter every key through ``num_train`` and the paths;
# ``world_seeds`` selects the worlds, each keyed by its ``world_seed`` under ``world{seed}/``.
SELECTION_FIELDS = ("num_comparisons", "data_sizes", "world_seeds")
LABEL_FIELDS = ("smoke",)  # labels the outputs only: no cache depends on it
EXECUTION_FIELDS = ("world_threads",)  # how the stages run, not what they compute

save_tree = rundir.save_tree
load_tree = rundir.load_tree


# ----------------------------------------------------------------------------- stage 1
@dataclasses.dataclass
class WorldData:
  world: synthetic.World
  train: synthetic.Comparisons  # the largest comparison set; smaller ones are its prefixes
  heldout: synthetic.Comparisons  # noise-free deterministic gold labels


def build_world(cfg: StudyConfig, workdir: str) -> WorldData:
  """Builds (or loads) the world and its comparisons."""
  path = os.path.join(workdir, "world.npz")
  fp = cfg.fingerprint(*WORLD_FIELDS)
  key = jax.random.key(cfg.world_seed)
  k_world, k_train, k_heldout = jax.random.split(key, 3)
  num_train = cfg.num_train

  def make():
    world = synthetic.init_world(cfg.world, k_world)
    train = synthetic.make_comparisons(
      world, cfg.world, k_train, num=num_train, labels=cfg.labels, label_noise=cfg.label_noise
    )
    heldout = synthetic.make_comparisons(world, cfg.world, k_heldout, num=cfg.num_heldout)
    return world, train, heldout

  template = jax.eval_shape(make)
  loaded = load_tree(path, template, fp)
  if loaded is None:
    t = time.perf_counter()
    tree = make()
    save_tree(path, tree, {"fingerprint": fp})
    logging.info("world built in %.1fs", time.perf_counter() - t)
  else:
    tree = loaded[0]
  return WorldData(*tree)


# ----------------------------------------------------------------------------- stage 2
def proxy_model(cfg: StudyConfig, size: ProxySize) -> RewardModel:
  return RewardModel(
    cfg.world.reward_config(num_layers=size.num_layers, width=size.width, num_heads=size.num_heads)
  )


def param_count(tree: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def train_proxies(
  cfg: StudyConfig, data: WorldData, workdir: str, *, num_comparisons: int | None = None
) -> list[dict[str, Any]]:
  """Trains ``num_seeds`` proxies of every size on the first ``num_comparisons`` pairs.

  Returns:
    One dict per size: ``size``, ``params`` (stacked over seeds), ``num_params``,
    ``heldout_accuracy`` (per seed), ``train_loss`` (final, per seed).
  """
  num = cfg.num_comparisons if num_comparisons is None else num_comparisons
  pairs = jax.tree.map(lambda x: x[:num], data.train.as_batch())
  steps = cfg.rm_epochs * num // cfg.rm_batch_size
  results = []
  for i, size in enumerate(cfg.sizes):
    # The seeds of size i come from key(1000 + i): the index and the whole size are in the key.
    fp = cfg.fingerprint(*PROXY_FIELDS) + f"-{i}-{size.num_heads}"
    path = os.path.join(workdir, "proxies", f"n{num}_{size.name}.npz")
    model = proxy_model(cfg, size)
    sweep = RewardModelSweep(
      init_fn=lambda k, m=model: m.init(k, pairs["chosen"][:1], pairs["chosen_mask"][:1]),
      apply_fn=model.apply,
      loss_fn=preference.bradley_terry_loss,
      optimizer=optax.adamw(cfg.rm_learning_rate),
      batch_size=cfg.rm_batch_size,
    )
    keys = jax.random.split(jax.random.key(1000 + i), cfg.num_seeds)
    template = jax.eval_shape(lambda s=sweep, k=keys: s.init(k).params)
    loaded = load_tree(path, template, fp)
    if loaded is not None:
      params, meta = loaded
    else:
      t = time.perf_counter()
      logging.info(
        "training %d proxies %s on %d pairs for %d steps", cfg.num_seeds, size.name, num, steps
      )
      states, metrics = sweep.train(sweep.init(keys), pairs, num_steps=steps)
      params = states.params
      acc = heldout_accuracy(model, params, data.heldout)
      meta = {
        "fingerprint": fp,
        "size": size.name,
        "num_comparisons": num,
        "num_params": param_count(template) // cfg.num_seeds,
        "heldout_accuracy": acc.tolist(),
        "train_loss": np.asarray(metrics["loss"][:, -50:].mean(axis=1)).tolist(),
        "num_skipped": np.asarray(states.num_skipped).tolist(),
        "seconds": time.perf_counter() - t,
      }
      save_tree(path, params, meta)
      logging.info(
        "proxy %s: %d params, held-out accuracy %s (%.0fs)",
        size.name,
        meta["num_params"],
        np.round(acc, 3),
        meta["seconds"],
      )
    results.append(dict(meta, size=size, params=params))
  return results


def score_batches(apply_fn, stacked_params, tokens, mask, *, chunk: int = 8192) -> np.ndarray:
  """Scores ``tokens [n, s]`` with every stacked member: ``[k, n]`` float32 numpy."""
  fn = jax.jit(jax.vmap(apply_fn, in_axes=(0, None, None)))
  return np.concatenate(
    [
      np.asarray(fn(stacked_params, tokens[i : i + chunk], mask[i : i + chunk]))
      for i in range(0, tokens.shape[0], chunk)
    ],
    axis=1,
  )


def heldout_accuracy(model, stacked_params, heldout: synthetic.Comparisons) -> np.ndarray:
  """Per-member accuracy ``[k]`` on pairs whose chosen side has the higher gold score."""
  num = heldout.chosen.shape[0]
  tokens = jnp.concatenate([heldout.chosen, heldout.rejected])  # one compile, not two
  scores = score_batches(
    model.apply, stacked_params, tokens, jnp.concatenate([heldout.mask, heldout.mask])
  )
  rc, rr = scores[:, :num], scores[:, num:]
  return np.array([metrics_lib.pairwise_accuracy(c, r) for c, r in zip(rc, rr)])


# ----------------------------------------------------------------------------- stage 3
def bon_ns(max_n: int) -> np.ndarray:
  """n = 1, 2, 3, 4, 6, 8, 11, ... (half powers of two, rounded) up to ``max_n``."""
  ns = np.unique(np.round(2.0 ** np.arange(0, np.log2(max_n) + 1e-9, 0.5)).astype(int))
  return ns[ns <= max_n]


BON_VALUES = ("gold", "gold_rest", "gold_feature")  # the scores averaged along every curve


def bon_samples(cfg: StudyConfig, data: WorldData) -> dict[str, jax.Array]:
  """``bon_samples`` responses of ``pi_init`` to each of ``bon_prompts`` prompts, with gold.

  Returns:
    ``tokens [P * N, seq]``, ``mask``, and ``gold``, ``gold_rest``, ``gold_feature`` ``[P, N]``.
  """
  wc, num = cfg.world, cfg.bon_prompts * cfg.bon_samples
  k_prompts, k_samples = jax.random.split(jax.random.key(cfg.world_seed + 7))
  prompts = synthetic.sample_prompts(wc, k_prompts, cfg.bon_prompts)
  prompts = jnp.repeat(prompts, cfg.bon_samples, axis=0)
  # World parameters are jit arguments: one compiled program serves every world.
  sample = jax.jit(lambda w, p, k: synthetic.sample_responses(w, wc, p, k))
  parts = jax.jit(lambda w, tk, mk: synthetic.gold_components(w, wc, tk, mk))
  tokens, mask, rest, feature = [], [], [], []
  chunk = 8192
  for i in range(0, num, chunk):
    tk, mk = sample(data.world, prompts[i : i + chunk], jax.random.fold_in(k_samples, i))
    g = parts(data.world, tk, mk)
    tokens.append(tk)
    mask.append(mk)
    rest.append(np.asarray(g["rest"]))
    feature.append(np.asarray(g["feature"]))
  shape = (cfg.bon_prompts, cfg.bon_samples)
  rest, feature = np.concatenate(rest).reshape(shape), np.concatenate(feature).reshape(shape)
  return {
    "tokens": jnp.concatenate(tokens),
    "mask": jnp.concatenate(mask),
    "gold": rest + feature,
    "gold_rest": rest,
    "gold_feature": feature,
  }


def best_of_n(
  cfg: StudyConfig,
  data: WorldData,
  proxies: list[dict[str, Any]],
  workdir: str,
  *,
  num_comparisons: int | None = None,
) -> dict[str, Any]:
  """Best-of-n and the KL-regularised optimum against every proxy seed and against gold.

  ``bon_samples`` samples of ``pi_init`` for each of ``bon_prompts`` prompts are scored by gold
  (and its two parts, ``synthetic.gold_components``) and by every proxy; the unbiased
  estimator gives every n <= ``bon_max_n`` from them (``experiments.overoptimization_bon``).
  The oracle selects by gold itself.

  Returns (``S`` proxy sizes, ``seeds``, ``n_values``, ``B`` = ``bon_bootstrap``, ``T`` =
  ``len(tilted_betas)``; every reward re-centred so that ``pi_init`` scores 0):
    ``ns``, ``kl`` (``kl_bon``), ``ess`` (the estimator's pooled effective sample size per n)
    ``[n_values]``; ``gold``, ``proxy``, ``gold_rest``, ``gold_feature`` ``[S, seeds,
    n_values]``; ``oracle_gold``, ``oracle_gold_rest``, ``oracle_gold_feature``
    ``[n_values]``; ``boot_gold [S, seeds, B, n_values]`` and ``boot_oracle [B, n_values]``
    (bootstrap over prompts and samples within prompt); ``tilted_gold``, ``tilted_gold_rest``,
    ``tilted_gold_feature``, ``tilted_proxy``, ``tilted_kl``, ``tilted_ess`` ``[S, seeds, T]``
    (pi_beta of each proxy) and ``oracle_tilted_*`` ``[T]`` (pi_beta of gold: the frontier).
  """
  from experiments import overoptimization_bon as ob  # noqa: PLC0415  (imports jaxrm only)

  num = cfg.num_comparisons if num_comparisons is None else num_comparisons
  path = os.path.join(workdir, f"bon_n{num}.npz")
  fp = cfg.fingerprint(*BON_FIELDS)
  ns = bon_ns(cfg.bon_max_n)
  num_sizes, seeds, nv, nb = len(proxies), cfg.num_seeds, len(ns), len(cfg.tilted_betas)
  shapes = {k: (num_sizes, seeds, nv) for k in ("gold", "proxy") + BON_VALUES[1:]}
  shapes.update({f"oracle_{k}": (nv,) for k in BON_VALUES})
  shapes.update(boot_gold=(num_sizes, seeds, cfg.bon_bootstrap, nv))
  shapes.update(boot_oracle=(cfg.bon_bootstrap, nv))
  for k in BON_VALUES + ("proxy", "kl", "ess"):
    shapes[f"tilted_{k}"] = (num_sizes, seeds, nb)
    if k != "proxy":
      shapes[f"oracle_tilted_{k}"] = (nb,)
  template = {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in shapes.items()}
  loaded = load_tree(path, template, fp)
  if loaded is None:
    t = time.perf_counter()
    samples = bon_samples(cfg, data)
    values = np.stack([samples[k] for k in BON_VALUES])  # [3, P, N]
    shape = (cfg.bon_prompts, cfg.bon_samples)
    select = [samples["gold"]]  # the oracle first, then every proxy seed
    for p in proxies:
      scores = score_batches(
        proxy_model(cfg, p["size"]).apply, p["params"], samples["tokens"], samples["mask"]
      )
      select += list((scores - scores.mean(axis=1, keepdims=True)).reshape((-1,) + shape))
    select = np.stack(select)  # [1 + S * seeds, P, N]
    logging.info("best-of-n: %d samples scored in %.1fs", select[0].size, time.perf_counter() - t)
    result = {}
    curves = ob.bon_curves(select, np.concatenate([values, select[:1]]), ns)  # [K, 4, nv]
    own = np.stack(
      [ob.bon_curves(select[k : k + 1], select[k : k + 1], ns)[0, 0] for k in range(len(select))]
    )  # [K, nv]: each selector's own score
    curves = curves - curves[..., :1]
    own = own - own[:, :1]
    for j, k in enumerate(BON_VALUES):
      result[f"oracle_{k}"] = curves[0, j]
      result[k] = curves[1:, j].reshape(num_sizes, seeds, nv)
    result["proxy"] = own[1:].reshape(num_sizes, seeds, nv)
    boot = ob.bootstrap_bon(
      select,
      samples["gold"],
      ns,
      key=jax.random.key(cfg.world_seed + 13),
      num_boot=cfg.bon_bootstrap,
    )  # [K, B, nv]
    result["boot_oracle"] = boot[0]
    result["boot_gold"] = boot[1:].reshape(num_sizes, seeds, cfg.bon_bootstrap, nv)
    logging.info("best-of-n: estimator and bootstrap done at %.1fs", time.perf_counter() - t)
    tilt = ob.tilted_curves(select, values, cfg.tilted_betas)
    own_tilt = np.stack(
      [
        ob.tilted_curves(select[k : k + 1], select[k : k + 1], cfg.tilted_betas)["value"][0, :, 0]
        for k in range(len(select))
      ]
    )  # [K, T]
    for j, k in enumerate(BON_VALUES):
      result[f"oracle_tilted_{k}"] = tilt["value"][0, :, j]
      result[f"tilted_{k}"] = tilt["value"][1:, :, j].reshape(num_sizes, seeds, nb)
    result["tilted_proxy"] = own_tilt[1:].reshape(num_sizes, seeds, nb)
    for k in ("kl", "ess"):
      result[f"oracle_tilted_{k}"] = tilt[k][0]
      result[f"tilted_{k}"] = tilt[k][1:].reshape(num_sizes, seeds, nb)
    result = {k: np.asarray(v, np.float32) for k, v in result.items()}
    save_tree(path, result, {"fingerprint": fp, "seconds": time.perf_counter() - t})
    logging.info("best-of-n done in %.1fs", time.perf_counter() - t)
  else:
    result = loaded[0]
  ess = bon_lib.best_of_n_ess(cfg.bon_samples, ns) * cfg.bon_prompts
  return dict(result, ns=ns, kl=np.asarray(bon_lib.kl_bon(ns)), ess=ess)


# ----------------------------------------------------------------------------- driver
def validate(cfg: StudyConfig) -> None:
  """Raises :class:`jaxrm.io.rundir.ConfigError` naming the offending field."""

  need = functools.partial(rundir.check, cfg)

  rundir.check_finite_fields(cfg)
  for name in ("rm_learning_rate", "rl_learning_rate"):
    value = getattr(cfg, name)
    need(isinstance(value, (int, float)) and value > 0, name, "must be a number > 0")
  for name in ("rm_batch_size", "rl_batch_size", "bon_prompts", "num_comparisons", "world_threads"):
    value = getattr(cfg, name)
    need(
      isinstance(value, int) and not isinstance(value, bool) and value >= 1,
      name,
      "must be an int >= 1",
    )
  seeds = cfg.world_seeds
  need(isinstance(seeds, (tuple, list)) and len(seeds) >= 1, "world_seeds", "must name >= 1 seed")
  need(
    all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds),
    "world_seeds",
    "must be ints >= 0",
  )
  need(len(set(seeds)) == len(seeds), "world_seeds", "must be distinct")
  need(
    isinstance(cfg.bon_bootstrap, int) and cfg.bon_bootstrap >= 2, "bon_bootstrap", "must be >= 2"
  )
  need(
    len(cfg.tilted_betas) >= 1 and all(b > 0 for b in cfg.tilted_betas),
    "tilted_betas",
    "must be a non-empty tuple of numbers > 0",
  )
  for name in ("rm_epochs", "rl_steps"):
    need(isinstance(getattr(cfg, name), int) and getattr(cfg, name) >= 0, name, "must be >= 0")
  need(
    rundir.is_int(cfg.num_heldout) and cfg.num_heldout >= 1,
    "num_heldout",
    "must be >= 1 (the proxies' held-out accuracy)",
  )
  need(cfg.num_seeds >= 1, "num_seeds", "must be >= 1")
  need(len(cfg.proxy_sizes) > 0, "proxy_sizes", "must name at least one proxy architecture")
  names = [size.name for size in cfg.sizes]  # parses every size; a bad one is named
  need(
    len(set(names)) == len(names),
    "proxy_sizes",
    f"must have distinct layers x width: a proxy's name, cache and RL arm are {names}",
  )
  for n in (cfg.num_comparisons,) + tuple(cfg.data_sizes):
    field = "num_comparisons" if n == cfg.num_comparisons else "data_sizes"
    need(n >= cfg.rm_batch_size, field, f"size {n} is below rm_batch_size={cfg.rm_batch_size}")
  need(cfg.bon_max_n >= 1, "bon_max_n", "must be >= 1")
  need(cfg.bon_samples >= cfg.bon_max_n, "bon_samples", f"must be >= bon_max_n={cfg.bon_max_n}")
  need(
    cfg.labels in ("deterministic", "bradley_terry"),
    "labels",
    "must be 'deterministic' or 'bradley_terry'",
  )
  need(0.0 <= cfg.label_noise <= 0.5, "label_noise", "must lie in [0, 0.5]")
  need(cfg.kl_coef >= 0, "kl_coef", "must be >= 0")
  if cfg.rl_steps:
    need(
      1 <= cfg.rl_log_every <= cfg.rl_steps,
      "rl_log_every",
      f"must lie in [1, rl_steps={cfg.rl_steps}]",
    )
  validate_world(cfg.world, field="world")
  validate_fixed_length_rl(cfg.ppo, cfg.world, field="ppo")
  if cfg.rl_steps:
    from experiments import overoptimization_rl  # noqa: PLC0415  (it imports this module)

    overoptimization_rl.validate_rl(cfg)  # before any stage runs, not when RL starts


def _proxy_summary(proxies: list[dict[str, Any]]) -> list[dict[str, Any]]:
  return [
    {
      "name": p["size"].name,
      "num_layers": p["size"].num_layers,
      "width": p["size"].width,
      "num_params": p["num_params"],
      "heldout_accuracy": p["heldout_accuracy"],
      "train_loss": p["train_loss"],
    }
    for p in proxies
  ]


def run_world(
  cfg: StudyConfig, workdir: str, timing: dict[str, float], *, data_sweep: bool = True
) -> dict[str, Any]:
  """Every stage for one world (``cfg`` a per-world config); caches under ``workdir``.

  ``data_sweep``: also train and evaluate proxies on each of ``cfg.data_sizes``.
  """

  def timed(name, fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    timing[f"world{cfg.world_seed}/{name}"] = time.perf_counter() - t
    logging.info("world %d stage %s: %.1fs", cfg.world_seed, name, time.perf_counter() - t)
    return out

  os.makedirs(workdir, exist_ok=True)
  data = timed("world", build_world, cfg, workdir)
  proxies = timed("proxies", train_proxies, cfg, data, workdir)
  out = {"world_seed": cfg.world_seed, "proxies": _proxy_summary(proxies)}
  bon = timed("best_of_n", best_of_n, cfg, data, proxies, workdir)
  out["bon"] = {k: np.asarray(v).tolist() for k, v in bon.items()}
  logging.info(
    "world %d: best-of-n ESS at n=%d: %.1f pooled over %d prompts (%.2f per prompt)",
    cfg.world_seed,
    bon["ns"][-1],
    bon["ess"][-1],
    cfg.bon_prompts,
    bon["ess"][-1] / cfg.bon_prompts,
  )
  if cfg.rl_steps > 0:
    from experiments import overoptimization_rl  # noqa: PLC0415  (it imports this module)

    rl_out = timed("rl", overoptimization_rl.run_rl, cfg, data, proxies, workdir)
    out["rl"] = _jsonable(rl_out)
  if cfg.data_sizes and data_sweep:
    sweep = []
    for n in sorted(set(cfg.data_sizes)):
      px = timed(f"proxies_n{n}", train_proxies, cfg, data, workdir, num_comparisons=n)
      b = timed(f"best_of_n_n{n}", best_of_n, cfg, data, px, workdir, num_comparisons=n)
      sweep.append(
        {
          "num_comparisons": n,
          "proxies": _proxy_summary(px),
          "bon_gold": np.asarray(b["gold"]).tolist(),
        }
      )
    out["data_sweep"] = sweep
  return out


def _jsonable(tree):
  if isinstance(tree, dict):
    return {k: _jsonable(v) for k, v in tree.items()}
  if isinstance(tree, (str, int, float, bool)) or tree is None:
    return tree
  return np.asarray(tree).tolist()


def run_study(cfg: StudyConfig, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) every stage in every world; returns the measurements as a JSON-able dict.

  ``results['worlds'][i]`` holds world ``world_seeds[i]``: ``proxies``, ``bon`` (see
  :func:`best_of_n`), ``rl`` (``overoptimization_rl.run_rl``) and (first world only: the
  data-size sweep is not a trend check) ``data_sweep``;
  ``results['proxies']`` names the proxy sizes (held-out accuracy averaged over worlds).
  ``cfg.world_threads`` worlds run at once, in host threads.
  """
  validate(cfg)
  timing: dict[str, float] = {}
  results = {"config": rundir.config_to_json(cfg), "environment": environment.environment()}

  def world(i: int, seed: int) -> dict[str, Any]:
    wdir = os.path.join(workdir, f"world{seed}")
    return run_world(cfg.for_world(seed), wdir, timing, data_sweep=i == 0)

  with compile_cache.optimizations_off(cfg.fast_compiles):
    if cfg.world_threads == 1:  # in this thread, so that an interrupt stops the run at once
      worlds = [world(i, seed) for i, seed in enumerate(cfg.world_seeds)]
    else:  # an interrupt or a failure surfaces when the running worlds have finished
      with concurrent.futures.ThreadPoolExecutor(cfg.world_threads) as pool:
        worlds = list(pool.map(world, range(len(cfg.world_seeds)), cfg.world_seeds))
  results["worlds"] = worlds
  results["proxies"] = [
    dict(p, heldout_accuracy=[a for w in worlds for a in w["proxies"][i]["heldout_accuracy"]])
    for i, p in enumerate(worlds[0]["proxies"])
  ]
  # Wall-clock of this invocation: a stage loaded from the workdir's cache takes about 1 s.
  results["timing_this_invocation"] = timing
  return results
