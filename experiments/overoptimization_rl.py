"""Stage 4 of the reward over-optimisation study: RL against each proxy, gold, and a KL sweep.

Arms (:func:`arms`): one per proxy size (named after it, e.g. ``"L1W8"``, with the config's
``kl_coef``), the oracle arm ``"gold"`` (the same RL against gold itself), and the KL-penalty
sweep ``f"{reward}_kl{coef:g}"`` for the reward ``kl_sweep_reward`` and for gold. Every arm
runs ``num_seeds`` seeds (seed ``s`` of a proxy arm optimises proxy member ``s``).

Algorithm: ``cfg.rl_algorithm`` (``'ppo'``, ``'rloo'``, ``'grpo'``, ``'reinforce'``) through
:func:`jaxrm.steps.rl.make_step`, with every hyperparameter in ``cfg.ppo`` (an
:class:`jaxrm.steps.rl.RLConfig`, which holds those of every algorithm).

Measurements (:func:`run_rl`): every ``rl_log_every`` steps the current policy of every seed
is sampled on a FIXED batch of ``rl_eval_prompts`` held-out prompts with a FIXED key
(:func:`eval_batch`; a key stream disjoint from the training prompts, best-of-n's and the
proxy offsets'), and scored: gold and its two parts (:func:`jaxrm.data.synthetic.gold_components`),
the optimised reward re-centred so that ``pi_init`` scores 0 (:func:`proxy_offsets`; the gold
arm's is gold itself), the exact sequence KL from the full next-token distributions and the k1
estimate. The training rollouts give the window means ``train_gold`` and ``train_kl_k1``.

Compilation: the chunk of ``rl_log_every`` steps (a ``lax.scan`` over steps, ``vmap`` over
arms x seeds, the held-out evaluation at its end) takes the world, the reward parameters and
the states as ARGUMENTS and is built once per (reward architecture, settings)
(:func:`chunk_fn`), so every world, seed and arm with the same shapes reuses one compiled
program; a later process loads it from the scripts' caches (the lowered program from
:mod:`jaxrm.io.program_cache`, the executable from the compilation cache) instead of tracing,
lowering and compiling it again. All arms of one reward (the
default arm and its KL sweep) run as one vmapped batch, ``kl_coef`` a per-member value in the
state.

Cache: each arm's curves under ``workdir/rl/ARM.npz``, keyed by ``RL_FIELDS`` and the arm; the
arms of one reward are computed together, so a crash loses at most the reward being run.
The objective-mismatch study reuses :func:`run_rl_one` and :func:`proxy_offsets`.
"""

from __future__ import annotations

import collections
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

from experiments.overoptimization_lib import (
  RL_FIELDS,
  ProxySize,
  StudyConfig,
  WorldData,
  load_tree,
  proxy_model,
  save_tree,
  score_batches,
)
from jaxrm.data import synthetic
from jaxrm.io import compile_cache, program_cache, rundir
from jaxrm.io.rundir import ConfigError
from jaxrm.models.policy import transformer_policy
from jaxrm.steps import rl as rl_lib
from jaxrm.steps import rl_diagnostics

GOLD = "gold"
# Held-out evaluation: means over the eval prompts of one sample each (fixed key).
EVAL_KEYS = ("kl_exact", "kl_k1", "gold", "gold_rest", "gold_feature", "proxy")
# Window means over the training rollouts.
TRAIN_KEYS = ("train_gold", "train_kl_k1")
CURVE_KEYS = EVAL_KEYS + TRAIN_KEYS
# Streams folded into key(world_seed) for the held-out prompts and their sampling key (no other
# stage derives keys this way: the world splits key(world_seed), best-of-n uses
# key(world_seed + 7), the offsets key(world_seed + 11), training key(2000 + i)).
_EVAL_PROMPT_STREAM, _EVAL_SAMPLE_STREAM = 7_000_001, 7_000_002
_GOLD_SEED_INDEX = 999  # training keys of the gold arms: key(2000 + 999)
# Times each reward's chunk was traced (= compiled) in this process: one per member count.
TRACES: collections.Counter = collections.Counter()


