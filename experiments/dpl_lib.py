"""Stages of the distributional preference learning (DPL) study in the hidden-context world.

Siththaranjan, Laidlaw & Hadfield-Menell (2023) in jaxrm's synthetic world
(:mod:`jaxrm.data.synthetic`) with two annotator groups (:mod:`jaxrm.data.hidden_context`):
group 1's gold is the world's gold, group 2 weighs the planted feature by
``hidden.group2_feature_weight``, and each comparison is labelled by group 2 with probability
``hidden.group2_prob``. Per world (each stage cached under ``workdir/world{seed}/``, keyed by
the fields it reads, like ``experiments.overoptimization_lib``):

1. ``build_world``: the world (the over-optimisation study's, same seed streams), the
   hidden-context comparisons, the *control* comparisons (the same pairs labelled by group 1
   alone) and held-out pairs whose responses carry the diagnostics.
2. ``train_models``: ``num_seeds`` reward models of each kind, all seeds at once: Bradley–Terry
   (:class:`jaxrm.models.reward_model.RewardModel`), mean-variance and categorical DPL
   (:class:`jaxrm.models.distributional_rm.DistributionalRewardModel`) on the hidden-context
   labels, and (``control``) the two DPL heads on the control labels.
3. ``diagnostics``: every model's mean and standard deviation on the held-out responses, with
   both groups' gold.
4. ``best_of_n``: ``bon_samples`` ``pi_init`` responses to each of ``bon_prompts`` prompts,
   selected by each model's mean and by each DPL model's lower ``alpha``-quantile (the
   risk-averse objective); the unbiased estimator of each group's gold for every n, and its
   bootstrap over prompts and samples (``experiments.overoptimization_bon``).
"""

from __future__ import annotations

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

from experiments import overoptimization_bon as ob
from experiments.overoptimization_lib import ProxySize, bon_ns, score_batches
from jaxrm.data import hidden_context, synthetic
from jaxrm.data.pairs import validate_world
from jaxrm.io import environment, rundir
from jaxrm.io.rundir import ConfigError
from jaxrm.math import best_of_n as bon_lib
from jaxrm.math import preference
from jaxrm.models.distributional_rm import DistributionalRewardModel, Head
from jaxrm.models.reward_model import RewardModel
from jaxrm.steps import rm_step
from jaxrm.steps.rm_sweep import RewardModelSweep

KINDS = ("bradley_terry", "mean_variance", "categorical")
DPL_KINDS = KINDS[1:]


@dataclasses.dataclass
class DPLConfig:
  """All settings of the study (``experiments/configs/dpl.py``; every field overridable).

  Attributes:
    world: the synthetic world (the over-optimisation study's default).
    hidden: the two annotator groups (:class:`jaxrm.data.hidden_context.HiddenContextConfig`).
    world_seeds: one world per seed.
    num_comparisons: training pairs (hidden-context labels; the control labels the same pairs).
    num_heldout: held-out pairs; the diagnostics use their ``2 * num_heldout`` responses.
    proxy_size: every model's backbone, ``LAYERSxWIDTHxHEADS``.
    num_seeds: models per kind (seeds vary initialisation and data order).
    num_atoms, atom_low, atom_high: the categorical head (the paper's code: 10 on [0, 1]).
    entropy_coef: the categorical loss's batch-entropy bonus (the paper's code: 0.1).
    variance_penalty: the mean-variance loss's penalty (the paper's code: 0).
    alpha: the risk-averse objective's quantile (the paper: 0.01).
    control: also train the DPL heads on the control labels (the r^2 comparison).
    bon_prompts, bon_samples, bon_max_n, bon_bootstrap: best-of-n as in the over-optimisation
      study.
    smoke: labels the outputs as a smoke run (the ``quick`` variant).
  """

  world: synthetic.WorldConfig = dataclasses.field(default_factory=synthetic.WorldConfig)
  hidden: hidden_context.HiddenContextConfig = dataclasses.field(
    default_factory=hidden_context.HiddenContextConfig
  )
  world_seeds: tuple[int, ...] = (0, 1)
  num_comparisons: int = 4000
  num_heldout: int = 2000
  proxy_size: str = "2x32x4"
  num_seeds: int = 3
  rm_epochs: int = 3
  rm_batch_size: int = 64
  rm_learning_rate: float = 1e-3
  num_atoms: int = 10
  atom_low: float = 0.0
  atom_high: float = 1.0
  entropy_coef: float = 0.1
  variance_penalty: float = 0.0
  alpha: float = 0.01
  control: bool = True
  bon_prompts: int = 32
  bon_samples: int = 512
  bon_max_n: int = 256
  bon_bootstrap: int = 200
  smoke: bool = False

  @property
  def size(self) -> ProxySize:
    try:
      return ProxySize.parse(self.proxy_size)
    except ConfigError as e:
      raise ConfigError("proxy_size", self.proxy_size, e.message) from None

  def head(self, kind: str) -> Head:
    return Head(kind, num_atoms=self.num_atoms, atom_low=self.atom_low, atom_high=self.atom_high)

  def fingerprint(self, *fields: str, seed: int) -> str:
    return rundir.fingerprint({"world_seed": seed, **{f: getattr(self, f) for f in fields}})


