"""Advantages and returns of a rollout, per algorithm: PPO, REINFORCE, RLOO and GRPO.

The targets half of each :mod:`jaxrm.steps.rl` algorithm (the losses and steps live there;
:mod:`jaxrm.steps.rl` re-exports these functions). Each takes a
:class:`jaxrm.steps.rollout.Rollout` and the step's KL coefficient; under ``axis_name`` the
batch statistics (whitening, baselines, GRPO's batch scale) are those of the global batch.
Token alignment and the estimators: :mod:`jaxrm.math.advantages`, :mod:`jaxrm.math.kl`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxrm.math import advantages as adv_lib
from jaxrm.math import kl as kl_lib
from jaxrm.steps import rollout as rollout_lib
from jaxrm.steps.rl_config import RLConfig
from jaxrm.steps.rl_frame import _pmean


def ppo_targets(
  ro: rollout_lib.Rollout, *, kl_coef: jax.typing.ArrayLike, config: RLConfig, axis_name: Any = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """PPO advantages and value targets of a rollout.

  Token rewards ``r_t = -kl_coef * ro.kl[t]`` plus ``ro.scores`` at the last response token
  (:func:`jaxrm.math.advantages.rlhf_token_rewards`), GAE with ``ro.values``
  (``config.gamma``, ``config.lam``), advantages whitened over the response tokens of the
  global batch when ``config.whiten_advantages``.

  Returns:
    ``(advantages, returns, rewards)``, each ``[batch, seq]``, 0 outside the response.
  """
  if ro.values is None:
    raise ValueError("ppo_targets needs rollout values: sample with value_head=True")
  resp = ro.response_mask
  rewards = adv_lib.rlhf_token_rewards(ro.scores, ro.kl, resp, kl_coef=kl_coef)
  advantages, returns = adv_lib.batched_gae(
    rewards, ro.values, resp, gamma=config.gamma, lam=config.lam
  )
  if config.whiten_advantages:
    advantages = adv_lib.whiten(advantages, resp, axis_name=axis_name)
  return advantages, returns, rewards


def reinforce_targets(
  ro: rollout_lib.Rollout,
  baseline: adv_lib.ReinforceBaselineState,
  *,
  kl_coef: jax.typing.ArrayLike,
  config: RLConfig,
  axis_name: Any = None,
):
  """REINFORCE advantages ``G_t - b`` of a rollout, and the next baseline state.

  ``G_t`` is the reward-to-go (``config.gamma``) of the PPO token rewards; the episode return
  is ``G`` at the first response token. ``b`` depends on ``config.baseline``:
  ``'moving_average'`` uses ``baseline.value`` (past batches only) and returns it updated
  with this batch's mean episode return (the global mean under ``axis_name``);
  ``'batch'`` uses the mean episode return of the global batch; ``'none'`` uses 0 (the
  baseline state is then returned unchanged).

  Returns:
    ``(advantages [batch, seq], episode_returns [batch], b (scalar), new_baseline)``.
  """
  resp = ro.response_mask
  rewards = adv_lib.rlhf_token_rewards(ro.scores, ro.kl, resp, kl_coef=kl_coef)
  returns = adv_lib.batched_reinforce_returns(rewards, resp, gamma=config.gamma)
  first = jnp.argmax(resp, axis=1)
  episode = jnp.take_along_axis(returns, first[:, None], axis=1)[:, 0]
  new_baseline = baseline
  if config.baseline == "moving_average":
    used = baseline
    new_baseline = adv_lib.reinforce_baseline_update(baseline, episode, decay=config.baseline_decay)
    # The update is linear in the batch mean, so averaging it gives the global-batch update.
    new_baseline = new_baseline._replace(value=_pmean(new_baseline.value, axis_name))
  elif config.baseline == "batch":
    used = baseline._replace(value=_pmean(jnp.mean(episode), axis_name))
  else:
    used = baseline._replace(value=jnp.zeros_like(baseline.value))
  advantages = adv_lib.reinforce_advantages(returns, resp, used)
  return advantages, episode, used.value, new_baseline


def rloo_targets(
  ro: rollout_lib.Rollout, *, kl_coef: jax.typing.ArrayLike, config: RLConfig
) -> tuple[jax.Array, jax.Array]:
  """RLOO advantages of a rollout with ``config.num_samples`` adjacent samples per prompt.

  The sequence reward is ``score - kl_coef * sum_t ro.kl[t]``; its leave-one-out advantage
  within the prompt's group is broadcast over the response tokens.

  Returns:
    ``(advantages [batch, seq], sequence_rewards [batch])``.
  """
  reward = ro.scores - kl_coef * kl_lib.sequence_kl(ro.kl, ro.response_mask)
  seq_adv = adv_lib.rloo_advantages(_groups(reward, config.num_samples)).reshape(-1)
  return _broadcast(seq_adv, ro.response_mask), reward


def grpo_targets(
  ro: rollout_lib.Rollout, *, kl_coef: jax.typing.ArrayLike, config: RLConfig, axis_name: Any = None
) -> tuple[jax.Array, jax.Array]:
  """GRPO advantages: group-normalised sequence rewards broadcast over the response.

  The sequence reward is the score, minus ``kl_coef * sum_t ro.kl[t]`` when
  ``config.grpo_kl == 'reward'``; scaled as ``config.grpo_scale`` says (``'batch'``: the
  standard deviation of the global batch under ``axis_name``).

  Returns:
    ``(advantages [batch, seq], sequence_rewards [batch])``.
  """
  reward = ro.scores
  if config.grpo_kl == "reward":
    reward = reward - kl_coef * kl_lib.sequence_kl(ro.kl, ro.response_mask)
  seq_adv = adv_lib.grpo_advantages(
    _groups(reward, config.num_samples), scale=config.grpo_scale, axis_name=axis_name
  ).reshape(-1)
  return _broadcast(seq_adv, ro.response_mask), reward


def _broadcast(seq_values: jax.Array, response_mask: jax.Array) -> jax.Array:
  return jnp.where(response_mask, seq_values[:, None], 0.0)


def _groups(x: jax.Array, k: int) -> jax.Array:
  if x.shape[0] % k:
    raise ValueError(
      f"the number of sequences {x.shape[0]} must be a multiple of "
      f"num_samples={k} (samples of a prompt are adjacent)"
    )
  return x.reshape(-1, k)