def _rl_config(cfg: StudyConfig) -> rl_lib.RLConfig:
  """``cfg.ppo``, re-validated (command-line overrides bypass its ``__post_init__``)."""
  return dataclasses.replace(cfg.ppo)


# ----------------------------------------------------------------------------- config
def sweep_reward(cfg: StudyConfig) -> str:
  """The proxy size name of the KL sweep: ``kl_sweep_reward`` or the smallest-but-one proxy.

  ``kl_sweep_reward`` may be a size name (``'L1W8'``) or spec (``'1x8x2'``); ``''`` picks the
  second-smallest proxy by parameter count (the only one when there is one).
  """
  sizes = cfg.sizes
  if cfg.kl_sweep_reward:
    text = cfg.kl_sweep_reward
    for s in sizes:
      if text in (s.name, f"{s.num_layers}x{s.width}x{s.num_heads}"):
        return s.name
    raise ConfigError(
      "kl_sweep_reward", text, f"must name a proxy size, one of {[s.name for s in sizes]}"
    )
  order = sorted(sizes, key=lambda s: (s.num_layers * s.width * s.width, s.num_layers, s.width))
  return order[min(1, len(order) - 1)].name


def validate_rl(cfg: StudyConfig) -> None:
  """Raises :class:`jaxrm.io.rundir.ConfigError` naming the offending RL field."""
  need = functools.partial(rundir.check, cfg)
  need(
    cfg.rl_algorithm in rl_lib.ALGORITHMS,
    "rl_algorithm",
    f"must be one of {rl_lib.ALGORITHMS}",
  )
  need(
    isinstance(cfg.rl_eval_prompts, int)
    and not isinstance(cfg.rl_eval_prompts, bool)
    and cfg.rl_eval_prompts >= 1,
    "rl_eval_prompts",
    "must be an int >= 1",
  )
  need(
    isinstance(cfg.kl_sweep, tuple)
    and all(isinstance(c, (int, float)) and np.isfinite(c) and c >= 0 for c in cfg.kl_sweep),
    "kl_sweep",
    "must be a tuple of finite numbers >= 0",
  )
  need(
    len(set(f"{c:g}" for c in cfg.kl_sweep)) == len(cfg.kl_sweep),
    "kl_sweep",
    "must not repeat a coefficient (arm names use :g)",
  )
  sweep_reward(cfg)  # raises for a kl_sweep_reward that names no proxy
  need(
    cfg.rl_compile_opt_level in compile_cache.OPT_LEVELS,
    "rl_compile_opt_level",
    "must be -1 (XLA's default) or 0..3",
  )
  if cfg.rl_algorithm in ("ppo", "grpo"):  # the algorithms with minibatches
    grouped = cfg.rl_algorithm == "grpo"
    num = cfg.rl_batch_size * (cfg.ppo.num_samples if grouped else 1)
    need(
      num % cfg.ppo.num_minibatches == 0,
      "ppo.num_minibatches",
      f"must divide the {num} sequences of a step (rl_batch_size"
      + (" x ppo.num_samples)" if grouped else ")"),
    )


def arms(cfg: StudyConfig) -> dict[str, dict[str, Any]]:
  """``{ARM: {'reward': 'gold' | proxy size name, 'kl_coef': float}}`` in run order."""
  out = {s.name: {"reward": s.name, "kl_coef": float(cfg.kl_coef)} for s in cfg.sizes}
  out[GOLD] = {"reward": GOLD, "kl_coef": float(cfg.kl_coef)}
  for reward in (sweep_reward(cfg), GOLD):
    for c in cfg.kl_sweep:
      out[f"{reward}_kl{c:g}"] = {"reward": reward, "kl_coef": float(c)}
  return out


