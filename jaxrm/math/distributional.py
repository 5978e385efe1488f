"""Distributional preference learning (DPL): likelihoods, losses and readouts.

A distributional reward model predicts, for each response, a *distribution* of utilities
rather than one number: the spread stands for hidden context (e.g. annotators who disagree),
which a Bradley–Terry model silently aggregates by Borda count (Siththaranjan, Laidlaw &
Hadfield-Menell 2023). Two parameterisations, as in the paper:

* **mean-variance**: ``u(a) ~ N(mu_a, sigma_a^2)``, independent across responses, so
  ``P(a > b) = Phi((mu_a - mu_b) / sqrt(sigma_a^2 + sigma_b^2))`` (the paper's Eq. for DPL
  with a Gaussian; its released code uses the logistic stand-in ``sigmoid(sqrt(2 pi) z)``,
  here it is the exact probit, computed with a stable ``log Phi``);
* **categorical**: ``u(a)`` takes the value ``atoms[i]`` with probability ``p_a(i) =
  softmax(logits_a)_i``, so ``P(a > b) = sum_ij p_a(i) p_b(j) [1{u_i > u_j} + 1/2 1{u_i =
  u_j}]``, computed in log space (``logsumexp`` with weights), finite for any logits.

The losses follow :mod:`jaxrm.math.preference`: ``labels`` (soft ``P(chosen preferred)``,
``[batch]``) override ``label_smoothing``; ``weights`` (``[batch]``, >= 0) give the weighted
mean ``sum(w l) / sum(w)``; the per-example loss is the cross-entropy
``-p log P(c > r) - (1 - p) log P(r > c)``. Both likelihoods are symmetric
(``P(c > r) + P(r > c) = 1``), so ``log P(r > c)`` is the same function with the sides swapped.

Readouts (``[batch]`` each): the mean and standard deviation of the predicted distribution,
its lower ``alpha``-quantile (the paper's risk-averse objective: optimise a low quantile of
the utility distribution, so that a response many annotators dislike scores low even when its
mean is high; usable as a best-of-n or RL reward like the ensembles' worst case), and
:func:`explained_variance`, the paper's ``r^2 = Var[mu] / (Var[mu] + E[sigma^2])``, the share
of the predicted utility variance that the observed features explain (low ``r^2``: much hidden
context).

References:
    Siththaranjan, Laidlaw & Hadfield-Menell, "Distributional Preference Learning:
    Understanding and Accounting for Hidden Context in RLHF", ICLR 2024 (arXiv:2312.08358),
    Sec. 5 (DPL, the two parameterisations, r^2, risk-averse optimisation), and their code
    (github.com/cassidylaidlaw/hidden-context): the categorical head's entropy bonus on the
    batch-mean distribution (coefficient 0.1, 10 atoms on [0, 1]) and alpha = 0.01.
"""

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxrm.math._arrays import as_float, check_in_range, check_number, nan_where_invalid
from jaxrm.math.preference import _targets, log_ndtr, weighted_mean


# ------------------------------------------------------------------------------ checks
def _check_mean_std(mean: ArrayLike, std: ArrayLike, side: str) -> tuple[jax.Array, jax.Array]:
  m_name, s_name = (f"mean_{side}", f"std_{side}") if side else ("mean", "std")
  mean = as_float(mean, m_name)
  std = as_float(std, s_name)
  if mean.ndim != 1:
    raise ValueError(f"{m_name} must have shape [batch], got {mean.shape}")
  if std.shape != mean.shape:
    raise ValueError(f"{s_name} must have the shape of {m_name} {mean.shape}, got {std.shape}")
  check_in_range(std, s_name, low=0.0)
  return mean, nan_where_invalid(std, std >= 0.0)


def _check_atoms(atoms: ArrayLike, num: int | None = None) -> jax.Array:
  atoms = as_float(atoms, "atoms")
  if atoms.ndim != 1 or atoms.shape[0] < 2:
    raise ValueError(f"atoms must have shape [num_atoms] with num_atoms >= 2, got {atoms.shape}")
  if num is not None and atoms.shape[0] != num:
    raise ValueError(
      f"atoms must have shape [num_atoms] = ({num},) to match the logits, got {atoms.shape}"
    )
  return atoms


def _check_logits(logits: ArrayLike, name: str) -> jax.Array:
  logits = as_float(logits, name)
  if logits.ndim != 2 or logits.shape[1] < 2:
    raise ValueError(
      f"{name} must have shape [batch, num_atoms] (num_atoms >= 2), got {logits.shape}"
    )
  return logits


def _check_alpha(alpha: float) -> None:
  check_number(alpha, "alpha", gt=0, lt=1)