WORLD_FIELDS = ("world", "hidden", "num_comparisons", "num_heldout")
MODEL_FIELDS = WORLD_FIELDS + (
  "proxy_size",
  "num_seeds",
  "rm_epochs",
  "rm_batch_size",
  "rm_learning_rate",
  "num_atoms",
  "atom_low",
  "atom_high",
  "entropy_coef",
  "variance_penalty",
)
BON_FIELDS = MODEL_FIELDS + ("control", "alpha", "bon_prompts", "bon_samples", "bon_max_n")
BON_FIELDS += ("bon_bootstrap",)
SELECTION_FIELDS = ("world_seeds",)  # selects the worlds, each keyed by its seed
LABEL_FIELDS = ("smoke",)

save_tree, load_tree = rundir.save_tree, rundir.load_tree


def validate(cfg: DPLConfig) -> None:
  """Raises :class:`jaxrm.io.rundir.ConfigError` naming the offending field."""
  need = functools.partial(rundir.check, cfg)
  rundir.check_finite_fields(cfg)
  for name in ("num_comparisons", "num_heldout", "num_seeds", "rm_epochs", "rm_batch_size"):
    value = getattr(cfg, name)
    need(rundir.is_int(value) and value >= 1, name, "must be an int >= 1")
  for name in ("bon_prompts", "bon_max_n", "num_atoms"):
    value = getattr(cfg, name)
    need(rundir.is_int(value) and value >= 1, name, "must be an int >= 1")
  need(cfg.num_atoms >= 2, "num_atoms", "must be >= 2")
  need(cfg.atom_low < cfg.atom_high, "atom_low", f"must be < atom_high={cfg.atom_high}")
  need(cfg.rm_learning_rate > 0, "rm_learning_rate", "must be a number > 0")
  need(cfg.entropy_coef >= 0, "entropy_coef", "must be >= 0")
  need(cfg.variance_penalty >= 0, "variance_penalty", "must be >= 0")
  need(0 < cfg.alpha < 0.5, "alpha", "must lie in (0, 0.5) (a lower quantile)")
  need(
    cfg.num_comparisons >= cfg.rm_batch_size,
    "num_comparisons",
    f"must be >= rm_batch_size={cfg.rm_batch_size}",
  )
  seeds = cfg.world_seeds
  need(isinstance(seeds, (tuple, list)) and len(seeds) >= 1, "world_seeds", "must name >= 1 seed")
  need(all(rundir.is_int(s) and s >= 0 for s in seeds), "world_seeds", "must be ints >= 0")
  need(len(set(seeds)) == len(seeds), "world_seeds", "must be distinct")
  need(cfg.bon_samples >= cfg.bon_max_n, "bon_samples", f"must be >= bon_max_n={cfg.bon_max_n}")
  need(rundir.is_int(cfg.bon_bootstrap) and cfg.bon_bootstrap >= 2, "bon_bootstrap", "must be >= 2")
  cfg.size  # noqa: B018  (raises ConfigError naming proxy_size)
  validate_world(cfg.world, field="world")
  need(
    isinstance(cfg.hidden, hidden_context.HiddenContextConfig),
    "hidden",
    "must be a HiddenContextConfig",
  )
  try:
    dataclasses.replace(cfg.hidden)
  except ValueError as e:
    field = str(e).split(" ")[0].replace("HiddenContextConfig.", "hidden.")
    raise ConfigError(field, getattr(cfg.hidden, field.split(".")[-1], "?"), str(e)) from None
  need(
    0 < cfg.hidden.group2_prob < 1,
    "hidden.group2_prob",
    "must lie in (0, 1): both groups must label some pairs",
  )


