"""Policy-optimisation steps for RLHF: PPO, REINFORCE, RLOO and GRPO against any reward.

Each step is a pure function

  ``step(state, batch, reward_params, ref_params, *, policy, config, reward_fn, optimizer,
  axis_name=None, return_rollout=False) -> (state, metrics[, rollout])``

that runs one rollout (:func:`jaxrm.steps.rollout.rollout`: sample from the current policy with
``policy.sample``, score with ``reward_fn(reward_params, tokens, mask) -> [batch]``, compute
log-probs, values and the KL to the reference policy ``ref_params``) and then its updates,
all inside one ``jit`` with static shapes. ``batch`` holds the prompts:
``{'prompts': [b, p] int (LEFT-padded), 'prompt_mask': [b, p] bool}``. The reward and
reference parameters are explicit arguments, never part of the state, so a seed sweep can
``jax.vmap`` a step over stacked states and stacked ``reward_params`` (one proxy per seed).

The policy is model-agnostic, as ``apply_fn`` is for the reward-model step: ``policy`` is a
:class:`jaxrm.models.policy.PolicyFns` (its ``apply`` and ``sample`` functions), built by
:func:`jaxrm.models.policy.transformer_policy` for jaxrm's transformer (KV-cached sampler) or
:func:`jaxrm.models.policy.apply_fn_policy` for any model's ``apply_fn``.

All algorithms share one iteration frame (:func:`iterate`, :mod:`jaxrm.steps.rl_frame`):
collect a rollout -> finite flag -> KL coefficient -> score shaping (:func:`shape_scores`:
``missing_eos_penalty``, ``reward_norm``) -> targets -> ``_optimize`` (epochs x minibatches)
-> KL controller, baseline and reward statistics -> finish. An :class:`Algorithm` states only
its targets and its loss; a new algorithm is an ``Algorithm(targets, loss, ...)`` passed to
:func:`iterate`. Configuration and state: :mod:`jaxrm.steps.rl_config`; the targets:
:mod:`jaxrm.steps.rl_targets`.

Policy-gradient variants (:class:`RLConfig` fields, all off by default): asymmetric clipping
``clip_eps_high`` (DAPO), ``dual_clip`` (Ye et al. 2020), GSPO's ``ratio_level='sequence'``,
Dr. GRPO's ``aggregation='constant_length'`` and ``grpo_scale='none'``, ``grpo_scale='batch'``,
``missing_eos_penalty`` and ``reward_norm`` (``'whiten'``, ``'running'``).

Algorithms (token alignment and losses from :mod:`jaxrm.math.advantages`, :mod:`jaxrm.math.pg_losses`):

* :func:`ppo_step` (Ziegler et al. 2019; Ouyang et al. 2022): per-token rewards
  ``-kl_coef * KL_t`` plus the score at the last response token, GAE over the response with
  the policy's value head, advantages whitened over the global batch, then
  ``num_epochs x num_minibatches`` updates of the clipped surrogate + ``value_coef`` x the
  clipped value loss - ``entropy_coef`` x the entropy (a ``lax.scan``).
* :func:`reinforce_step` (Williams 1992; Ahmadian et al. 2024): the same per-token rewards,
  reward-to-go returns minus a baseline (``'moving_average'``: an EMA of past episode returns,
  independent of the current samples; ``'batch'``: the mean episode return of the current
  global batch; ``'none'``), one update of ``-A * log pi``.
* :func:`rloo_step` (Kool et al. 2019; Ahmadian et al. 2024): ``num_samples`` responses per
  prompt, the sequence reward ``score - kl_coef * KL_seq``, leave-one-out advantages
  broadcast over the response tokens, one update of ``-A * log pi``.
* :func:`grpo_step` (Shao et al. 2024): ``num_samples`` responses per prompt,
  group-normalised advantages of the score, the clipped surrogate over ``num_epochs x
  num_minibatches`` updates. The KL penalty is, with ``grpo_kl='loss'`` (default, as in
  DeepSeekMath), ``kl_coef x`` the aggregated per-token estimate
  ``kl_estimate(log pi, log pi_ref)`` added to the loss and differentiated (use
  ``kl_estimator='k3'`` as the paper; the k1 gradient is zero in expectation); with
  ``grpo_kl='reward'``, it is subtracted from the score before group normalisation, like RLOO.

KL coefficient: the state holds an :class:`jaxrm.math.advantages.AdaptiveKLState`. With
``config.target_kl=None`` the coefficient stays fixed; otherwise it is adapted after every
step towards ``target_kl`` from the batch-mean sequence KL (the chosen estimator) with
``n_steps`` = the global number of sequences (Ziegler et al. 2019). The coefficient used by a
step is the one in the input state.

Non-finite values: every optimizer update goes through
:func:`jaxrm.steps.train_state.apply_if_finite`. A rollout whose scores or log-probs are not finite
(on response tokens) skips *all* its updates, each counted in ``num_skipped``, and leaves the
KL controller, the baseline and the reward statistics unchanged, so a NaN reward never
reaches the parameters.

Data parallelism: with ``axis_name``, every device holds its shard of the prompts; example
``i`` samples with ``fold_in(key, global_index)``; advantage whitening, loss denominators,
gradients and metrics are averaged over the axis. PPO/GRPO minibatches are *stratified*: the
examples are cut into consecutive blocks of ``num_minibatches`` (by global index) and each
epoch a random permutation per block (keyed by the block's global index) sends one example of
each block to each minibatch. A device therefore holds exactly its share of every global
minibatch, and :func:`jaxrm.steps.parallel.make_parallel_step` over any number of devices gives the
parameters of the single-device step on the global batch (up to float rounding). The local
number of sequences must be divisible by ``num_minibatches``. Parameters are differentiated
pmap-style: under ``shard_map`` use ``check_vma=False`` (the default of
``make_parallel_step``). :func:`with_frozen_params` adapts a step to ``make_parallel_step``'s
``(state, batch)`` signature.

Randomness: the step key is ``fold_in(state.key, state.step)``; sampling uses
``fold_in(step_key, 0)``, minibatch shuffling ``fold_in(step_key, 1)``.

Example::

  config = RLConfig(max_new_tokens=16, kl_estimator='k3', target_kl=6.0)
  params = init_value_head(policy_params, key, config=cfg)        # PPO needs a value head
  state = create_rl_state(params, optimizer, key, kl_coef=0.05)
  step = jax.jit(make_step('ppo', policy=transformer_policy(cfg, value_head=True),
                           config=config, reward_fn=reward_fn, optimizer=optimizer))
  state, metrics = step(state, {'prompts': p, 'prompt_mask': m}, reward_params, ref_params)

References:
  Schulman et al. 2017, "Proximal Policy Optimization Algorithms".
  Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences".
  Ouyang et al. 2022, "Training language models to follow instructions with human feedback".
  Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!".
  Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning
  from Human Feedback in LLMs".
  Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open
  Language Models" (GRPO).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxrm.math import kl as kl_lib
from jaxrm.math import pg_losses
from jaxrm.models.policy import PolicyFns
from jaxrm.steps import rollout as rollout_lib

# The configuration, state and frame live in their own modules; their names are part of this
# module's API (``rl.RLConfig``, ``rl.iterate``, ...).
from jaxrm.steps.rl_config import (  # noqa: F401
  ALGORITHMS,
  BASELINES,
  GRPO_KL,
  REWARD_NORMS,
  RLConfig,
  RLState,
  create_rl_state,
  init_value_head,
)
from jaxrm.steps.rl_frame import (  # noqa: F401
  Algorithm,
  Targets,
  _pmean,
  iterate,
  minibatch_indices,
  shape_scores,
  with_frozen_params,
)
from jaxrm.steps.rl_targets import grpo_targets, ppo_targets, reinforce_targets, rloo_targets


# ----------------------------------------------------------------------------- algorithms
def _ppo_targets(ro, state, *, kl_coef, config, axis_name):
  advantages, returns, _ = ppo_targets(ro, kl_coef=kl_coef, config=config, axis_name=axis_name)
  resp = ro.response_mask
  metrics = {
    "return_mean": _pmean(
      pg_losses.masked_aggregate(returns, resp, axis_name=axis_name), axis_name
    ),
    "value_mean": _pmean(
      pg_losses.masked_aggregate(ro.values, resp, axis_name=axis_name), axis_name
    ),
  }
  data = {
    "logprobs": ro.logprobs,
    "values": ro.values,
    "advantages": advantages,
    "returns": returns,
  }
  return Targets(data, metrics, state.baseline)


def _agg(config: RLConfig, axis_name) -> dict[str, Any]:
  """Token-loss aggregation arguments of :mod:`jaxrm.math.pg_losses`."""
  return dict(
    aggregation=config.aggregation, axis_name=axis_name, norm_length=config.max_new_tokens
  )


def _surrogate(config: RLConfig) -> dict[str, Any]:
  """Clipped-surrogate arguments of :func:`jaxrm.math.pg_losses.ppo_policy_loss`."""
  return dict(
    clip_eps=config.clip_eps,
    clip_eps_high=config.clip_eps_high,
    dual_clip=config.dual_clip,
    ratio_level=config.ratio_level,
  )


def _ppo_loss(params, mb, *, policy, config, kl_coef, axis_name):
  """Clipped surrogate + ``value_coef`` x clipped value loss - ``entropy_coef`` x entropy."""
  del kl_coef  # in the rewards
  agg = _agg(config, axis_name)
  logp, entropy, values = rollout_lib.policy_outputs(
    params, mb["tokens"], mb["mask"], policy=policy, value_head=True, temperature=config.temperature
  )
  m = mb["response_mask"]
  pl, paux = pg_losses.ppo_policy_loss(
    logp, mb["logprobs"], mb["advantages"], m, **_surrogate(config), **agg
  )
  vl, vaux = pg_losses.ppo_value_loss(
    values, mb["values"], mb["returns"], m, clip_eps=config.value_clip_eps, **agg
  )
  ent = pg_losses.entropy_bonus(entropy, m, **agg)
  loss = pl + config.value_coef * vl - config.entropy_coef * ent
  return loss, {
    "policy_loss": pl,
    "value_loss": vl,
    "clip_fraction": paux["clip_fraction"],
    "approx_kl": paux["approx_kl"],
    "value_clip_fraction": vaux["clip_fraction"],
  }


def _pg_loss(params, mb, *, policy, config, kl_coef, axis_name):
  """``-A log pi - entropy_coef * H`` over the response (REINFORCE, RLOO)."""
  del kl_coef  # in the advantages
  agg = _agg(config, axis_name)
  logp, entropy, _ = rollout_lib.policy_outputs(
    params, mb["tokens"], mb["mask"], policy=policy, temperature=config.temperature
  )
  m = mb["response_mask"]
  pl = pg_losses.reinforce_loss(logp, mb["advantages"], m, **agg)
  ent = pg_losses.entropy_bonus(entropy, m, **agg)
  return pl - config.entropy_coef * ent, {"policy_loss": pl}


def _reinforce_targets(ro, state, *, kl_coef, config, axis_name):
  advantages, episode, used, new_baseline = reinforce_targets(
    ro, state.baseline, kl_coef=kl_coef, config=config, axis_name=axis_name
  )
  metrics = {"return_mean": _pmean(jnp.mean(episode), axis_name), "baseline": used}
  return Targets({"advantages": advantages}, metrics, new_baseline)


def _rloo_targets(ro, state, *, kl_coef, config, axis_name):
  advantages, reward = rloo_targets(ro, kl_coef=kl_coef, config=config)
  metrics = {"return_mean": _pmean(jnp.mean(reward), axis_name)}
  return Targets({"advantages": advantages}, metrics, state.baseline)


def _grpo_targets(ro, state, *, kl_coef, config, axis_name):
  advantages, reward = grpo_targets(ro, kl_coef=kl_coef, config=config, axis_name=axis_name)
  data = {"logprobs": ro.logprobs, "ref_logprobs": ro.ref_logprobs, "advantages": advantages}
  metrics = {"return_mean": _pmean(jnp.mean(reward), axis_name)}
  return Targets(data, metrics, state.baseline)


def _grpo_loss(params, mb, *, policy, config, kl_coef, axis_name):
  """Clipped surrogate - entropy bonus (+ ``kl_coef`` x the aggregated KL estimate)."""
  agg = _agg(config, axis_name)
  logp, entropy, _ = rollout_lib.policy_outputs(
    params, mb["tokens"], mb["mask"], policy=policy, temperature=config.temperature
  )
  m = mb["response_mask"]
  pl, paux = pg_losses.ppo_policy_loss(
    logp, mb["logprobs"], mb["advantages"], m, **_surrogate(config), **agg
  )
  loss = pl - config.entropy_coef * pg_losses.entropy_bonus(entropy, m, **agg)
  kl_loss = jnp.zeros((), jnp.float32)
  if config.grpo_kl == "loss":
    per_token = kl_lib.kl_estimate(logp, mb["ref_logprobs"], estimator=config.kl_estimator)
    kl_loss = pg_losses.masked_aggregate(per_token, m, **agg)
    loss = loss + kl_coef * kl_loss
  return loss, {
    "policy_loss": pl,
    "kl_loss": kl_loss,
    "clip_fraction": paux["clip_fraction"],
    "approx_kl": paux["approx_kl"],
  }


PPO = Algorithm(targets=_ppo_targets, loss=_ppo_loss, value_head=True, epochs=True)
REINFORCE = Algorithm(targets=_reinforce_targets, loss=_pg_loss)
RLOO = Algorithm(targets=_rloo_targets, loss=_pg_loss, grouped=True)
GRPO = Algorithm(targets=_grpo_targets, loss=_grpo_loss, grouped=True, epochs=True)


# ----------------------------------------------------------------------------- steps
def ppo_step(
  state: RLState,
  batch: Mapping[str, jax.Array],
  reward_params: Any,
  ref_params: Any,
  *,
  policy: PolicyFns,
  config: RLConfig,
  reward_fn: rollout_lib.RewardFn,
  optimizer: optax.GradientTransformation,
  axis_name: Any = None,
  return_rollout: bool = False,
  diagnostics_fn: Callable[..., Any] | None = None,
):
  """One PPO iteration: a rollout, GAE, then ``num_epochs x num_minibatches`` updates.

  Per-token rewards ``-kl_coef * KL_t`` plus the score at the last response token, GAE with
  the policy's values (:func:`ppo_targets`); each update minimises the clipped surrogate +
  ``value_coef`` x the clipped value loss - ``entropy_coef`` x the entropy.

  Args:
    state: :class:`RLState` whose ``params`` include a value head (:func:`init_value_head`
      for jaxrm's transformer).
    batch: ``{'prompts': [b, p] int, 'prompt_mask': [b, p] bool}``, LEFT-padded prompts.
    reward_params: first argument of ``reward_fn``.
    ref_params: reference policy variables (same ``policy.apply``).
    policy: the policy's functions, with values (``transformer_policy(cfg,
      value_head=True)``, or :func:`jaxrm.models.policy.apply_fn_policy` of an ``apply_fn``
      returning values).
    config: :class:`RLConfig` (static).
    reward_fn: ``reward_fn(reward_params, tokens [b, s], mask [b, s]) -> [b]``.
    optimizer: optax transformation matching ``state.opt_state``.
    axis_name: mapped axis for data parallelism (None under plain jit / vmap).
    return_rollout: also return ``{'tokens', 'mask', 'response_mask', 'scores'}`` of the
      rollout (gathered over ``axis_name``: the global batch in device order), e.g. to score
      the same samples with a gold reward.
    diagnostics_fn: logged-only ``diagnostics_fn(reward_params, tokens, mask) -> {name:
      [batch]}`` (e.g. a gold reward next to the proxy), each name's batch mean a metric
      (:func:`jaxrm.steps.rl_diagnostics.rollout_metrics`).

  Returns:
    ``(state, metrics)`` or ``(state, metrics, rollout)``. Metrics (scalars, global):
    ``score`` (mean ``reward_fn``), ``kl_k1`` (mean k1 sequence KL to the reference),
    ``kl_k2``/``kl_k3`` (the same with ``config.kl_estimator`` when not k1), ``kl_exact``
    (``config.exact_kl``: the full-distribution per-token KL summed over the response), the
    ``diagnostics_fn`` names, ``entropy`` (per response
    token), ``response_length``, ``kl_coef`` (used by this step), ``loss``,
    ``policy_loss``, ``value_loss``, ``clip_fraction``, ``value_clip_fraction``,
    ``approx_kl`` (k3 estimate of KL(sampling policy || current policy) from the token ratios;
    TRL logs k2, OpenRLHF k1), ``grad_norm`` (means over the updates),
    ``return_mean``, ``value_mean``, ``nonfinite`` (an update was skipped), ``num_skipped``,
    and ``shaped_score`` (mean score after ``missing_eos_penalty`` / ``reward_norm``) when
    either is on.
  """
  return iterate(
    PPO,
    state,
    batch,
    reward_params,
    ref_params,
    policy=policy,
    config=config,
    reward_fn=reward_fn,
    optimizer=optimizer,
    axis_name=axis_name,
    return_rollout=return_rollout,
    diagnostics_fn=diagnostics_fn,
  )


def reinforce_step(
  state: RLState,
  batch: Mapping[str, jax.Array],
  reward_params: Any,
  ref_params: Any,
  **kwargs: Any,
):
  """One REINFORCE iteration: a rollout, reward-to-go minus a baseline, one update.

  Per-token rewards are those of PPO (``-kl_coef * KL_t``, plus the score at the last
  response token); the advantage of token ``t`` is the reward-to-go ``G_t`` (discount
  ``config.gamma``) minus the baseline ``config.baseline``: ``'moving_average'`` (the EMA of
  past episode returns in ``state.baseline``, used before it is updated with this batch, so
  it is independent of the current samples), ``'batch'`` (the mean episode return of this
  global batch; slightly biased, as each sample is in its own baseline) or ``'none'``.

  Args and returns: as :func:`ppo_step` (the same keyword-only arguments ``policy``,
  ``config``, ``reward_fn``, ``optimizer``, ``axis_name``, ``return_rollout``; no value head
  needed). Metrics: the rollout ones,
  ``loss``, ``policy_loss``, ``grad_norm``, ``return_mean`` (mean episode return),
  ``baseline`` (the value subtracted), ``nonfinite``, ``num_skipped``.
  """
  return iterate(REINFORCE, state, batch, reward_params, ref_params, **kwargs)


def rloo_step(
  state: RLState,
  batch: Mapping[str, jax.Array],
  reward_params: Any,
  ref_params: Any,
  **kwargs: Any,
):
  """One RLOO iteration: ``config.num_samples`` responses per prompt, one update.

  The whole response is one action: its reward is ``score - kl_coef * KL_seq`` (the chosen
  estimator summed over the response), its advantage the reward minus the mean reward of the
  other samples of the same prompt (:func:`jaxrm.math.advantages.rloo_advantages`), applied to
  every response token of ``-A log pi``.

  Args and returns: as :func:`ppo_step` (the same keyword-only arguments, no value head),
  with ``b`` prompts giving ``b * num_samples``
  sequences (the rollout returned has ``b * num_samples`` rows, the samples of a prompt
  adjacent). Metrics: the rollout ones, ``loss``, ``policy_loss``, ``grad_norm``,
  ``return_mean`` (mean sequence reward), ``nonfinite``, ``num_skipped``.
  """
  return iterate(RLOO, state, batch, reward_params, ref_params, **kwargs)


def grpo_step(
  state: RLState,
  batch: Mapping[str, jax.Array],
  reward_params: Any,
  ref_params: Any,
  **kwargs: Any,
):
  """One GRPO iteration: ``num_samples`` responses per prompt, clipped-surrogate updates.

  Advantages are the group-normalised scores (:func:`jaxrm.math.advantages.grpo_advantages`,
  ``config.grpo_scale``) broadcast over the response tokens; the loss of each of the
  ``num_epochs x num_minibatches`` updates is the PPO clipped surrogate (no value function)
  minus ``entropy_coef`` x the entropy. KL penalty (``config.grpo_kl``): ``'loss'`` adds
  ``kl_coef * aggregate(kl_estimate(log pi, log pi_ref))`` to the loss, differentiated
  through the current policy (DeepSeekMath uses ``kl_estimator='k3'``); ``'reward'``
  subtracts ``kl_coef * KL_seq`` from the score before normalisation.

  Args and returns: as :func:`rloo_step`. Metrics: the rollout ones, ``loss``,
  ``policy_loss``, ``kl_loss`` (the aggregated KL term, 0 in ``'reward'`` mode),
  ``clip_fraction``, ``approx_kl``, ``grad_norm``, ``return_mean``, ``nonfinite``,
  ``num_skipped``.
  """
  return iterate(GRPO, state, batch, reward_params, ref_params, **kwargs)


_STEPS = {"ppo": ppo_step, "reinforce": reinforce_step, "rloo": rloo_step, "grpo": grpo_step}


def get_step(algo: str) -> Callable[..., Any]:
  """The step function of ``algo`` in :data:`ALGORITHMS`."""
  if algo not in _STEPS:
    raise ValueError(f"algo must be one of {ALGORITHMS}, got {algo!r}")
  return _STEPS[algo]


def make_step(
  algo: str,
  *,
  policy: PolicyFns,
  config: RLConfig,
  reward_fn: rollout_lib.RewardFn,
  optimizer: optax.GradientTransformation,
  return_rollout: bool = False,
  diagnostics_fn: Callable[..., Any] | None = None,
) -> Callable[..., Any]:
  """``step(state, batch, reward_params, ref_params, *, axis_name=None)`` for ``algo``.

  ``diagnostics_fn``: logged-only per-sequence quantities (:func:`ppo_step`)."""
  if not isinstance(policy, PolicyFns):
    raise ValueError(
      f"policy must be a PolicyFns (transformer_policy(config) or apply_fn_policy(apply_fn)), "
      f"got {type(policy).__name__}"
    )
  return functools.partial(
    get_step(algo),
    policy=policy,
    config=config,
    reward_fn=reward_fn,
    optimizer=optimizer,
    return_rollout=return_rollout,
    diagnostics_fn=diagnostics_fn,
  )


def uses_value_head(algo: str) -> bool:
  """Whether ``algo``'s policy needs a value head (:func:`init_value_head`)."""
  get_step(algo)
  return algo == "ppo"
