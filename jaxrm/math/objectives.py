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


def _members(rewards: ArrayLike) -> jax.Array:
  rewards = as_float(rewards, "rewards")
  if rewards.ndim < 2 or rewards.shape[0] < 1:
    raise ValueError(
      "rewards must have shape [k, batch, ...] (ensemble members first, k >= 1), got "
      f"{rewards.shape}; for one example's k member rewards pass rewards[:, None]"
    )
  return rewards


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


def ensemble_objective(name: str, **kwargs) -> Callable[[ArrayLike], jax.Array]:
  """Returns the ensemble objective ``[k, batch, ...] -> [batch, ...]`` called ``name``.

  Args:
      name: ``'mean'``, ``'worst_case'`` or ``'uncertainty_weighted'``.
      **kwargs: the objective's hyperparameters: ``coef`` for ``'uncertainty_weighted'``
          (required), none for the others.

  Returns:
      A function of the member rewards ``[k, batch, ...]`` returning ``[batch, ...]``.

  Raises:
      ValueError: for an unknown name, or missing / unexpected hyperparameters.

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

  def objective(rewards: ArrayLike) -> jax.Array:
    return fn(rewards, **kwargs)

  return objective