# ----------------------------------------------------------------------------- stage 1
def build_world(cfg: DPLConfig, seed: int, workdir: str) -> dict[str, Any]:
  """The world, training pairs (hidden-context and control labels) and held-out pairs."""
  path = os.path.join(workdir, "world.npz")
  fp = cfg.fingerprint(*WORLD_FIELDS, seed=seed)
  k_world, k_train, k_heldout = jax.random.split(jax.random.key(seed), 3)
  control_hc = dataclasses.replace(cfg.hidden, group2_prob=0.0)

  def make():
    world = synthetic.init_world(cfg.world, k_world)
    mk = functools.partial(hidden_context.make_comparisons, world, cfg.world)
    train = mk(cfg.hidden, k_train, num=cfg.num_comparisons)
    control = mk(control_hc, k_train, num=cfg.num_comparisons)  # the same pairs
    heldout = mk(cfg.hidden, k_heldout, num=cfg.num_heldout)
    return world, train, control, heldout

  loaded = load_tree(path, jax.eval_shape(make), fp)
  if loaded is None:
    tree = make()
    save_tree(path, tree, {"fingerprint": fp})
  else:
    tree = loaded[0]
  return dict(zip(("world", "train", "control", "heldout"), tree))


# ----------------------------------------------------------------------------- stage 2
def model_of(cfg: DPLConfig, kind: str):
  size = cfg.size
  tcfg = cfg.world.reward_config(
    num_layers=size.num_layers, width=size.width, num_heads=size.num_heads
  )
  if kind == "bradley_terry":
    return RewardModel(tcfg)
  return DistributionalRewardModel(tcfg, head=cfg.head(kind))


def arms(cfg: DPLConfig) -> list[tuple[str, str]]:
  """``(kind, labels)`` of every trained model group; labels ``'hidden'`` or ``'control'``."""
  out = [(k, "hidden") for k in KINDS]
  return out + ([(k, "control") for k in DPL_KINDS] if cfg.control else [])


def _loss(cfg: DPLConfig, kind: str):
  if kind == "bradley_terry":
    return lambda oc, orj, *, weights=None, labels=None: preference.bradley_terry_loss(
      oc, orj, weights=weights, labels=labels
    )
  hyper = (
    {"entropy_coef": cfg.entropy_coef}
    if kind == "categorical"
    else {"variance_penalty": cfg.variance_penalty}
  )
  return cfg.head(kind).loss_fn(**hyper)


def train_models(cfg: DPLConfig, seed: int, data: dict, workdir: str) -> dict[str, Any]:
  """Trains every arm's ``num_seeds`` models; returns ``{f'{kind}/{labels}': params}``."""
  steps = cfg.rm_epochs * cfg.num_comparisons // cfg.rm_batch_size
  out = {}
  for kind, labels in arms(cfg):
    fp = cfg.fingerprint(*MODEL_FIELDS, seed=seed) + f"-{kind}-{labels}"
    path = os.path.join(workdir, "models", f"{kind}_{labels}.npz")
    model = model_of(cfg, kind)
    pairs = data[{"hidden": "train", "control": "control"}[labels]].as_batch()
    sweep = RewardModelSweep(
      step_fn=rm_step.output_pair_step,  # the loss sees [batch, ...] outputs
      init_fn=lambda k, m=model, p=pairs: m.init(k, p["chosen"][:1], p["chosen_mask"][:1]),
      apply_fn=model.apply,
      loss_fn=_loss(cfg, kind),
      optimizer=optax.adamw(cfg.rm_learning_rate),
      batch_size=cfg.rm_batch_size,
    )
    # The same seeds for every arm (paired comparisons): key(2000 + world seed).
    keys = jax.random.split(jax.random.key(2000 + seed), cfg.num_seeds)
    template = jax.eval_shape(lambda s=sweep, k=keys: s.init(k).params)
    loaded = load_tree(path, template, fp)
    if loaded is None:
      t = time.perf_counter()
      logging.info("world %d: training %d %s models (%s labels), %d steps", seed, cfg.num_seeds,
                   kind, labels, steps)  # fmt: skip
      states, metrics = sweep.train(sweep.init(keys), pairs, num_steps=steps)
      meta = {
        "fingerprint": fp,
        "train_loss": np.asarray(metrics["loss"][:, -20:].mean(axis=1)).tolist(),
        "num_skipped": np.asarray(states.num_skipped).tolist(),
        "seconds": time.perf_counter() - t,
      }
      save_tree(path, states.params, meta)
      logging.info("world %d: %s/%s trained in %.0fs", seed, kind, labels, meta["seconds"])
      out[f"{kind}/{labels}"] = (states.params, meta)
    else:
      out[f"{kind}/{labels}"] = loaded
  return out


