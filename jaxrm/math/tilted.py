"""The KL-regularised optimum ``pi_beta ∝ pi_init * exp(r / beta)`` estimated from samples.

``pi_beta`` maximises ``E_pi[r] - beta * KL(pi || pi_init)``: for each ``beta`` it is the most
reward ``r`` any policy can get at its KL from ``pi_init``. From ``N`` samples of ``pi_init``
(per prompt), self-normalised importance sampling (SNIS) gives, with
``w_i = exp(r_i / beta) / sum_j exp(r_j / beta)``:

* ``E_{pi_beta}[v] ≈ sum_i w_i v_i`` for any score ``v`` (e.g. gold, when ``r`` is a proxy);
* ``KL(pi_beta || pi_init) = E_{pi_beta}[r] / beta - log E_{pi_init}[exp(r / beta)]
  ≈ sum_i w_i r_i / beta - log mean_i exp(r_i / beta)``;
* the effective sample size ``ESS = 1 / sum_i w_i^2`` (``N`` for uniform weights, 1 when one
  sample carries all the weight). The estimates are only trustworthy while the ESS is large:
  at large KL the weights degenerate onto the top sample.

Everything is computed in the dtype of the inputs (pass float64 NumPy arrays with
``jax_enable_x64`` for a float64 result); log-sum-exp keeps ``exp(r / beta)`` from overflowing.

References:
    Korbak, Perez & Buckley, "RL with KL penalties is better viewed as Bayesian inference", 2022.
    Gao, Schulman & Hilton, "Scaling Laws for Reward Model Overoptimization", 2022.
"""

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxrm.math._arrays import as_float, check_finite, check_in_range


def _check(reward: jax.Array, betas: jax.Array) -> None:
  if reward.ndim < 1 or reward.shape[-1] < 1:
    raise ValueError(f"reward must have shape [..., N] with N >= 1, got {reward.shape}")
  if betas.ndim != 1:
    raise ValueError(f"betas must have shape [num_betas], got {betas.shape}")
  check_finite(reward, "reward")
  check_finite(betas, "betas")
  try:
    bad = bool(jnp.any(betas <= 0))
  except jax.errors.ConcretizationTypeError:
    return
  if bad:
    raise ValueError(f"betas must all be > 0, got {betas}")


def tilted_weights(reward: ArrayLike, betas: ArrayLike) -> jax.Array:
  """Self-normalised weights of ``pi_beta`` on ``pi_init`` samples, for each ``beta``.

  Args:
    reward: ``r`` of ``N`` samples of ``pi_init``, ``[..., N]``; finite.
    betas: temperatures ``[num_betas]``, all ``> 0``.

  Returns:
    ``[num_betas, ..., N]``: ``softmax(r / beta)`` over the last axis.

  Raises:
    ValueError: a wrong shape, a non-finite reward or a ``beta <= 0`` (named).
  """
  reward, betas = as_float(reward, "reward"), as_float(betas, "betas")
  _check(reward, betas)
  scaled = reward[None] / betas.reshape((-1,) + (1,) * reward.ndim)
  return jax.nn.softmax(scaled, axis=-1)


def tilted_optimum(
  reward: ArrayLike, values: ArrayLike, betas: ArrayLike, *, counts: ArrayLike | None = None
) -> dict[str, jax.Array]:
  """``E[values]``, ``KL`` and ESS of ``pi_beta ∝ pi_init exp(reward / beta)``, per prompt.

  Args:
    reward: ``r`` of ``N`` samples of ``pi_init`` for each prompt, ``[..., N]``; finite.
    values: scores to average under ``pi_beta``, ``[..., N]`` or ``[V, ..., N]`` (several
      scores of the same samples at once, e.g. gold and its parts).
    betas: temperatures ``[num_betas]``, all ``> 0``.
    counts: optional multiplicities ``[..., N]`` (>= 0) of the samples, e.g. a bootstrap
      resample: the estimates are those of the sample list with sample ``i`` repeated
      ``counts[i]`` times.

  Returns:
    ``{'value': [num_betas, (V,) ...], 'kl': [num_betas, ...], 'ess': [num_betas, ...]}``
    per prompt (the leading ``...`` of ``reward``): the SNIS estimates of
    ``E_{pi_beta}[values]`` and ``KL(pi_beta || pi_init)`` (nats) and the ESS
    ``(sum c w)^2 / sum c w^2`` of the weights.

  Raises:
    ValueError: shapes that do not match, a non-finite reward or a ``beta <= 0`` (named).
  """
  reward, betas = as_float(reward, "reward"), as_float(betas, "betas")
  values = as_float(values, "values")
  _check(reward, betas)
  if values.shape != reward.shape and values.shape[1:] != reward.shape:
    raise ValueError(
      f"values must have the shape of reward {reward.shape} or [V, *{reward.shape}], "
      f"got {values.shape}"
    )
  c = jnp.ones_like(reward) if counts is None else as_float(counts, "counts")
  if c.shape != reward.shape:
    raise ValueError(f"counts must have the shape of reward {reward.shape}, got {c.shape}")
  check_in_range(c, "counts", low=0)
  log_c = jnp.where(c > 0, jnp.log(jnp.where(c > 0, c, 1.0)), -jnp.inf)
  b = betas.reshape((-1,) + (1,) * reward.ndim)
  s = reward[None] / b  # [B, ..., N]
  m = jnp.max(jnp.where(c > 0, s, -jnp.inf), axis=-1, keepdims=True)
  log_unnorm = s - m + log_c  # log(c_i exp(s_i - m))
  log_z = jax.scipy.special.logsumexp(log_unnorm, axis=-1)  # [B, ...]
  w = jnp.exp(log_unnorm - log_z[..., None])  # normalised, includes the counts
  log_mean = log_z - jnp.log(jnp.sum(c, axis=-1))[None]  # log mean exp(s - m)
  # KL = E_w[s] - log mean exp(s) = E_w[s - m] - log mean exp(s - m): no cancellation in m.
  kl = jnp.sum(w * jnp.where(c > 0, s - m, 0.0), axis=-1) - log_mean
  kl = jnp.maximum(kl, 0.0)  # >= 0 exactly; rounding can give -1e-7
  ess = 1.0 / jnp.sum(jnp.where(c > 0, w * w / jnp.where(c > 0, c, 1.0), 0.0), axis=-1)
  if values.shape == reward.shape:
    value = jnp.sum(w * values[None], axis=-1)
  else:
    value = jnp.sum(w[:, None] * values[None], axis=-1)
  return {"value": value, "kl": kl, "ess": ess}
