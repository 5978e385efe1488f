"""RL stage of the ensembles study: PPO against every ensemble objective, and against gold.

One world's RL runs as TWO vmapped batches through the over-optimisation study's RL stage
(:func:`experiments.overoptimization_rl.train_members`, held-out evaluation with the exact
sequence KL and gold on fixed prompts):

* every (noise rate, objective, ensemble) member in one batch, with one compiled program: the
  reward (:func:`ensemble_reward`) takes the objective as DATA (``kind``, ``coef`` in the
  reward parameters), so single member, mean, WCO and UWO at every lambda share a program;
* the gold oracle, ``num_ensembles`` seeds (noise-independent: run once per world).

RL seed ``e`` optimises ensemble ``e`` (``single``: its first member) with training key
``key(3000 + e)`` for every objective and noise rate (common random numbers; the gold arm uses
the same keys). The reward is re-centred so that ``pi_init`` scores 0 in the ``proxy`` curve
(each member's objective on the 4,096 offset samples).

Cache: ``world{seed}/rl/ensembles.npz`` and ``world{seed}/rl/gold.npz``, keyed by
``RL_FIELDS`` and the world seed; each batch is computed whole (a crash loses that batch).
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from experiments import ensembles_lib as lib
from experiments import overoptimization_lib as oo
from experiments import overoptimization_rl as orl
from jaxrm.data import synthetic
from jaxrm.math import objectives

KINDS = ("single", "mean", "wco", "uwo")  # the objective index ``kind`` of the reward params


# Names ensemble_reward for the program cache: with the world config and architecture that the
# chunk's key holds, and the sources of experiments/, it determines the function.
REWARD_KEY = "experiments.ensembles_rl.ensemble_reward"


@functools.cache
def ensemble_reward(wc: synthetic.WorldConfig, size: oo.ProxySize):
  """The reward ``(reward_params, tokens [b, s], mask [b, s]) -> [b]`` of an ensemble objective.

  ``reward_params``: ``params`` (``k`` stacked members), ``mean``, ``std`` ``[k]`` (fixed
  ``pi_init`` statistics, :func:`jaxrm.math.objectives.normalize_members`), ``kind`` (int
  index into :data:`KINDS`; ``single`` is member 0) and ``coef`` (UWO's lambda). One function
  per (world config, architecture): hashable, so ``chunk_fn`` builds one program for all.
  """
  apply = orl.proxy_model_for(wc, size).apply

  def reward(rp, tokens, mask):
    r = jax.vmap(apply, in_axes=(0, None, None))(rp["params"], tokens, mask)  # [k, b]
    z = objectives.normalize_members(r, mean=rp["mean"], std=rp["std"])
    options = jnp.stack(
      [
        z[0],
        objectives.ensemble_mean(z),
        objectives.ensemble_worst_case(z),
        objectives.ensemble_uncertainty_weighted(z, coef=rp["coef"]),
      ]
    )
    return options[rp["kind"]]

  return reward


def arm_specs(cfg: lib.EnsembleConfig) -> list[tuple[float, str, str, float]]:
  """``(noise, objective name, kind, coef)`` of every arm, in batch order."""
  specs = []
  for noise in cfg.label_noises:
    specs += [(noise, "single", "single", 0.0), (noise, "mean", "mean", 0.0)]
    specs.append((noise, "wco", "wco", 0.0))
    specs += [(noise, f"uwo{c:g}", "uwo", float(c)) for c in cfg.uwo_coefs]
  return specs


def reward_params(cfg: lib.EnsembleConfig, trained: dict) -> tuple[Any, list]:
  """Stacked reward parameters ``[arms * E, k, ...]`` of every arm and ensemble, and the specs."""
  k, rows, specs = cfg.ensemble_size, [], arm_specs(cfg)
  for noise, _, kind, coef in specs:
    _, _, members, stats = trained[noise]
    for e in range(cfg.num_ensembles):
      sl = slice(e * k, (e + 1) * k)
      rows.append(
        {
          "params": jax.tree.map(lambda x, sl=sl: x[sl], members["params"]),
          "mean": jnp.asarray(stats[0][sl], jnp.float32),
          "std": jnp.asarray(stats[1][sl], jnp.float32),
          "kind": jnp.asarray(KINDS.index(kind), jnp.int32),
          "coef": jnp.asarray(coef, jnp.float32),
        }
      )
  return jax.tree.map(lambda *x: jnp.stack(x), *rows), specs


def run_rl(cfg: lib.EnsembleConfig, trained: dict, wdir: str) -> dict[str, Any]:
  """RL of every arm in one world; ``trained[noise] = (study_config, data, members, stats)``.

  Returns:
    ``step [T]`` (last step of each window); ``arms[f'noise{rate:g}/{objective}']`` and
    ``arms['gold']``: ``{key: [E, T]}`` for :data:`overoptimization_rl.CURVE_KEYS`
    (held-out ``kl_exact``, ``gold``, ... and ``proxy``, the optimised reward re-centred on
    ``pi_init``; the gold arm's is gold).
  """
  sc0, data, members0, _ = trained[cfg.label_noises[0]]
  e_count, windows = cfg.num_ensembles, cfg.rl_steps // cfg.rl_log_every
  seed = sc0.world_seed
  fp = cfg.fingerprint(*lib.RL_FIELDS, world_seed=seed)
  keys = jax.random.split(jax.random.key(3000), e_count)
  specs = arm_specs(cfg)
  names = [f"noise{n:g}/{o}" for n, o, _, _ in specs]
  out: dict[str, dict[str, np.ndarray]] = {}

  def template(m):
    return {k: jax.ShapeDtypeStruct((m, windows), jnp.float32) for k in orl.CURVE_KEYS}

  path = os.path.join(wdir, "rl", "ensembles.npz")
  loaded = oo.load_tree(path, template(len(specs) * e_count), fp)
  if loaded is None:
    t = time.perf_counter()
    params, _ = reward_params(cfg, trained)
    reward = ensemble_reward(cfg.world, members0["size"])
    tokens, mask = orl.init_samples(sc0, data)
    offsets = np.asarray(jax.jit(jax.vmap(reward, in_axes=(0, None, None)))(params, tokens, mask))
    curves, _ = orl.train_members(
      sc0,
      data,
      members0["size"],
      params,
      np.full(len(specs) * e_count, cfg.kl_coef),
      jnp.concatenate([keys] * len(specs)),
      name=f"world {seed}: {len(specs)} arms x {e_count} ensembles",
      reward_fn=reward,
      reward_key=REWARD_KEY,
    )
    curves = dict(curves)
    curves["proxy"] = curves["proxy"] - offsets.mean(axis=1)[:, None]
    curves = {k: np.asarray(curves[k], np.float32) for k in orl.CURVE_KEYS}
    oo.save_tree(path, curves, {"fingerprint": fp, "seconds": time.perf_counter() - t})
    logging.info("rl world %d: ensemble arms in %.1fs", seed, time.perf_counter() - t)
  else:
    curves = {k: np.asarray(v) for k, v in loaded[0].items()}
  for j, name in enumerate(names):
    out[name] = {k: v[j * e_count : (j + 1) * e_count] for k, v in curves.items()}

  path = os.path.join(wdir, "rl", "gold.npz")
  loaded = oo.load_tree(path, template(e_count), fp + "-gold")
  if loaded is None:
    t = time.perf_counter()
    worlds = jax.tree.map(lambda x: jnp.stack([x] * e_count), data.world)
    gold, _ = orl.train_members(
      sc0, data, None, worlds, np.full(e_count, cfg.kl_coef), keys, name=f"world {seed}: gold"
    )
    gold = {k: np.asarray(gold[k], np.float32) for k in orl.CURVE_KEYS}
    oo.save_tree(path, gold, {"fingerprint": fp + "-gold", "seconds": time.perf_counter() - t})
  else:
    gold = {k: np.asarray(v) for k, v in loaded[0].items()}
  out[orl.GOLD] = gold
  return {"step": np.arange(1, windows + 1) * cfg.rl_log_every, "arms": out}