# ------------------------------------------------------------------------------ mean-variance
def mean_variance_log_prob(
  mean_chosen: ArrayLike,
  std_chosen: ArrayLike,
  mean_rejected: ArrayLike,
  std_rejected: ArrayLike,
) -> jax.Array:
  """``log P(chosen > rejected) = log Phi((mu_c - mu_r) / sqrt(sigma_c^2 + sigma_r^2))``.

  Args:
      mean_chosen: predicted utility means of the chosen responses, ``[batch]``.
      std_chosen: their standard deviations (>= 0), ``[batch]``.
      mean_rejected: ``[batch]``.
      std_rejected: ``[batch]``.

  Returns:
      Log-probabilities, ``[batch]``. Both standard deviations zero gives the deterministic
      limit (``log 1``, ``log 1/2`` or ``-inf``), like ``sigma -> 0``; a negative (or NaN)
      standard deviation raises when concrete and gives NaN under ``jit``.

  References:
      Siththaranjan, Laidlaw & Hadfield-Menell 2023, Sec. 5 (mean-variance DPL).
  """
  mc, sc = _check_mean_std(mean_chosen, std_chosen, "chosen")
  mr, sr = _check_mean_std(mean_rejected, std_rejected, "rejected")
  if mr.shape != mc.shape:
    raise ValueError(f"mean_rejected must have the shape of mean_chosen {mc.shape}, got {mr.shape}")
  return log_ndtr(_z(mc - mr, sc, sr))


def _z(delta: jax.Array, sc: jax.Array, sr: jax.Array) -> jax.Array:
  var = jnp.square(sc) + jnp.square(sr)
  positive = var > 0
  # var = 0: the z-score of a sure comparison, +-inf (or 0 for a tie); the gradient of the
  # unselected branch stays finite.
  sure = jnp.where(delta > 0, jnp.inf, jnp.where(delta < 0, -jnp.inf, 0.0))
  return jnp.where(positive, delta / jnp.sqrt(jnp.where(positive, var, 1.0)), sure)


def mean_variance_losses(
  mean_chosen: ArrayLike,
  std_chosen: ArrayLike,
  mean_rejected: ArrayLike,
  std_rejected: ArrayLike,
  *,
  label_smoothing: float = 0.0,
  labels: ArrayLike | None = None,
) -> jax.Array:
  """Per-example mean-variance DPL negative log-likelihood, ``[batch]``.

  ``l = -p log Phi(z) - (1 - p) log Phi(-z)``, ``z = (mu_c - mu_r) / sqrt(sigma_c^2 +
  sigma_r^2)``, with the target ``p`` of :mod:`jaxrm.math.preference`.
  """
  lp = mean_variance_log_prob(mean_chosen, std_chosen, mean_rejected, std_rejected)
  z = _z(
    as_float(mean_chosen) - as_float(mean_rejected), as_float(std_chosen), as_float(std_rejected)
  )
  p = _targets(lp, label_smoothing, labels)
  return -(_xlogy(p, lp) + _xlogy(1.0 - p, log_ndtr(-z)))


def _xlogy(p: jax.Array, log_q: jax.Array) -> jax.Array:
  """``p * log_q`` with ``0 * -inf = 0`` (a sure, correct prediction costs nothing)."""
  return jnp.where(p == 0, 0.0, p * log_q)


def mean_variance_loss(
  mean_chosen: ArrayLike,
  std_chosen: ArrayLike,
  mean_rejected: ArrayLike,
  std_rejected: ArrayLike,
  *,
  label_smoothing: float = 0.0,
  labels: ArrayLike | None = None,
  weights: ArrayLike | None = None,
  variance_penalty: float = 0.0,
) -> jax.Array:
  """Mean-variance DPL loss: weighted mean of `mean_variance_losses` plus an optional penalty.

  Args:
      mean_chosen, std_chosen, mean_rejected, std_rejected: ``[batch]`` each.
      label_smoothing: as in :func:`jaxrm.math.preference.bradley_terry_losses`.
      labels: soft labels ``[batch]``.
      weights: per-example weights ``[batch]``.
      variance_penalty: adds ``variance_penalty * weighted_mean(sigma_c^2 + sigma_r^2)``
          (the released code's ``variance_penalty``, default 0 there too).

  Returns:
      A scalar.
  """
  losses = mean_variance_losses(
    mean_chosen,
    std_chosen,
    mean_rejected,
    std_rejected,
    label_smoothing=label_smoothing,
    labels=labels,
  )
  loss = weighted_mean(losses, weights)
  if variance_penalty:
    var = jnp.square(as_float(std_chosen)) + jnp.square(as_float(std_rejected))
    loss = loss + variance_penalty * weighted_mean(var, weights)
  return loss


