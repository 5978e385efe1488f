"""Stage 4 of the reward over-optimisation study: RL against each proxy.

PPO from ``pi_init`` against every proxy (all seeds of a size vmapped together); the stage's
cache lives under ``workdir/rl``. The objective-mismatch study reuses :func:`run_rl_one`.
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

from experiments.overoptimization_lib import (
  RL_FIELDS,
  StudyConfig,
  WorldData,
  load_tree,
  proxy_model,
  save_tree,
  score_batches,
)
from jaxrm.data import synthetic
from jaxrm.io import rundir
from jaxrm.models.policy import transformer_policy
from jaxrm.steps import rl as rl_lib


def _rl_config(cfg: StudyConfig) -> rl_lib.RLConfig:
  """``cfg.ppo``, re-validated (command-line overrides bypass its ``__post_init__``)."""
  return dataclasses.replace(cfg.ppo)


def proxy_offsets(cfg: StudyConfig, data: WorldData, proxy: dict[str, Any]) -> np.ndarray:
  """Mean proxy score ``[seeds]`` under ``pi_init`` on fresh prompts (to re-centre RL)."""
  k_prompts, k_samples = jax.random.split(jax.random.key(cfg.world_seed + 11))
  prompts = synthetic.sample_prompts(cfg.world, k_prompts, 4096)
  tokens, mask = jax.jit(lambda p, k: synthetic.sample_responses(data.world, cfg.world, p, k))(
    prompts, k_samples
  )
  scores = score_batches(proxy_model(cfg, proxy["size"]).apply, proxy["params"], tokens, mask)
  return scores.mean(axis=1)


def run_rl(
  cfg: StudyConfig, data: WorldData, proxies: list[dict[str, Any]], workdir: str
) -> dict[str, Any]:
  """PPO from ``pi_init`` against every proxy (all seeds of a size vmapped together).

  Every step samples ``rl_batch_size`` fresh prompts, and gold is scored on the same
  responses as the proxy. KL is the mean over the batch of the sequence KL
  ``sum_t log pi(y_t) - log pi_init(y_t)`` (the k1 estimator, unbiased). One step's batch is
  small (its gold mean has a standard error of about 0.1), so a curve point is the mean over
  a window of ``rl_log_every`` steps (KL, gold and proxy alike).

  Returns:
    ``step [T]`` (last step of each window) and ``kl``, ``gold``, ``proxy`` of shape
    ``[num_sizes, num_seeds, T]`` (T = ``rl_steps // rl_log_every``; proxy re-centred so
    that ``pi_init`` scores 0).
  """
  wc = cfg.world
  fp = cfg.fingerprint(*RL_FIELDS)
  rl_cfg = _rl_config(cfg)
  optimizer = optax.adam(cfg.rl_learning_rate)
  ref_params = data.world.policy_params
  start = rl_lib.init_value_head(ref_params, jax.random.key(0), config=wc.policy_config())
  shape = (cfg.num_seeds, cfg.rl_steps // cfg.rl_log_every)
  template = {k: jax.ShapeDtypeStruct(shape, jnp.float32) for k in ("kl", "gold", "proxy")}
  out = {k: np.zeros((len(proxies),) + shape, np.float32) for k in template}
  for i, proxy in enumerate(proxies):
    path = os.path.join(workdir, "rl", f"{proxy['size'].name}.npz")
    loaded = load_tree(path, template, fp)
    if loaded is None:
      t = time.perf_counter()
      curves = run_rl_one(cfg, data, proxy, rl_cfg, optimizer, ref_params, start, seed=i)
      curves["proxy"] = curves["proxy"] - proxy_offsets(cfg, data, proxy)[:, None]
      save_tree(path, curves, {"fingerprint": fp, "seconds": time.perf_counter() - t})
    else:
      curves = loaded[0]
    for k in out:
      out[k][i] = np.asarray(curves[k])
  return dict(out, step=np.arange(1, shape[1] + 1) * cfg.rl_log_every)


def run_rl_one(
  cfg, data, proxy, rl_cfg, optimizer, ref_params, start, *, seed, reward_fn=None, name=None
):
  """PPO against ``proxy['params']`` (stacked over ``cfg.num_seeds`` members) -> curves.

  ``reward_fn`` defaults to the proxy architecture's ``apply`` (``name`` to its size's name);
  the objective-mismatch study passes gold's here to run the same PPO on gold.
  """
  wc = cfg.world
  reward_fn = proxy_model(cfg, proxy["size"]).apply if reward_fn is None else reward_fn
  name = proxy["size"].name if name is None else name
  policy = transformer_policy(wc.policy_config(), value_head=True)
  ones = jnp.ones((cfg.rl_batch_size, wc.prompt_len), bool)

  chunk_len = cfg.rl_log_every

  def one_step(state, reward_params):
    # Prompts use stream 2 of the step key (ppo_step uses 0 for sampling, 1 for minibatches).
    key = jax.random.fold_in(jax.random.fold_in(state.key, state.step), 2)
    prompts = synthetic.sample_prompts(wc, key, cfg.rl_batch_size)
    state, metrics, ro = rl_lib.ppo_step(
      state,
      {"prompts": prompts, "prompt_mask": ones},
      reward_params,
      ref_params,
      policy=policy,
      config=rl_cfg,
      reward_fn=reward_fn,
      optimizer=optimizer,
      return_rollout=True,
    )
    gold = synthetic.gold_reward(data.world, wc, ro["tokens"], ro["mask"])
    return state, {"kl": metrics["kl_k1"], "proxy": metrics["score"], "gold": gold.mean()}

  @functools.partial(jax.jit, donate_argnums=0)
  def chunk(states, reward_params):
    """``chunk_len`` PPO steps of every seed (vmapped over seeds, scanned over steps)."""

    def seed_scan(state, rp):
      return jax.lax.scan(lambda s, _: one_step(s, rp), state, None, length=chunk_len)

    return jax.vmap(seed_scan)(states, reward_params)

  keys = jax.random.split(jax.random.key(2000 + seed), cfg.num_seeds)
  states = jax.vmap(lambda k: rl_lib.create_rl_state(start, optimizer, k, kl_coef=cfg.kl_coef))(
    keys
  )
  logs, done = [], 0
  num_steps = cfg.rl_steps // chunk_len * chunk_len
  progress = rundir.Progress(num_steps)
  while done < num_steps:
    states, m = chunk(states, proxy["params"])
    m = {k: v.mean(axis=1) for k, v in jax.device_get(m).items()}  # [seeds], window means
    logs.append(m)
    done += chunk_len
    progress.start(done)  # rates count from the end of the first (compiling) chunk
    means = {k: float(m[k].mean()) for k in ("kl", "proxy", "gold")}
    logging.info("rl %s: %s", name, progress.line(done, means))
  return {k: np.stack([l[k] for l in logs], axis=1) for k in logs[0]}
