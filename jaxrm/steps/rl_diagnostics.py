"""What an RL run logs about its rollouts, so that it can be diagnosed.

:func:`rollout_metrics` turns a rollout (:class:`jaxrm.steps.rollout.Rollout`) into the scalar
metrics every RL step reports (means over the global batch under ``axis_name``):

* ``score``: the mean ``reward_fn`` (the reward optimised, e.g. a proxy reward model);
* ``kl_k1``: the mean k1 sequence KL ``sum_t (log pi - log pi_ref)`` over the response;
  ``kl_k2`` / ``kl_k3``: the same with ``config.kl_estimator`` when it is not k1 (the
  estimator the penalty and the adaptive controller use); ``kl_exact`` (``config.exact_kl``):
  the exact per-token KL of the full next-token distributions summed over the response
  (:func:`jaxrm.steps.rollout.token_exact_kl`), an unbiased lower-variance estimate of the
  sequence KL. Every KL key names its estimator;
* ``entropy`` (per response token), ``response_length`` (mean response tokens, EOS included,
  i.e. tokens up to EOS or the budget);
* one key per entry of the optional ``diagnostics_fn(reward_params, tokens, mask) -> {name:
  [batch]}``, the batch mean of each: quantities that are not optimised but tell what the
  optimisation does, e.g. the synthetic world's ``gold`` reward next to a proxy's ``score``,
  or an ensemble's member disagreement (:mod:`jaxrm.train.sources` builds them).

:func:`evaluate` samples the current policy on a fixed prompt batch with a fixed key and
returns the same metrics, so evaluations at different steps see the same prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp

from jaxrm.math import kl as kl_lib
from jaxrm.math import pg_losses
from jaxrm.models.policy import PolicyFns
from jaxrm.steps import rollout as rollout_lib
from jaxrm.steps.rl_config import RLConfig

DiagnosticsFn = Callable[[Any, jax.Array, jax.Array], Mapping[str, jax.Array]]
ROLLOUT_KEYS = ("score", "kl_k1", "kl_k2", "kl_k3", "kl_exact", "entropy", "response_length")


def _pmean(x: Any, axis_name: Any) -> Any:
  return x if axis_name is None else lax.pmean(x, axis_name)


def kl_key(estimator: str) -> str:
  """The metric key of the mean sequence KL by ``estimator`` (``'k1'`` -> ``'kl_k1'``)."""
  return f"kl_{estimator}"


def diagnostics(
  diagnostics_fn: DiagnosticsFn | None,
  reward_params: Any,
  tokens: jax.Array,
  mask: jax.Array,
  *,
  axis_name: Any = None,
) -> dict[str, jax.Array]:
  """Batch means of ``diagnostics_fn(reward_params, tokens, mask)`` (``{}`` if None).

  Raises:
    ValueError: an entry is not ``[batch]`` or its name is one of :data:`ROLLOUT_KEYS`.
  """
  if diagnostics_fn is None:
    return {}
  out = diagnostics_fn(reward_params, tokens, mask)
  metrics = {}
  for name, value in dict(out).items():
    value = jnp.asarray(value)
    if name in ROLLOUT_KEYS or value.shape != tokens.shape[:1]:
      raise ValueError(
        f"diagnostics_fn must return {{name: [batch]={tokens.shape[:1]}}} with names other "
        f"than {ROLLOUT_KEYS}, got {name!r} of shape {value.shape}"
      )
    metrics[name] = _pmean(jnp.mean(value.astype(jnp.float32)), axis_name)
  return metrics


def rollout_metrics(
  ro: rollout_lib.Rollout,
  *,
  config: RLConfig,
  axis_name: Any = None,
  diagnostics_fn: DiagnosticsFn | None = None,
  reward_params: Any = None,
) -> dict[str, jax.Array]:
  """The metrics of a rollout (module docstring), scalars averaged over ``axis_name``."""
  resp = ro.response_mask
  mean = lambda x: _pmean(jnp.mean(x), axis_name)
  k1 = kl_lib.sequence_kl(kl_lib.kl_k1(ro.logprobs, ro.ref_logprobs), resp)
  metrics = {
    "score": mean(ro.scores),
    "kl_k1": mean(k1),
    kl_key(config.kl_estimator): mean(kl_lib.sequence_kl(ro.kl, resp)),
    "entropy": _pmean(pg_losses.masked_aggregate(ro.entropy, resp, axis_name=axis_name), axis_name),
    "response_length": mean(jnp.sum(resp, axis=1, dtype=jnp.float32)),
  }
  if ro.kl_exact is not None:
    metrics["kl_exact"] = mean(kl_lib.sequence_kl(ro.kl_exact, resp))
  metrics.update(
    diagnostics(diagnostics_fn, reward_params, ro.tokens, ro.mask, axis_name=axis_name)
  )
  return metrics


def evaluate(
  params: Any,
  ref_params: Any,
  reward_params: Any,
  batch: Mapping[str, jax.Array],
  key: jax.Array,
  *,
  policy: PolicyFns,
  config: RLConfig,
  reward_fn: rollout_lib.RewardFn,
  diagnostics_fn: DiagnosticsFn | None = None,
) -> dict[str, jax.Array]:
  """Samples ``params`` on a fixed prompt batch and returns :func:`rollout_metrics`.

  Args:
    params: the policy's variables (a value head, if any, is ignored).
    ref_params: the reference policy's variables.
    reward_params: first argument of ``reward_fn`` and ``diagnostics_fn``.
    batch: ``{'prompts': [b, p] int (LEFT-padded), 'prompt_mask': [b, p] bool}``.
    key: the sampling key (keep it fixed across evaluations to compare steps).
    policy, config, reward_fn: as the RL steps (:mod:`jaxrm.steps.rl`).
    diagnostics_fn: as :func:`rollout_metrics`.

  Returns:
    Scalar metrics (single device: call it under plain ``jit``).
  """
  ro = rollout_lib.rollout(
    params,
    ref_params,
    reward_params,
    batch["prompts"],
    batch["prompt_mask"],
    key,
    policy=policy,
    reward_fn=reward_fn,
    max_new_tokens=config.max_new_tokens,
    temperature=config.temperature,
    eos_id=config.eos_id,
    kl_estimator=config.kl_estimator,
    exact_kl=config.exact_kl,
  )
  return rollout_metrics(
    ro, config=config, diagnostics_fn=diagnostics_fn, reward_params=reward_params
  )