def mean_variance_quantile(mean: ArrayLike, std: ArrayLike, *, alpha: float) -> jax.Array:
  """Lower ``alpha``-quantile ``mu + Phi^{-1}(alpha) sigma`` of ``N(mu, sigma^2)``, ``[batch]``.

  Args:
      mean: ``[batch]``.
      std: ``[batch]``, >= 0.
      alpha: in ``(0, 1)``; the paper's risk-averse objective uses 0.01.
  """
  mean, std = _check_mean_std(mean, std, "")
  _check_alpha(alpha)
  return mean + jax.scipy.special.ndtri(jnp.asarray(alpha, mean.dtype)) * std


# ------------------------------------------------------------------------------ categorical
def _comparison_weights(atoms: jax.Array) -> jax.Array:
  """``C[i, j] = 1{u_i > u_j} + 1/2 1{u_i = u_j}``, ``[K, K]``."""
  return (atoms[:, None] > atoms[None, :]) + 0.5 * (atoms[:, None] == atoms[None, :])


def categorical_log_prob(
  logits_chosen: ArrayLike, logits_rejected: ArrayLike, *, atoms: ArrayLike
) -> jax.Array:
  """``log P(chosen > rejected)`` of the categorical DPL model, ``[batch]``.

  ``P = sum_ij p_c(i) p_r(j) [1{u_i > u_j} + 1/2 1{u_i = u_j}]`` with ``p = softmax(logits)``
  and ``u = atoms``; computed as one ``logsumexp`` over ``(i, j)`` with weights, so it is
  finite (and so is its gradient) however peaked the distributions are, unless the two are
  certain of opposite orders.

  Args:
      logits_chosen: ``[batch, K]`` unnormalised log-probabilities over the atoms.
      logits_rejected: ``[batch, K]``.
      atoms: the utility values ``[K]`` (any order; equal atoms count as ties).

  References:
      Siththaranjan, Laidlaw & Hadfield-Menell 2023, Sec. 5 (categorical DPL).
  """
  lc = _check_logits(logits_chosen, "logits_chosen")
  lr = _check_logits(logits_rejected, "logits_rejected")
  if lr.shape != lc.shape:
    raise ValueError(
      f"logits_rejected must have the shape of logits_chosen {lc.shape}, got {lr.shape}"
    )
  atoms = _check_atoms(atoms, lc.shape[1]).astype(lc.dtype)
  lpc, lpr = jax.nn.log_softmax(lc, axis=-1), jax.nn.log_softmax(lr, axis=-1)
  terms = lpc[:, :, None] + lpr[:, None, :]  # [b, K, K]
  c = jnp.broadcast_to(_comparison_weights(atoms).astype(lc.dtype), terms.shape)
  return jax.nn.logsumexp(terms.reshape(terms.shape[0], -1), axis=-1, b=c.reshape(c.shape[0], -1))


def categorical_losses(
  logits_chosen: ArrayLike,
  logits_rejected: ArrayLike,
  *,
  atoms: ArrayLike,
  label_smoothing: float = 0.0,
  labels: ArrayLike | None = None,
) -> jax.Array:
  """Per-example categorical DPL negative log-likelihood, ``[batch]``.

  ``l = -p log P(c > r) - (1 - p) log P(r > c)`` with the target ``p`` of
  :mod:`jaxrm.math.preference`.
  """
  lp = categorical_log_prob(logits_chosen, logits_rejected, atoms=atoms)
  lq = categorical_log_prob(logits_rejected, logits_chosen, atoms=atoms)
  p = _targets(lp, label_smoothing, labels)
  return -(_xlogy(p, lp) + _xlogy(1.0 - p, lq))


def categorical_loss(
  logits_chosen: ArrayLike,
  logits_rejected: ArrayLike,
  *,
  atoms: ArrayLike,
  label_smoothing: float = 0.0,
  labels: ArrayLike | None = None,
  weights: ArrayLike | None = None,
  entropy_coef: float = 0.0,
) -> jax.Array:
  """Categorical DPL loss: weighted mean of `categorical_losses` minus an entropy bonus.

  The bonus is ``entropy_coef * H(pbar)``, the entropy of the (weighted) mean distribution
  over the chosen and rejected responses of the batch, as in the paper's code (coefficient
  0.1): it spreads the batch over the atoms without asking any one response to be uncertain.

  Returns:
      A scalar.
  """
  losses = categorical_losses(
    logits_chosen, logits_rejected, atoms=atoms, label_smoothing=label_smoothing, labels=labels
  )
  loss = weighted_mean(losses, weights)
  if entropy_coef:
    probs = jax.nn.softmax(
      jnp.concatenate([as_float(logits_chosen), as_float(logits_rejected)]), axis=-1
    )
    w = None if weights is None else jnp.concatenate([as_float(weights)] * 2)
    pbar = jnp.stack([weighted_mean(probs[:, k], w) for k in range(probs.shape[1])])
    entropy = -jnp.sum(jnp.where(pbar > 0, pbar * jnp.log(jnp.where(pbar > 0, pbar, 1.0)), 0.0))
    loss = loss - entropy_coef * entropy
  return loss