# ----------------------------------------------------------------------------- evaluation
def eval_batch(cfg: StudyConfig) -> tuple[jax.Array, jax.Array]:
  """The fixed held-out prompts ``[rl_eval_prompts, prompt_len]`` and their sampling key."""
  root = jax.random.key(cfg.world_seed)
  prompts = synthetic.sample_prompts(
    cfg.world, jax.random.fold_in(root, _EVAL_PROMPT_STREAM), cfg.rl_eval_prompts
  )
  return prompts, jax.random.fold_in(root, _EVAL_SAMPLE_STREAM)


@functools.partial(jax.jit, static_argnums=1)
def _sample_init(world, wc, prompts, key):
  return synthetic.sample_responses(world, wc, prompts, key)


def init_samples(cfg: StudyConfig, data: WorldData) -> tuple[jax.Array, jax.Array]:
  """4096 ``pi_init`` samples on fresh prompts (key ``world_seed + 11``) for the offsets."""
  k_prompts, k_samples = jax.random.split(jax.random.key(cfg.world_seed + 11))
  prompts = synthetic.sample_prompts(cfg.world, k_prompts, 4096)
  return _sample_init(data.world, cfg.world, prompts, k_samples)


def proxy_offsets(
  cfg: StudyConfig, data: WorldData, proxy: dict[str, Any], samples=None
) -> np.ndarray:
  """Mean proxy score ``[seeds]`` under ``pi_init`` (:func:`init_samples`; to re-centre RL)."""
  tokens, mask = init_samples(cfg, data) if samples is None else samples
  scores = score_batches(proxy_model(cfg, proxy["size"]).apply, proxy["params"], tokens, mask)
  return scores.mean(axis=1)


# ----------------------------------------------------------------------------- the chunk
def _reward_fn(wc: synthetic.WorldConfig, size: ProxySize | None):
  if size is None:
    return lambda world, tokens, mask: synthetic.gold_reward(world, wc, tokens, mask)
  return proxy_model_for(wc, size).apply


def proxy_model_for(wc: synthetic.WorldConfig, size: ProxySize):
  return proxy_model(StudyConfig(world=wc), size)


