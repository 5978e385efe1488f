"""Best-of-n and the KL-regularised optimum from one set of ``pi_init`` samples per prompt.

The computations of the study's best-of-n stage (``overoptimization_lib.best_of_n``), on
arrays of scores: ``select [K, P, N]`` (K selectors -- every proxy seed and the oracle, gold
itself -- scoring N samples of each of P prompts) and ``values [V, P, N]`` (gold and its parts).

* :func:`bon_curves`: the unbiased best-of-n estimate (``jaxrm.math.best_of_n``) of every value
  for every selector and n, averaged over prompts.
* :func:`bootstrap_bon`: the same for gold on ``num_boot`` bootstrap resamples that resample
  prompts and, within each prompt, samples (nested), recomputing the estimator on each resample
  (``best_of_n_resampled``: no re-sorting). Proxy seeds are resampled in the analysis.
* :func:`tilted_curves`: ``pi_beta ∝ pi_init exp(select / beta)`` (``jaxrm.math.tilted``):
  E[values], KL and the pooled effective sample size for each beta.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxrm.math import best_of_n as bon_lib
from jaxrm.math import tilted as tilted_lib


def _check(select: np.ndarray, values: np.ndarray) -> None:
  if select.ndim != 3 or values.ndim != 3 or select.shape[1:] != values.shape[1:]:
    raise ValueError(
      f"select must be [K, P, N] and values [V, P, N] with the same P, N; got {select.shape} "
      f"and {values.shape}"
    )


def bon_curves(select, values, ns) -> np.ndarray:
  """Best-of-n estimates ``[K, V, n_values]`` (float64, mean over the P prompts).

  Selector k picks, among n samples of a prompt, the one with the highest ``select[k]``; the
  result is the expected ``values[v]`` of the pick (unbiased, from all N samples).
  """
  select, values = np.asarray(select, np.float64), np.asarray(values, np.float64)
  _check(select, values)
  weights = bon_lib.best_of_n_weights(select.shape[-1], ns)  # [n_values, N]
  out = []
  for k in range(select.shape[0]):
    order = np.argsort(select[k], axis=-1, kind="stable")  # [P, N]
    sorted_values = np.take_along_axis(values, order[None], axis=-1)  # [V, P, N]
    out.append((sorted_values @ weights.T).mean(axis=1))  # [V, n_values]
  return np.stack(out)


@functools.partial(jax.jit, static_argnums=(4,))
def _bootstrap(order, sorted_gold, table, keys, num_prompts):
  """``[B, K, n_values]``: the prompt-weighted estimator on each replicate's resample."""
  num_samples = order.shape[-1]

  def one(key):
    kp, ks = jax.random.split(key)
    prompt_counts = jnp.bincount(
      jax.random.randint(kp, (num_prompts,), 0, num_prompts), length=num_prompts
    )
    draws = jax.random.randint(ks, (num_prompts, num_samples), 0, num_samples)
    counts = jax.vmap(lambda d: jnp.bincount(d, length=num_samples))(draws)  # [P, N]
    sorted_counts = jnp.take_along_axis(counts[None], order, axis=-1)  # [K, P, N]
    est = bon_lib.best_of_n_resampled(sorted_gold, sorted_counts, table)  # [K, P, n_values]
    curve = jnp.einsum("p,kpn->kn", prompt_counts.astype(est.dtype), est) / num_prompts
    return curve - curve[:, :1]  # re-centred: the resample's pi_init scores 0

  return jax.lax.map(one, keys)


def bootstrap_bon(select, gold, ns, *, key: jax.Array, num_boot: int) -> np.ndarray:
  """Bootstrap replicates ``[K, num_boot, n_values]`` of each selector's re-centred gold curve.

  Each replicate draws P prompts with replacement and, independently for every prompt, N
  samples with replacement (the same draw for every selector, so selectors stay paired), and
  recomputes the unbiased estimator on that resample. ``ns`` must start at 1 (re-centring).
  """
  select, gold = np.asarray(select, np.float32), np.asarray(gold, np.float32)
  _check(select, gold[None])
  ns = np.asarray(ns)
  if ns[0] != 1:
    raise ValueError(f"ns must start at 1 (the re-centring point), got {ns[:3]}")
  order = np.argsort(select, axis=-1, kind="stable")  # [K, P, N]
  sorted_gold = np.take_along_axis(np.broadcast_to(gold, select.shape), order, axis=-1)
  table = bon_lib.best_of_n_cumulative_weights(select.shape[-1], ns).astype(np.float32)
  keys = jax.random.split(key, num_boot)
  out = _bootstrap(order, sorted_gold, table, keys, select.shape[1])  # [B, K, n_values]
  return np.moveaxis(np.asarray(out, np.float64), 0, 1)


def tilted_curves(select, values, betas) -> dict[str, np.ndarray]:
  """The KL-regularised optimum of each selector's score, for each beta.

  ``betas`` are in units of the selector's standard deviation over all its samples (so one grid
  serves rewards of any scale): ``pi_beta ∝ pi_init exp(select / (beta * std))``.

  Returns:
    ``value [K, num_betas, V]`` (E under pi_beta minus E under pi_init, mean over prompts),
    ``kl [K, num_betas]`` (mean over prompts, nats), ``ess [K, num_betas]`` (pooled over
    prompts: the sum of the per-prompt ESS, as for the prompt-averaged best-of-n estimate) and
    ``ess_per_prompt_min [K, num_betas]``.
  """
  select, values = np.asarray(select, np.float32), np.asarray(values, np.float32)
  _check(select, values)
  betas = np.asarray(betas, np.float32)
  base = values.mean(axis=-1)  # [V, P]: pi_init's mean per prompt
  out = {"value": [], "kl": [], "ess": [], "ess_per_prompt_min": []}
  for k in range(select.shape[0]):
    r = select[k] / max(float(select[k].std()), 1e-12)
    t = tilted_lib.tilted_optimum(r, values, betas)  # value [B, V, P]; kl, ess [B, P]
    out["value"].append(np.asarray(t["value"] - base[None]).mean(-1))
    out["kl"].append(np.asarray(t["kl"]).mean(-1))
    out["ess"].append(np.asarray(t["ess"]).sum(-1))
    out["ess_per_prompt_min"].append(np.asarray(t["ess"]).min(-1))
  return {k: np.stack(v).astype(np.float64) for k, v in out.items()}
