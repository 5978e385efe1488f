"""Reward-ensemble objectives: combine the rewards of ``k`` reward models into one.

Given member rewards ``[k, batch, ...]`` (members on the leading axis, e.g. the ``[k, batch]``
output of ``jaxrm.models.ensemble.apply_ensemble``), an objective returns one reward per example
``[batch, ...]``, usable as the proxy reward of best-of-n or RL:

* ``ensemble_mean``: the mean over members;
* ``ensemble_worst_case``: the minimum over members (WCO);
* ``ensemble_uncertainty_weighted``: ``mean - coef * variance`` (UWO).

Coste et al. (2023) find that with noisy labels, optimising the mean still over-optimises while
the worst-case and uncertainty-weighted objectives barely do. ``ensemble_objective`` maps the
names of an experiment flag to these functions.

Members' offsets and scales are arbitrary under Bradley-Terry (only reward differences are
trained), so the min and the variance over members mix incomparable numbers unless the
members are first put on one scale: :func:`normalize_members` standardises each member, by
fixed statistics (e.g. measured on ``pi_init`` samples, so a reward does not depend on the
rest of the batch) or by the statistics of the rewards at hand; ``ensemble_objective(...,
normalize=...)`` applies it before the objective.

References:
    Coste, Anwar, Kirk and Krueger, "Reward Model Ensembles Help Mitigate Overoptimization",
    2023.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxrm.math._arrays import as_float

OBJECTIVES = ("mean", "worst_case", "uncertainty_weighted")
NORMALIZATIONS = ("none", "batch", "fixed")


def _members(rewards: ArrayLike) -> jax.Array:
  rewards = as_float(rewards, "rewards")
  if rewards.ndim < 2 or rewards.shape[0] < 1:
    raise ValueError(
      "rewards must have shape [k, batch, ...] (ensemble members first, k >= 1), got "
      f"{rewards.shape}; for one example's k member rewards pass rewards[:, None]"
    )
  return rewards


def normalize_members(
  rewards: ArrayLike,
  *,
  mean: ArrayLike | None = None,
  std: ArrayLike | None = None,
  eps: float = 1e-8,
) -> jax.Array:
  """Standardises each member's rewards: ``(r_j - mean_j) / (std_j + eps)``.

  Args:
      rewards: member rewards, ``[k, ...]``.
      mean: ``[k]`` fixed member means, or None to use each member's mean over all entries
          of ``rewards[j]``.
      std: ``[k]`` fixed member standard deviations, or None to use each member's population
          standard deviation over ``rewards[j]``. Give both or neither.
      eps: added to the standard deviation.

  Returns:
      ``[k, ...]``.
  """
  rewards = _members(rewards)
  k = rewards.shape[0]
  if (mean is None) != (std is None):
    raise ValueError("give both mean and std (fixed statistics) or neither (batch statistics)")
  axes = tuple(range(1, rewards.ndim))
  if mean is None:
    mean = jnp.mean(rewards, axis=axes)
    std = jnp.sqrt(jnp.mean(jnp.square(rewards - jnp.expand_dims(mean, axes)), axis=axes))
  mean, std = jnp.asarray(mean, rewards.dtype), jnp.asarray(std, rewards.dtype)
  for name, x in (("mean", mean), ("std", std)):
    if x.shape != (k,):
      raise ValueError(f"{name} must have shape [k] = ({k},), got {x.shape}")
  return (rewards - jnp.expand_dims(mean, axes)) / (jnp.expand_dims(std, axes) + eps)


def ensemble_mean(rewards: ArrayLike) -> jax.Array:
  """Mean reward over ensemble members.

  Args:
      rewards: member rewards, ``[k, batch, ...]`` (e.g. ``[k, batch]``).

  Returns:
      ``[batch, ...]``.

  References:
      Coste et al., "Reward Model Ensembles Help Mitigate Overoptimization", 2023.
  """
  return jnp.mean(_members(rewards), axis=0)


def ensemble_worst_case(rewards: ArrayLike) -> jax.Array:
  """Worst-case (minimum) reward over ensemble members (WCO).

  Args:
      rewards: member rewards, ``[k, batch, ...]``.

  Returns:
      ``[batch, ...]``.

  References:
      Coste et al., "Reward Model Ensembles Help Mitigate Overoptimization", 2023.
  """
  return jnp.min(_members(rewards), axis=0)


def ensemble_uncertainty_weighted(rewards: ArrayLike, *, coef: ArrayLike) -> jax.Array:
  """Uncertainty-weighted reward ``mean - coef * variance`` over ensemble members (UWO).

  The variance is the population variance over members (``ddof=0``,
  ``mean_j (r_j - mean)^2``), so a single member has zero variance and the objective is then
  its reward.

  Args:
      rewards: member rewards, ``[k, batch, ...]``.
      coef: the uncertainty penalty ``lambda`` (>= 0).

  Returns:
      ``[batch, ...]``.

  References:
      Coste et al., "Reward Model Ensembles Help Mitigate Overoptimization", 2023;
      Wu, Tucker and Nachum, "Uncertainty weighted actor-critic for offline reinforcement
      learning", 2021.
  """
  rewards = _members(rewards)
  mean = jnp.mean(rewards, axis=0)
  var = jnp.mean(jnp.square(rewards - mean), axis=0)
  return mean - jnp.asarray(coef, rewards.dtype) * var


def ensemble_objective(
  name: str,
  *,
  normalize: str = "none",
  member_mean: ArrayLike | None = None,
  member_std: ArrayLike | None = None,
  **kwargs,
) -> Callable[[ArrayLike], jax.Array]:
  """Returns the ensemble objective ``[k, batch, ...] -> [batch, ...]`` called ``name``.

  Args:
      name: ``'mean'``, ``'worst_case'`` or ``'uncertainty_weighted'``.
      normalize: per-member normalisation before the objective (:func:`normalize_members`):
          ``'none'``, ``'batch'`` (each member's statistics over the rewards passed) or
          ``'fixed'`` (``member_mean`` and ``member_std``, ``[k]`` each).
      member_mean: fixed member means for ``normalize='fixed'``.
      member_std: fixed member standard deviations for ``normalize='fixed'``.
      **kwargs: the objective's hyperparameters: ``coef`` for ``'uncertainty_weighted'``
          (required), none for the others.

  Returns:
      A function of the member rewards ``[k, batch, ...]`` returning ``[batch, ...]``.

  Raises:
      ValueError: for an unknown name or normalisation, or missing / unexpected
          hyperparameters.

  Example:
      >>> objective = ensemble_objective("uncertainty_weighted", coef=0.5)
      >>> objective(jnp.array([[1.0, 2.0], [3.0, 2.0]]))
      Array([1.5, 2. ], dtype=float32)
  """
  if name == "mean":
    fn, required = ensemble_mean, ()
  elif name == "worst_case":
    fn, required = ensemble_worst_case, ()
  elif name == "uncertainty_weighted":
    fn, required = ensemble_uncertainty_weighted, ("coef",)
  else:
    raise ValueError(f"name must be one of {OBJECTIVES}, got {name!r}")
  unexpected = sorted(set(kwargs) - set(required))
  missing = [k for k in required if k not in kwargs]
  if unexpected or missing:
    raise ValueError(
      f"ensemble objective {name!r} takes hyperparameters {list(required)}; "
      f"missing {missing}, unexpected {unexpected}"
    )
  if normalize not in NORMALIZATIONS:
    raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
  fixed = member_mean is not None or member_std is not None
  if (normalize == "fixed") != fixed or (fixed and (member_mean is None or member_std is None)):
    raise ValueError(
      "normalize='fixed' needs both member_mean and member_std, and they are only used with it"
    )

  def objective(rewards: ArrayLike) -> jax.Array:
    if normalize != "none":
      rewards = normalize_members(rewards, mean=member_mean, std=member_std)
    return fn(rewards, **kwargs)

  return objective
