"""The iteration frame shared by the RL algorithms (:mod:`jaxrm.steps.rl`).

:func:`iterate` runs one iteration of an :class:`Algorithm`: collect a rollout -> finite flag
-> KL coefficient -> score shaping (:func:`shape_scores`) -> the algorithm's targets -> the
updates of its loss (``num_epochs x num_minibatches`` stratified minibatches, or one) -> KL
controller, baseline and reward statistics -> advance the step. An algorithm states only its
targets and its loss. Conventions (keys, minibatches, data parallelism) are those described
in :mod:`jaxrm.steps.rl`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import functools
from typing import Any, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import optax

from jaxrm.math import advantages as adv_lib
from jaxrm.math import kl as kl_lib
from jaxrm.math import running_stats
from jaxrm.models.policy import PolicyFns
from jaxrm.steps import rl_diagnostics
from jaxrm.steps import rollout as rollout_lib
from jaxrm.steps import train_state as train_state_lib
from jaxrm.steps.rl_config import RLConfig, RLState


def with_frozen_params(step_fn: Callable[..., Any]) -> Callable[..., Any]:
  """Adapts ``step_fn(state, batch, reward_params, ref_params, *, axis_name)`` to
  :func:`jaxrm.steps.parallel.make_parallel_step`, whose steps take ``(state, batch)``.

  The returned step takes and returns the carry ``(state, reward_params, ref_params)`` (the
  frozen parameters are returned unchanged, so donating the carry costs no copy)::

    pstep = make_parallel_step(with_frozen_params(functools.partial(ppo_step, ...)))
    carry = pstep.put_state((state, reward_params, ref_params))
    carry, metrics = pstep(carry, pstep.shard_batch(batch))
  """

  def step(carry, batch, *, axis_name=None):
    state, reward_params, ref_params = carry
    out = step_fn(state, batch, reward_params, ref_params, axis_name=axis_name)
    return ((out[0], reward_params, ref_params),) + tuple(out[1:])

  return step


# ----------------------------------------------------------------------------- internals
def _pmean(x: Any, axis_name: Any) -> Any:
  return x if axis_name is None else lax.pmean(x, axis_name)


def _axis_size(axis_name: Any) -> Any:
  return 1 if axis_name is None else lax.psum(1, axis_name)


def _prompts(
  batch: Mapping[str, Any], policy: PolicyFns, config: RLConfig
) -> tuple[jax.Array, jax.Array]:
  if not isinstance(batch, Mapping) or "prompts" not in batch or "prompt_mask" not in batch:
    keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
    raise ValueError(f"batch must be a dict with 'prompts' and 'prompt_mask', got {keys}")
  rollout_lib.check_prompts(
    batch["prompts"],
    batch["prompt_mask"],
    max_len=policy.max_len,
    max_new_tokens=config.max_new_tokens,
  )
  rollout_lib.check_eos_id(config.eos_id, vocab_size=policy.vocab_size)
  return (jnp.asarray(batch["prompts"], jnp.int32), jnp.asarray(batch["prompt_mask"]).astype(bool))


def _collect(
  state: RLState,
  batch,
  reward_params,
  ref_params,
  *,
  policy: PolicyFns,
  config: RLConfig,
  reward_fn,
  axis_name,
  num_samples: int = 1,
  value_head: bool = False,
):
  """Rollout of ``num_samples`` responses per prompt; returns (rollout, offset, update key)."""
  prompts, prompt_mask = _prompts(batch, policy, config)
  if num_samples > 1:  # rows [p0 x k, p1 x k, ...]; global example = prompt * k + j
    prompts = jnp.repeat(prompts, num_samples, axis=0)
    prompt_mask = jnp.repeat(prompt_mask, num_samples, axis=0)
  local = prompts.shape[0]
  offset = rollout_lib.global_offset(local, axis_name)
  step_key = train_state_lib.step_key(state)
  ro = rollout_lib.rollout(
    state.params,
    ref_params,
    reward_params,
    prompts,
    prompt_mask,
    jax.random.fold_in(step_key, 0),
    policy=policy,
    reward_fn=reward_fn,
    max_new_tokens=config.max_new_tokens,
    temperature=config.temperature,
    eos_id=config.eos_id,
    kl_estimator=config.kl_estimator,
    value_head=value_head,
    example_offset=offset,
    exact_kl=config.exact_kl,
  )
  return ro, offset, jax.random.fold_in(step_key, 1)


def _rollout_finite(ro: rollout_lib.Rollout, axis_name) -> jax.Array:
  """True iff scores and response log-probs (and values) are finite on every device."""
  arrays = [ro.scores, ro.logprobs, ro.ref_logprobs] + ([] if ro.values is None else [ro.values])
  return _all_finite(arrays, axis_name)


def _all_finite(tree: Any, axis_name) -> jax.Array:
  """True iff every inexact leaf of ``tree`` is finite on every device."""
  ok = train_state_lib.tree_all_finite(tree)
  if axis_name is not None:
    ok = lax.pmin(ok.astype(jnp.int32), axis_name).astype(bool)
  return ok


def _select(pred, on_true, on_false):
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def _sequence_kl(ro: rollout_lib.Rollout) -> tuple[jax.Array, jax.Array]:
  """``(k1, chosen estimator)`` sequence KL sums over the response, each ``[batch]``."""
  k1 = kl_lib.sequence_kl(kl_lib.kl_k1(ro.logprobs, ro.ref_logprobs), ro.response_mask)
  return k1, kl_lib.sequence_kl(ro.kl, ro.response_mask)


def _next_kl_state(
  state: RLState, ro: rollout_lib.Rollout, ok, *, config: RLConfig, axis_name
) -> adv_lib.AdaptiveKLState:
  if config.target_kl is None:
    return state.kl
  _, est = _sequence_kl(ro)
  current = _pmean(jnp.mean(est), axis_name)
  n = ro.scores.shape[0] * _axis_size(axis_name)
  new = adv_lib.adaptive_kl_update(
    state.kl, current, n, target_kl=config.target_kl, horizon=config.kl_horizon
  )
  return _select(ok, new, state.kl)


def minibatch_indices(
  key: jax.Array, local_size: int, num_minibatches: int, *, offset: Any = 0
) -> jax.Array:
  """Stratified minibatch split of this device's examples -> ``[num_minibatches, size]``.

  Examples are cut into consecutive blocks of ``num_minibatches`` (block ``b`` holds global
  examples ``b * M .. b * M + M - 1``, with ``offset`` the global index of the first local
  example, a multiple of ``M``); each block is permuted with ``fold_in(key, b)`` and its
  ``j``-th example goes to minibatch ``j``. Every example is in exactly one minibatch, each
  minibatch takes one example per block, and the split of the global batch does not depend
  on how it is sharded over devices.

  Returns:
    Local indices ``[num_minibatches, local_size // num_minibatches]`` int32.
  """
  if local_size % num_minibatches:
    raise ValueError(
      f"the number of sequences per device ({local_size}) must be divisible by "
      f"num_minibatches ({num_minibatches})"
    )
  m = num_minibatches
  blocks = local_size // m
  first_block = offset // m
  perms = jax.vmap(lambda b: jax.random.permutation(jax.random.fold_in(key, b), m))(
    first_block + jnp.arange(blocks)
  )  # [blocks, m]
  return (jnp.arange(blocks)[None, :] * m + perms.T).astype(jnp.int32)


def _optimize(
  state: RLState,
  data: dict[str, jax.Array],
  loss_fn,
  *,
  key,
  num_epochs: int,
  num_minibatches: int,
  offset,
  rollout_ok,
  optimizer,
  config: RLConfig,
  axis_name,
) -> tuple[RLState, dict[str, jax.Array]]:
  """``num_epochs x num_minibatches`` updates of ``loss_fn(params, minibatch)`` (a scan).

  Returns the state with new ``params``, ``opt_state`` and ``num_skipped`` (``step`` is not
  advanced here) and the metrics averaged over the updates.
  """
  local = jax.tree.leaves(data)[0].shape[0]
  idx = jax.vmap(
    lambda e: minibatch_indices(jax.random.fold_in(key, e), local, num_minibatches, offset=offset)
  )(jnp.arange(num_epochs))
  idx = idx.reshape(num_epochs * num_minibatches, local // num_minibatches)

  def body(st, ids):
    mb = jax.tree.map(lambda x: x[ids], data)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(st.params, mb)
    grads, loss, aux = _pmean((grads, loss, aux), axis_name)
    guarded = jnp.where(rollout_ok, loss, jnp.nan)
    st, bad = train_state_lib.apply_if_finite(
      st, grads, guarded, optimizer, nonfinite=config.nonfinite, axis_name=axis_name
    )
    aux = dict(aux, loss=loss, grad_norm=optax.tree.norm(grads))
    return st, (aux, bad)

  new, (aux, bad) = lax.scan(body, state, idx)
  metrics = jax.tree.map(jnp.mean, aux)
  metrics["nonfinite"] = jnp.any(bad)
  return new._replace(step=state.step), metrics


def _finish(state: RLState, new: RLState, metrics, *, kl_state, baseline, config: RLConfig):
  """Advances the step, or (``'raise'`` mode, a skipped update) returns the input state."""
  new = new._replace(step=state.step + 1, kl=kl_state, baseline=baseline)
  if config.nonfinite == "raise":
    new = _select(metrics["nonfinite"], state, new)
  metrics["num_skipped"] = new.num_skipped
  return new


def _rollout_output(ro: rollout_lib.Rollout, axis_name) -> dict[str, jax.Array]:
  out = {
    "tokens": ro.tokens,
    "mask": ro.mask,
    "response_mask": ro.response_mask,
    "scores": ro.scores,
  }
  if axis_name is not None:
    out = jax.tree.map(lambda x: lax.all_gather(x, axis_name, tiled=True, to="invarying"), out)
  return out


def _result(new, metrics, ro, return_rollout, axis_name):
  if return_rollout:
    return new, metrics, _rollout_output(ro, axis_name)
  return new, metrics


def _check_optimizer(optimizer):
  if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
    raise ValueError(
      f"optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}"
    )


# ----------------------------------------------------------------------------- frame
class Targets(NamedTuple):
  """What an algorithm derives from a rollout before its updates.

  Attributes:
    data: per-sequence arrays (leading axis ``[batch]``) the loss reads besides ``tokens``,
      ``mask`` and ``response_mask`` (minibatched with them).
    metrics: scalar metrics of the targets (global under ``axis_name``).
    baseline: the next REINFORCE baseline state (kept only if the rollout is finite).
  """

  data: dict[str, jax.Array]
  metrics: dict[str, jax.Array]
  baseline: adv_lib.ReinforceBaselineState


class Algorithm(NamedTuple):
  """An RL algorithm as the shared iteration frame (:func:`iterate`) sees it.

  Attributes:
    targets: ``targets(ro, state, *, kl_coef, config, axis_name) -> Targets``.
    loss: ``loss(params, mb, *, policy, config, kl_coef, axis_name) -> (loss, aux)`` on a
      minibatch ``mb`` of the rollout's ``tokens``, ``mask``, ``response_mask`` and
      ``Targets.data``; ``aux`` is a dict of scalars (averaged over the updates).
    grouped: samples ``config.num_samples`` responses per prompt.
    value_head: reads the policy's values (rollout and loss).
    epochs: makes ``config.num_epochs x config.num_minibatches`` updates (else one update on
      the whole batch).
  """

  targets: Callable[..., Targets]
  loss: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
  grouped: bool = False
  value_head: bool = False
  epochs: bool = False


def iterate(
  algorithm: Algorithm,
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
  diagnostics_fn: rl_diagnostics.DiagnosticsFn | None = None,
):
  """One RL iteration of ``algorithm``: the frame every step shares.

  Collect a rollout (``num_samples`` per prompt if grouped) -> is it finite on every device
  -> the KL coefficient of ``state`` -> ``algorithm.targets`` -> the updates of
  ``algorithm.loss`` (``num_epochs x num_minibatches`` stratified minibatches, or one) ->
  the KL controller and baseline (unchanged when the rollout is not finite) -> advance the
  step. Arguments and returns as :func:`ppo_step`; the rollout metrics (and the logged-only
  ``diagnostics_fn``) are those of :func:`jaxrm.steps.rl_diagnostics.rollout_metrics`.
  """
  _check_optimizer(optimizer)
  ro, offset, key = _collect(
    state,
    batch,
    reward_params,
    ref_params,
    policy=policy,
    config=config,
    reward_fn=reward_fn,
    axis_name=axis_name,
    num_samples=config.num_samples if algorithm.grouped else 1,
    value_head=algorithm.value_head,
  )
  ok = _rollout_finite(ro, axis_name)
  kl_coef = state.kl.kl_coef
  scores, reward_stats = shape_scores(ro, state.reward_stats, config=config, axis_name=axis_name)
  shaped = ro._replace(scores=scores)
  targets = algorithm.targets(shaped, state, kl_coef=kl_coef, config=config, axis_name=axis_name)
  # finite but huge scores (~1e19) can overflow the running statistics: such a step is refused
  # like a non-finite rollout, so that no side state keeps an infinity
  ok = ok & _all_finite([reward_stats, targets.baseline], axis_name)
  reward_stats = _select(ok, reward_stats, state.reward_stats)
  baseline = _select(ok, targets.baseline, state.baseline)
  data = {"tokens": ro.tokens, "mask": ro.mask, "response_mask": ro.response_mask}
  data.update(targets.data)
  loss_fn = functools.partial(
    algorithm.loss, policy=policy, config=config, kl_coef=kl_coef, axis_name=axis_name
  )
  new, metrics = _optimize(
    state,
    data,
    loss_fn,
    key=key,
    num_epochs=config.num_epochs if algorithm.epochs else 1,
    num_minibatches=config.num_minibatches if algorithm.epochs else 1,
    offset=offset,
    rollout_ok=ok,
    optimizer=optimizer,
    config=config,
    axis_name=axis_name,
  )
  metrics.update(
    rl_diagnostics.rollout_metrics(
      ro,
      config=config,
      axis_name=axis_name,
      diagnostics_fn=diagnostics_fn,
      reward_params=reward_params,
    )
  )
  metrics["kl_coef"] = kl_coef
  metrics.update(targets.metrics)
  if config.missing_eos_penalty is not None or config.reward_norm != "none":
    metrics["shaped_score"] = _pmean(jnp.mean(scores), axis_name)
  kl_state = _next_kl_state(state, ro, ok, config=config, axis_name=axis_name)
  new = new._replace(reward_stats=reward_stats)
  new = _finish(state, new, metrics, kl_state=kl_state, baseline=baseline, config=config)
  return _result(new, metrics, ro, return_rollout, axis_name)


def shape_scores(
  ro: rollout_lib.Rollout,
  reward_stats: running_stats.RunningMoments,
  *,
  config: RLConfig,
  axis_name: Any = None,
) -> tuple[jax.Array, running_stats.RunningMoments]:
  """The scores the algorithm optimises, and the next running reward statistics.

  ``config.missing_eos_penalty`` is subtracted from the score of every response without
  ``config.eos_id``; then ``config.reward_norm`` applies: ``'whiten'`` standardises the
  scores over the global batch (:func:`jaxrm.math.advantages.whiten`, population variance),
  ``'running'`` merges them into ``reward_stats`` and standardises them with the merged
  statistics (:mod:`jaxrm.math.running_stats`). ``reward_stats`` is returned unchanged unless
  ``'running'``. The metrics' ``score`` stays the raw ``reward_fn`` mean.

  Returns:
    ``(scores [batch], reward_stats)``.
  """
  scores = ro.scores
  if config.missing_eos_penalty is not None:
    has_eos = jnp.any(ro.response_mask & (ro.tokens == config.eos_id), axis=1)
    scores = scores - jnp.where(has_eos, 0.0, config.missing_eos_penalty)
  if config.reward_norm == "whiten":
    scores = adv_lib.whiten(scores, jnp.ones(scores.shape, bool), axis_name=axis_name)
  elif config.reward_norm == "running":
    reward_stats = running_stats.running_moments_update(reward_stats, scores, axis_name=axis_name)
    scores = running_stats.normalize(scores, reward_stats)
  return scores, reward_stats