def categorical_mean(logits: ArrayLike, *, atoms: ArrayLike) -> jax.Array:
  """Mean utility ``sum_i p(i) u_i``, ``[batch]``, of logits ``[batch, K]``."""
  logits = _check_logits(logits, "logits")
  atoms = _check_atoms(atoms, logits.shape[1]).astype(logits.dtype)
  return jax.nn.softmax(logits, axis=-1) @ atoms


def categorical_std(logits: ArrayLike, *, atoms: ArrayLike) -> jax.Array:
  """Standard deviation of the utility, ``[batch]``, of logits ``[batch, K]``."""
  logits = _check_logits(logits, "logits")
  atoms = _check_atoms(atoms, logits.shape[1]).astype(logits.dtype)
  p = jax.nn.softmax(logits, axis=-1)
  mean = p @ atoms
  var = jnp.sum(p * jnp.square(atoms[None, :] - mean[:, None]), axis=-1)
  return jnp.sqrt(jnp.maximum(var, 0.0))


def categorical_quantile(logits: ArrayLike, *, atoms: ArrayLike, alpha: float) -> jax.Array:
  """Lower ``alpha``-quantile of the categorical utility, interpolated within bins, ``[batch]``.

  A point mass has a step CDF, whose quantile ties most responses; like the paper's code, the
  mass of each atom is spread uniformly over its bin, making the quantile continuous in the
  probabilities. Atom ``u_i`` (atoms sorted ascending) owns ``[e_i, e_{i+1}]`` with inner
  edges at midpoints and outer edges half a spacing beyond the end atoms (for evenly spaced
  atoms: bins of width ``h`` centred on the atoms). The quantile is ``e_i + (alpha - F_i) /
  p_i * (e_{i+1} - e_i)`` in the bin where the CDF ``F`` crosses ``alpha``.

  Args:
      logits: ``[batch, K]``.
      atoms: ``[K]``, strictly increasing.
      alpha: in ``(0, 1)``.
  """
  logits = _check_logits(logits, "logits")
  atoms = _check_atoms(atoms, logits.shape[1]).astype(logits.dtype)
  check_in_range(jnp.diff(atoms), "atoms (differences: must increase strictly)", low=1e-30)
  _check_alpha(alpha)
  mid = 0.5 * (atoms[1:] + atoms[:-1])
  edges = jnp.concatenate(
    [atoms[:1] - (mid[:1] - atoms[:1]), mid, atoms[-1:] + (atoms[-1:] - mid[-1:])]
  )  # [K + 1]
  p = jax.nn.softmax(logits, axis=-1)
  cdf_hi = jnp.cumsum(p, axis=-1)  # F after bin i
  cdf_lo = cdf_hi - p  # F before bin i
  alpha = jnp.asarray(alpha, logits.dtype)
  # The bin where F crosses alpha: the first with cdf_hi >= alpha (the last if rounding
  # leaves cdf_hi[-1] a hair below alpha).
  k = jnp.minimum(jnp.sum(cdf_hi < alpha, axis=-1), p.shape[1] - 1)
  take = lambda x: jnp.take_along_axis(x, k[:, None], axis=-1)[:, 0]
  pk, lo = take(p), take(cdf_lo)
  frac = jnp.clip((alpha - lo) / jnp.where(pk > 0, pk, 1.0), 0.0, 1.0)
  return edges[k] + frac * (edges[k + 1] - edges[k])


# ------------------------------------------------------------------------------ diagnostics
def explained_variance(mean: ArrayLike, std: ArrayLike) -> jax.Array:
  """The paper's ``r^2 = Var[mu] / (Var[mu] + E[sigma^2])`` over a set of responses (scalar).

  The share of the predicted utility variance explained by the responses themselves; the
  rest, ``E[sigma^2]``, is attributed to hidden context. A model trained on data with hidden
  context should give a lower ``r^2`` than one trained on data without.

  Args:
      mean: predicted means ``[n]`` (the paper pools chosen and rejected responses).
      std: predicted standard deviations ``[n]``, >= 0.

  Returns:
      A scalar in ``[0, 1]`` (NaN when both variances are zero).

  References:
      Siththaranjan, Laidlaw & Hadfield-Menell 2023, Sec. 5 ("r^2"); their
      ``summarize_results.py`` (population variances, ``ddof=0``).
  """
  mean, std = _check_mean_std(mean, std, "")
  if mean.shape[0] < 1:
    raise ValueError(f"mean must hold at least one response, got shape {mean.shape}")
  var_mean = jnp.var(mean)
  return var_mean / (var_mean + jnp.mean(jnp.square(std)))