def _readouts(cfg: DPLConfig, kind: str, params, tokens, mask) -> dict[str, np.ndarray]:
  """Mean, std and quantile ``[seeds, n]`` of every seed's model."""
  model = model_of(cfg, kind)
  if kind == "bradley_terry":
    r = score_batches(model.apply, params, tokens, mask)
    return {"mean": r, "std": np.zeros_like(r), "quantile": r}
  head = cfg.head(kind)

  def fn(p, t, m):
    out = model.apply(p, t, m)
    return jnp.stack([head.mean(out), head.std(out), head.quantile(out, alpha=cfg.alpha)])

  vfn = jax.jit(jax.vmap(fn, in_axes=(0, None, None)))
  chunk = 8192
  parts = [np.asarray(vfn(params, tokens[i : i + chunk], mask[i : i + chunk]))
           for i in range(0, tokens.shape[0], chunk)]  # fmt: skip
  out = np.concatenate(parts, axis=-1)  # [seeds, 3, n]
  return {"mean": out[:, 0], "std": out[:, 1], "quantile": out[:, 2]}


# ----------------------------------------------------------------------------- stage 3
def diagnostics(cfg: DPLConfig, data: dict, models: dict) -> dict[str, Any]:
  """Held-out responses: both groups' gold ``[n, 2]`` and every arm's readouts ``[seeds, n]``."""
  h = data["heldout"]
  tokens = jnp.concatenate([h.chosen, h.rejected])
  mask = jnp.concatenate([h.mask, h.mask])
  golds = np.concatenate([np.asarray(h.golds_chosen), np.asarray(h.golds_rejected)])
  out = {"golds": golds, "arms": {}}
  for name, (params, _) in models.items():
    out["arms"][name] = _readouts(cfg, name.split("/")[0], params, tokens, mask)
  return out


# ----------------------------------------------------------------------------- stage 4
def selectors(cfg: DPLConfig) -> list[str]:
  """Names of the best-of-n selectors: ``'{kind}/{objective}'`` (hidden-context models)."""
  return [f"{k}/mean" for k in KINDS] + [f"{k}/quantile" for k in DPL_KINDS]