@functools.cache
def chunk_fn(
  wc: synthetic.WorldConfig,
  size: ProxySize | None,
  rl_cfg: rl_lib.RLConfig,
  algorithm: str,
  learning_rate: float,
  batch_size: int,
  chunk_len: int,
  evaluate: bool,
  reward_fn=None,
  *,
  reward_key: str | None = None,
  opt_level: int = -1,
):
  """The jitted chunk of ``chunk_len`` RL steps of every member, built once per key.

  ``size=None``: the reward is gold (``reward_params`` a stacked :class:`World`).
  ``reward_fn``: optional hashable ``(reward_params, tokens, mask) -> [b]`` replacing the
  reward that ``size`` names (e.g. an ensemble objective, ``experiments.ensembles_rl``);
  ``size`` then only names the program in :data:`TRACES`. None keeps the proxy / gold reward.
  ``reward_key``: a text naming ``reward_fn`` that, with the arguments above and the sources
  of ``experiments/``, determines it (e.g. the module and name of a function of ``(wc,
  size)``). With it a custom reward's chunk is kept on disk like the others; without it, it
  is traced in every process.
  ``opt_level``: XLA backend optimisation level (:func:`jaxrm.io.compile_cache.backend_options`).

  Returns:
    ``chunk(states [m], world, reward_params [m], eval_prompts [e, p], eval_key) ->
    (states, metrics)``: ``metrics['train_gold' | 'train_kl_k1' | 'train_proxy']`` of
    shape ``[m, chunk_len]``, and with ``evaluate`` the held-out :data:`EVAL_KEYS` ``[m]``
    (``proxy`` not re-centred) measured after the last step.
  """
  custom_reward = reward_fn is not None
  if reward_key is not None and not custom_reward:
    raise ValueError(f"reward_key={reward_key!r} names a reward_fn, but reward_fn is None")
  reward_fn = reward_fn if custom_reward else _reward_fn(wc, size)
  value_head = rl_lib.uses_value_head(algorithm)
  policy = transformer_policy(wc.policy_config(), value_head=value_head)
  step = rl_lib.make_step(
    algorithm,
    policy=policy,
    config=rl_cfg,
    reward_fn=reward_fn,
    optimizer=optax.adam(learning_rate),
    return_rollout=True,
  )
  eval_cfg = dataclasses.replace(rl_cfg, exact_kl=True, kl_estimator="k1")
  ones = jnp.ones((batch_size, wc.prompt_len), bool)

  def one_step(state, world, reward_params):
    # Prompts use stream 2 of the step key (the steps use 0 for sampling, 1 for minibatches).
    key = jax.random.fold_in(jax.random.fold_in(state.key, state.step), 2)
    prompts = synthetic.sample_prompts(wc, key, batch_size)
    batch = {"prompts": prompts, "prompt_mask": ones}
    state, m, ro = step(state, batch, reward_params, world.policy_params)
    gold = synthetic.gold_reward(world, wc, ro["tokens"], ro["mask"])
    return state, {"train_gold": gold.mean(), "train_kl_k1": m["kl_k1"], "train_proxy": m["score"]}

  def heldout(params, world, reward_params, prompts, key):
    def diagnostics(_, tokens, mask):
      parts = synthetic.gold_components(world, wc, tokens, mask)
      gold = synthetic.gold_reward(world, wc, tokens, mask)
      return {"gold": gold, "gold_rest": parts["rest"], "gold_feature": parts["feature"]}

    m = rl_diagnostics.evaluate(
      params,
      world.policy_params,
      reward_params,
      {"prompts": prompts, "prompt_mask": jnp.ones(prompts.shape, bool)},
      key,
      policy=policy,
      config=eval_cfg,
      reward_fn=reward_fn,
      diagnostics_fn=diagnostics,
    )
    return {k: m["score" if k == "proxy" else k] for k in EVAL_KEYS}

  def member(state, world, reward_params, prompts, key):
    state, train = jax.lax.scan(
      lambda s, _: one_step(s, world, reward_params), state, None, length=chunk_len
    )
    if evaluate:
      train.update(heldout(state.params, world, reward_params, prompts, key))
    return state, train

  def chunk(states, world, reward_params, eval_prompts, eval_key):
    TRACES[GOLD if size is None else size.name] += 1  # runs at trace time only
    return jax.vmap(member, in_axes=(0, None, 0, None, None))(
      states, world, reward_params, eval_prompts, eval_key
    )

  # The lowered program is kept on disk when the scripts' compilation cache is on
  # (jaxrm.io.program_cache), under everything above it is a function of: a later process
  # neither traces nor lowers it. A custom reward_fn without a reward_key has no such key:
  # traced in every process.
  settings = (wc, size, rl_cfg, algorithm, learning_rate, batch_size, chunk_len, evaluate)
  named = () if reward_key is None else (f"reward_fn: {reward_key}",)
  key = None
  if not custom_reward or named:
    key = "\n".join([*map(repr, settings), *named, _experiments_digest()])
  return program_cache.jit(
    chunk,
    name="rl_chunk",
    key=key,
    donate_argnums=(0,),
    compiler_options=compile_cache.backend_options(opt_level),
  )


def _experiments_digest() -> str:
  return program_cache.source_digest(os.path.dirname(os.path.abspath(__file__)))


def start_params(cfg: StudyConfig, data: WorldData) -> Any:
  """``pi_init``'s variables, with a zero value head for PPO (:func:`init_value_head`)."""
  ref = data.world.policy_params
  if not rl_lib.uses_value_head(cfg.rl_algorithm):
    return ref
  return rl_lib.init_value_head(ref, jax.random.key(0), config=cfg.world.policy_config())


