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
from jaxrm.data.pairs import validate_world
from jaxrm.io import environment, rundir
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
    world: the synthetic world; ``world_seed`` its seed.
    data_sizes: extra comparison-data sizes: every proxy size is also trained on each.
    proxy_sizes: proxy architectures as ``LAYERSxWIDTHxHEADS`` (:meth:`ProxySize.parse`).
    ppo: the PPO hyperparameters of the RL stage (:class:`jaxrm.steps.rl.RLConfig`);
      ``max_new_tokens`` must equal the world's ``response_len``.
  """

  world: synthetic.WorldConfig = dataclasses.field(default_factory=synthetic.WorldConfig)
  world_seed: int = 0
  num_comparisons: int = 2500
  data_sizes: tuple[int, ...] = ()
  num_heldout: int = 2000
  labels: str = "deterministic"
  label_noise: float = 0.0
  proxy_sizes: tuple[str, ...] = ("1x4x1", "1x8x2", "1x16x2", "2x32x4", "2x64x4")
  num_seeds: int = 5
  rm_epochs: int = 3
  rm_batch_size: int = 64
  rm_learning_rate: float = 1e-3
  bon_prompts: int = 4
  bon_samples: int = 8192
  bon_max_n: int = 4096
  rl_steps: int = 300
  rl_batch_size: int = 64
  rl_learning_rate: float = 1e-5
  kl_coef: float = 0.0
  rl_log_every: int = 10
  ppo: rl_lib.RLConfig = dataclasses.field(default_factory=_default_ppo)
  # --- RL arm (experiments/overoptimization_rl.py)
  # rl_algorithm: 'ppo', 'rloo', 'grpo' or 'reinforce' (hyperparameters: ``ppo``, an RLConfig).
  # rl_eval_prompts: fixed held-out prompts sampled at every evaluation (every rl_log_every).
  # kl_sweep: KL coefficients of the sweep arms f"{reward}_kl{coef:g}" for kl_sweep_reward and
  # gold; kl_sweep_reward: a proxy size ('L1W8' or '1x8x2'), '' = the smallest-but-one proxy.
  rl_algorithm: str = "ppo"
  rl_eval_prompts: int = 256
  kl_sweep: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0)
  kl_sweep_reward: str = ""

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
WORLD_FIELDS = ("world", "world_seed", "num_train", "num_heldout", "labels", "label_noise")
PROXY_FIELDS = WORLD_FIELDS + ("num_seeds", "rm_epochs", "rm_batch_size", "rm_learning_rate")
BON_FIELDS = PROXY_FIELDS + ("proxy_sizes", "bon_prompts", "bon_samples", "bon_max_n")
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
)
# ``num_comparisons`` and ``data_sizes`` select the proxies' data (``num_train`` and the file
# names of each size's cache) and so enter every key through ``num_train`` and the paths.
SELECTION_FIELDS = ("num_comparisons", "data_sizes")

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


def best_of_n(
  cfg: StudyConfig,
  data: WorldData,
  proxies: list[dict[str, Any]],
  workdir: str,
  *,
  num_comparisons: int | None = None,
) -> dict[str, Any]:
  """Best-of-n against every proxy: gold and proxy reward for each n, per seed.

  Returns:
    ``ns [n_values]``, ``kl [n_values]`` (``kl_bon``), ``gold`` and ``proxy`` of shape
    ``[num_sizes, num_seeds, n_values]``, both re-centred so that ``pi_init`` (n = 1)
    scores 0.
  """
  num = cfg.num_comparisons if num_comparisons is None else num_comparisons
  path = os.path.join(workdir, f"bon_n{num}.npz")
  fp = cfg.fingerprint(*BON_FIELDS)
  ns = bon_ns(cfg.bon_max_n)
  shape = (len(proxies), cfg.num_seeds, len(ns))
  template = {
    "gold": jax.ShapeDtypeStruct(shape, jnp.float32),
    "proxy": jax.ShapeDtypeStruct(shape, jnp.float32),
  }
  loaded = load_tree(path, template, fp)
  if loaded is None:
    t = time.perf_counter()
    wc = cfg.world
    k_prompts, k_samples = jax.random.split(jax.random.key(cfg.world_seed + 7))
    prompts = synthetic.sample_prompts(wc, k_prompts, cfg.bon_prompts)
    prompts = jnp.repeat(prompts, cfg.bon_samples, axis=0)
    sample = jax.jit(lambda p, k: synthetic.sample_responses(data.world, wc, p, k))
    tokens, mask = [], []
    for i in range(0, prompts.shape[0], 8192):
      tk, mk = sample(prompts[i : i + 8192], jax.random.fold_in(k_samples, i))
      tokens.append(tk)
      mask.append(mk)
    tokens, mask = jnp.concatenate(tokens), jnp.concatenate(mask)
    gold_fn = lambda params, tk, mk: synthetic.gold_reward(params, wc, tk, mk)
    gold = score_batches(gold_fn, jax.tree.map(lambda x: x[None], data.world), tokens, mask)[0]
    gold = gold.reshape(cfg.bon_prompts, cfg.bon_samples)
    out_gold, out_proxy = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    for i, p in enumerate(proxies):
      scores = score_batches(proxy_model(cfg, p["size"]).apply, p["params"], tokens, mask)
      scores = scores - scores.mean(axis=1, keepdims=True)
      for s in range(cfg.num_seeds):
        g, pr = bon_lib.batched_best_of_n_expected_reward(
          scores[s].reshape(cfg.bon_prompts, cfg.bon_samples), gold, ns
        )
        out_gold[i, s], out_proxy[i, s] = g, pr
    # Re-centre so that pi_init (n = 1) scores 0 on these prompts, as in Gao et al.
    out_gold -= out_gold[..., :1]
    out_proxy -= out_proxy[..., :1]
    result = {"gold": out_gold, "proxy": out_proxy}
    save_tree(path, result, {"fingerprint": fp, "seconds": time.perf_counter() - t})
    logging.info("best-of-n done in %.1fs", time.perf_counter() - t)
  else:
    result = loaded[0]
  return dict(result, ns=ns, kl=np.asarray(bon_lib.kl_bon(ns)))


# ----------------------------------------------------------------------------- driver
def validate(cfg: StudyConfig) -> None:
  """Raises :class:`jaxrm.io.rundir.ConfigError` naming the offending field."""

  need = functools.partial(rundir.check, cfg)

  rundir.check_finite_fields(cfg)
  for name in ("rm_learning_rate", "rl_learning_rate"):
    value = getattr(cfg, name)
    need(isinstance(value, (int, float)) and value > 0, name, "must be a number > 0")
  for name in ("rm_batch_size", "rl_batch_size", "bon_prompts", "num_comparisons"):
    value = getattr(cfg, name)
    need(
      isinstance(value, int) and not isinstance(value, bool) and value >= 1,
      name,
      "must be an int >= 1",
    )
  for name in ("world_seed", "num_heldout", "rm_epochs", "rl_steps"):
    need(isinstance(getattr(cfg, name), int) and getattr(cfg, name) >= 0, name, "must be >= 0")
  need(cfg.num_seeds >= 1, "num_seeds", "must be >= 1")
  need(len(cfg.proxy_sizes) > 0, "proxy_sizes", "must name at least one proxy architecture")
  cfg.sizes  # noqa: B018  (parses every size; raises ConfigError naming a bad one)
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
  need(isinstance(cfg.ppo, rl_lib.RLConfig), "ppo", "must be a jaxrm.steps.rl.RLConfig")
  try:
    dataclasses.replace(cfg.ppo)
  except (TypeError, ValueError) as e:
    raise ConfigError("ppo", cfg.ppo, str(e)) from None
  need(
    cfg.ppo.max_new_tokens == cfg.world.response_len,
    "ppo.max_new_tokens",
    f"must equal world.response_len={cfg.world.response_len} (fixed-length responses)",
  )
  need(cfg.ppo.eos_id is None, "ppo.eos_id", "must be None (fixed-length responses)")


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


def run_study(cfg: StudyConfig, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) every stage and returns the raw measurements as a JSON-able dict."""
  validate(cfg)
  timing = {}
  results = {"config": rundir.config_to_json(cfg), "environment": environment.environment()}

  def timed(name, fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    timing[name] = time.perf_counter() - t
    logging.info("stage %s: %.1fs", name, timing[name])
    return out

  data = timed("world", build_world, cfg, workdir)
  proxies = timed("proxies", train_proxies, cfg, data, workdir)
  results["proxies"] = _proxy_summary(proxies)
  bon = timed("best_of_n", best_of_n, cfg, data, proxies, workdir)
  results["bon"] = {k: np.asarray(v).tolist() for k, v in bon.items()}
  if cfg.rl_steps > 0:
    from experiments import overoptimization_rl  # noqa: PLC0415  (it imports this module)

    rl_out = timed("rl", overoptimization_rl.run_rl, cfg, data, proxies, workdir)
    results["rl"] = {k: np.asarray(v).tolist() for k, v in rl_out.items()}
  if cfg.data_sizes:
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
    results["data_sweep"] = sweep
  # Wall-clock of this invocation: a stage loaded from the workdir's cache takes about 1 s.
  results["timing_this_invocation"] = timing
  return results