def best_of_n(cfg: DPLConfig, seed: int, data: dict, models: dict, workdir: str) -> dict:
  """Each group's best-of-n gold for every selector and seed, with bootstrap replicates.

  Returns:
    ``ns``, ``kl`` ``[n_values]``; ``gold [S, seeds, 2, n_values]`` (selector, seed, group);
    ``boot [S, seeds, 2, B, n_values]`` (prompts and samples resampled, the same draws for
    every selector and group); ``oracle [2, 2, n_values]`` (selected by group g's gold, gold of
    both groups); re-centred so that ``pi_init`` scores 0.
  """
  path = os.path.join(workdir, "bon.npz")
  fp = cfg.fingerprint(*BON_FIELDS, seed=seed)
  ns = bon_ns(cfg.bon_max_n)
  names, seeds, nv, nb = selectors(cfg), cfg.num_seeds, len(ns), cfg.bon_bootstrap
  template = {
    "gold": jax.ShapeDtypeStruct((len(names), seeds, 2, nv), jnp.float32),
    "boot": jax.ShapeDtypeStruct((len(names), seeds, 2, nb, nv), jnp.float32),
    "oracle": jax.ShapeDtypeStruct((2, 2, nv), jnp.float32),
  }
  loaded = load_tree(path, template, fp)
  if loaded is None:
    t = time.perf_counter()
    wc, num = cfg.world, cfg.bon_prompts * cfg.bon_samples
    k_prompts, k_samples = jax.random.split(jax.random.key(seed + 7))
    prompts = jnp.repeat(synthetic.sample_prompts(wc, k_prompts, cfg.bon_prompts),
                         cfg.bon_samples, axis=0)  # fmt: skip
    sample = jax.jit(lambda w, p, k: synthetic.sample_responses(w, wc, p, k))
    golds_fn = jax.jit(lambda w, tk, mk: hidden_context.group_golds(w, wc, cfg.hidden, tk, mk))
    tokens, mask, golds = [], [], []
    for i in range(0, num, 8192):
      tk, mk = sample(data["world"], prompts[i : i + 8192], jax.random.fold_in(k_samples, i))
      tokens.append(tk), mask.append(mk), golds.append(np.asarray(golds_fn(data["world"], tk, mk)))
    tokens, mask = jnp.concatenate(tokens), jnp.concatenate(mask)
    shape = (cfg.bon_prompts, cfg.bon_samples)
    values = np.moveaxis(np.concatenate(golds), -1, 0).reshape((2,) + shape)  # [2, P, N]
    select = []
    for name in names:
      kind, objective = name.split("/")
      r = _readouts(cfg, kind, models[f"{kind}/hidden"][0], tokens, mask)[objective]
      select += list(r.reshape((-1,) + shape))
    select = np.stack(select)  # [S * seeds, P, N]
    logging.info("world %d best-of-n: %d samples scored in %.0fs", seed, num,
                 time.perf_counter() - t)  # fmt: skip
    curves = ob.bon_curves(np.concatenate([values, select]), values, ns)  # [2 + K, 2, nv]
    curves = curves - curves[..., :1]
    key = jax.random.key(seed + 13)
    boot = np.stack(
      [ob.bootstrap_bon(select, values[g], ns, key=key, num_boot=nb) for g in range(2)], axis=1
    )  # [K, 2, B, nv]: the same key, so the same resamples for both groups
    k = len(names)
    result = {
      "gold": curves[2:].reshape(k, seeds, 2, nv),
      "boot": boot.reshape(k, seeds, 2, nb, nv),
      "oracle": curves[:2],
    }
    result = {k: np.asarray(v, np.float32) for k, v in result.items()}
    save_tree(path, result, {"fingerprint": fp, "seconds": time.perf_counter() - t})
    logging.info("world %d best-of-n done in %.0fs", seed, time.perf_counter() - t)
  else:
    result = loaded[0]
  return dict(result, ns=ns, kl=np.asarray(bon_lib.kl_bon(ns)))


# ----------------------------------------------------------------------------- driver
def run_study(cfg: DPLConfig, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) every stage in every world; returns the measurements (numpy inside)."""
  validate(cfg)
  timing: dict[str, float] = {}
  worlds = []
  for seed in cfg.world_seeds:
    wdir = os.path.join(workdir, f"world{seed}")
    os.makedirs(wdir, exist_ok=True)

    def timed(name, fn, *args, seed=seed):
      t = time.perf_counter()
      out = fn(*args)
      timing[f"world{seed}/{name}"] = time.perf_counter() - t
      logging.info("world %d stage %s: %.1fs", seed, name, timing[f"world{seed}/{name}"])
      return out

    data = timed("world", build_world, cfg, seed, wdir)
    models = timed("models", train_models, cfg, seed, data, wdir)
    diag = timed("diagnostics", diagnostics, cfg, data, models)
    bon = timed("best_of_n", best_of_n, cfg, seed, data, models, wdir)
    worlds.append(
      {
        "world_seed": seed,
        "training": {name: meta for name, (_, meta) in models.items()},
        "group2_label_share": float(np.mean(np.asarray(data["train"].group))),
        "diagnostics": diag,
        "bon": bon,
      }
    )
  return {
    "config": rundir.config_to_json(cfg),
    "environment": environment.environment(),
    "worlds": worlds,
    "timing_this_invocation": timing,
  }