def train_members(
  cfg: StudyConfig,
  data: WorldData,
  size: ProxySize | None,
  reward_params: Any,
  kl_coefs: np.ndarray,
  keys: jax.Array,
  *,
  evaluate: bool = True,
  name: str = "",
  reward_fn=None,
  reward_key: str | None = None,
) -> tuple[dict[str, np.ndarray], Any]:
  """RL of ``m`` members against ``size``'s reward (gold for None), vmapped together.

  Args:
    cfg: the study config (``world_seed`` its single world).
    data: the world.
    size: the proxy architecture, or None for gold (``reward_params`` then stacked worlds).
    reward_params: ``[m, ...]`` stacked reward parameters, member ``i`` optimises ``[i]``.
    kl_coefs: ``[m]`` fixed KL coefficients.
    keys: ``[m]`` training keys.
    evaluate: measure the held-out :data:`EVAL_KEYS` after every ``rl_log_every`` steps.
    name: for the progress lines.
    reward_fn: optional hashable reward replacing ``size``'s (:func:`chunk_fn`).
    reward_key: the text that names ``reward_fn`` for the program cache (:func:`chunk_fn`).

  Returns:
    ``(curves, states)``: ``train_gold``, ``train_kl_k1``, ``train_proxy`` (window means)
    and with ``evaluate`` the :data:`EVAL_KEYS`, each ``[m, T]`` (``T = rl_steps //
    rl_log_every``; ``proxy`` not re-centred); the final :class:`RLState` of every member.
  """
  rl_cfg = _rl_config(cfg)
  chunk_len = cfg.rl_log_every
  chunk = chunk_fn(
    cfg.world,
    size,
    rl_cfg,
    cfg.rl_algorithm,
    float(cfg.rl_learning_rate),
    cfg.rl_batch_size,
    chunk_len,
    evaluate,
    reward_fn,
    reward_key=reward_key,
    opt_level=cfg.rl_compile_opt_level,
  )
  optimizer = optax.adam(cfg.rl_learning_rate)
  start = start_params(cfg, data)
  # Copies: the states hold these arrays themselves, and the chunk donates the states (the
  # caller's keys and coefficients would be deleted by the first chunk).
  coefs = jnp.array(kl_coefs, jnp.float32, copy=True)
  states = jax.vmap(lambda k, c: rl_lib.create_rl_state(start, optimizer, k, kl_coef=c))(
    jnp.copy(keys), coefs
  )
  prompts, eval_key = eval_batch(cfg)
  logs, done = [], 0
  num_steps = cfg.rl_steps // chunk_len * chunk_len
  progress = rundir.Progress(num_steps, items_per_step=len(coefs) * cfg.rl_batch_size)
  while done < num_steps:
    states, m = chunk(states, data.world, reward_params, prompts, eval_key)
    m = jax.device_get(m)
    m = {k: (v.mean(axis=1) if v.ndim == 2 else v) for k, v in m.items()}  # [m] each
    logs.append(m)
    done += chunk_len
    progress.start(done)  # rates count from the end of the first (compiling) chunk
    shown = ("kl_exact", "gold") if evaluate else ("train_kl_k1", "train_gold")
    means = {k: float(m[k].mean()) for k in shown}
    logging.info("rl %s: %s", name, progress.line(done, means))
  curves = {k: np.stack([l[k] for l in logs], axis=1).astype(np.float32) for k in logs[0]}
  return curves, states


def run_rl_one(cfg: StudyConfig, data: WorldData, proxy, *, seed: int, reward: str = "proxy"):
  """RL (``cfg.rl_algorithm``, ``kl_coef``) of ``cfg.num_seeds`` members -> training curves.

  For the objective-mismatch study: ``proxy['params']`` (stacked over members) optimised with
  ``proxy['size']``'s reward, or gold (``reward='gold'``; ``proxy`` unused). Keys
  ``key(2000 + seed)``. No held-out evaluation.

  Returns:
    ``kl`` (k1), ``gold``, ``proxy`` (not re-centred): window means over the training
    rollouts, each ``[num_seeds, T]``.
  """
  n = cfg.num_seeds
  if reward == GOLD:
    size, params = None, jax.tree.map(lambda x: jnp.stack([x] * n), data.world)
  else:
    size, params = proxy["size"], proxy["params"]
  curves, _ = train_members(
    cfg,
    data,
    size,
    params,
    np.full(n, cfg.kl_coef),
    jax.random.split(jax.random.key(2000 + seed), n),
    evaluate=False,
    name=GOLD if size is None else size.name,
  )
  return {"kl": curves["train_kl_k1"], "gold": curves["train_gold"], "proxy": curves["train_proxy"]}


# ----------------------------------------------------------------------------- the stage
def run_rl(
  cfg: StudyConfig, data: WorldData, proxies: list[dict[str, Any]], workdir: str
) -> dict[str, Any]:
  """RL of every arm (:func:`arms`), all seeds, in one world; cached per arm.

  Returns:
    ``{'step': [T] (last step of each window), 'arms': {ARM: {key: [num_seeds, T]}} for
    the :data:`CURVE_KEYS`, 'arm_info': {ARM: {'reward', 'kl_coef'}}}``.
  """
  validate_rl(cfg)
  info = arms(cfg)
  fp = cfg.fingerprint(*RL_FIELDS)
  num_seeds, windows = cfg.num_seeds, cfg.rl_steps // cfg.rl_log_every
  template = {k: jax.ShapeDtypeStruct((num_seeds, windows), jnp.float32) for k in CURVE_KEYS}
  by_name = {p["size"].name: (i, p) for i, p in enumerate(proxies)}
  out: dict[str, dict[str, np.ndarray]] = {}
  samples = None
  for reward in [s.name for s in cfg.sizes] + [GOLD]:
    group = [a for a, v in info.items() if v["reward"] == reward]
    paths = {a: os.path.join(workdir, "rl", f"{a}.npz") for a in group}
    keyed = {a: f"{fp}-{a}-{info[a]['kl_coef']!r}-{cfg.rl_algorithm}" for a in group}
    loaded = {a: load_tree(paths[a], template, keyed[a]) for a in group}
    if all(v is not None for v in loaded.values()):
      out.update({a: {k: np.asarray(x) for k, x in v[0].items()} for a, v in loaded.items()})
      continue
    t = time.perf_counter()
    if reward == GOLD:
      size, seed_index, offset = None, _GOLD_SEED_INDEX, np.zeros(num_seeds, np.float32)
      params = jax.tree.map(lambda x: jnp.stack([x] * num_seeds), data.world)
    else:
      seed_index, proxy = by_name[reward]
      size, params = proxy["size"], proxy["params"]
      if samples is None:
        samples = init_samples(cfg, data)
      offset = proxy_offsets(cfg, data, proxy, samples)
    a_count = len(group)
    coefs = np.repeat([info[a]["kl_coef"] for a in group], num_seeds)
    keys = jax.random.split(jax.random.key(2000 + seed_index), num_seeds)
    keys = jnp.concatenate([keys] * a_count)  # every arm of a reward shares the seeds' keys
    params = jax.tree.map(lambda x, n=a_count: jnp.concatenate([x] * n), params)
    curves, _ = train_members(
      cfg, data, size, params, coefs, keys, name=f"{reward} ({a_count} arms)"
    )
    seconds = time.perf_counter() - t
    for j, a in enumerate(group):
      rows = slice(j * num_seeds, (j + 1) * num_seeds)
      arm = {k: curves[k][rows] for k in CURVE_KEYS}
      arm["proxy"] = arm["proxy"] - offset[:, None]
      save_tree(paths[a], arm, {"fingerprint": keyed[a], "seconds": seconds, "group": group})
      out[a] = arm
    logging.info("rl %s: %d arms in %.1fs", reward, a_count, seconds)
  return {
    "step": np.arange(1, windows + 1) * cfg.rl_log_every,
    "arms": {a: out[a] for a in info},
    "arm_info": info,
  }


def to_json(out: dict[str, Any]) -> dict[str, Any]:
  """:func:`run_rl`'s output with every array as nested lists (for ``results.json``)."""
  return {
    "step": np.asarray(out["step"]).tolist(),
    "arms": {a: {k: np.asarray(v).tolist() for k, v in c.items()} for a, c in out["arms"].items()},
    "arm_info": {a: dict(v) for a, v in out["arm_info"].items()},
  }
