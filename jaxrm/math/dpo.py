"""Direct preference losses on sequence log-probs: DPO, conservative DPO, IPO, SimPO and KTO.

Every loss takes *sequence* log-probabilities ``[batch]`` (the sum over the response tokens
of ``log pi(y_t | x, y_<t)``, e.g. :func:`jaxrm.models.policy.sequence_logprobs` with a
response mask) of the policy and, except SimPO, of a frozen reference policy. Paired losses
(DPO, IPO, SimPO) take a chosen and a rejected response per prompt; KTO takes unpaired
responses labelled desirable or undesirable. Per-example losses are reduced by
:func:`jaxrm.math.preference.weighted_mean` (``sum(w l) / sum(w)``).

Every DPO-trained policy is also a reward model: its implicit reward
(:func:`implicit_reward`) is ``beta * (log pi(y|x) - log pi_ref(y|x))``, and DPO is the
Bradley-Terry loss on it (Rafailov et al. 2023, Eq. 7).

Conventions (TRL's ``DPOTrainer`` / ``CPOTrainer`` / ``KTOTrainer`` where they exist): with
``h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))``,

* DPO: ``-log sigmoid(beta h)``; conservative DPO (label smoothing ``eps``):
  ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)`` (TRL ``loss_type='sigmoid'``);
* IPO: ``(h - 1 / (2 beta))^2`` (``beta`` is the paper's ``tau``);
* SimPO: ``-log sigmoid(beta (log pi(y_w) / |y_w| - log pi(y_l) / |y_l|) - gamma)``
  (reference-free, length-normalised; TRL's ``gamma_beta_ratio`` is ``gamma / beta``);
* KTO: ``w_D (1 - sigmoid(beta (r - z0)))`` for desirable and ``w_U (1 - sigmoid(beta (z0 -
  r)))`` for undesirable responses, ``r = log pi(y) - log pi_ref(y)`` and ``z0`` a
  non-negative, non-differentiated estimate of ``KL(pi || pi_ref)`` (:func:`kto_reference_point`).

References:
  Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
  Reward Model".
  Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO" (conservative
  DPO).
  Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
  Preferences" (IPO).
  Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward".
  Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization".
"""

import jax
from jax import lax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxrm.math._arrays import as_float, check_in_range, check_number
from jaxrm.math.preference import bradley_terry_losses, weighted_mean


def _per_example(**arrays: ArrayLike) -> list[jax.Array]:
  """Converts to float and checks that every array has the shape [batch] of the first."""
  out = [as_float(x, name) for name, x in arrays.items()]
  names = list(arrays)
  if out[0].ndim != 1:
    raise ValueError(f"{names[0]} must have shape [batch], got {out[0].shape}")
  for name, x in zip(names[1:], out[1:]):
    if x.shape != out[0].shape:
      raise ValueError(f"{name} must have the shape of {names[0]} {out[0].shape}, got {x.shape}")
  return out


def _check_positive(name: str, value) -> None:
  check_number(value, name, gt=0)


def _check_smoothing(label_smoothing) -> None:
  check_number(label_smoothing, "label_smoothing", ge=0, le=0.5)


def implicit_reward(policy_logps: ArrayLike, ref_logps: ArrayLike, *, beta: ArrayLike) -> jax.Array:
  """DPO's implicit reward ``beta * (log pi(y|x) - log pi_ref(y|x))`` -> ``[batch]``.

  Rafailov et al. 2023, Eq. 5 (up to the prompt-only ``beta log Z(x)``, which cancels between
  responses to the same prompt).
  """
  policy_logps, ref_logps = _per_example(policy_logps=policy_logps, ref_logps=ref_logps)
  return beta * (policy_logps - ref_logps)


def dpo_losses(
  policy_chosen_logps: ArrayLike,
  policy_rejected_logps: ArrayLike,
  ref_chosen_logps: ArrayLike,
  ref_rejected_logps: ArrayLike,
  *,
  beta: float,
  label_smoothing: float = 0.0,
) -> jax.Array:
  """Per-pair DPO losses (conservative DPO with ``label_smoothing > 0``) -> ``[batch]``.

  ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)`` with ``h`` the chosen minus
  rejected policy/reference log-ratio (Rafailov et al. 2023, Eq. 7; ``eps`` is the assumed
  label-flip rate of conservative DPO, Mitchell 2023).

  Args:
    policy_chosen_logps: ``[batch]`` sequence log-probs of the chosen responses under the
      policy.
    policy_rejected_logps: ``[batch]``, rejected responses under the policy.
    ref_chosen_logps: ``[batch]``, chosen responses under the reference (constants).
    ref_rejected_logps: ``[batch]``, rejected responses under the reference (constants).
    beta: inverse temperature of the implicit reward (> 0; 0.1 is common).
    label_smoothing: ``eps`` in [0, 0.5].

  Returns:
    ``[batch]`` losses.
  """
  _check_positive("beta", beta)
  _check_smoothing(label_smoothing)
  pc, pr, rc, rr = _per_example(
    policy_chosen_logps=policy_chosen_logps,
    policy_rejected_logps=policy_rejected_logps,
    ref_chosen_logps=ref_chosen_logps,
    ref_rejected_logps=ref_rejected_logps,
  )
  # DPO is the Bradley-Terry loss on the implicit rewards (Rafailov et al. 2023, Eq. 7).
  return bradley_terry_losses(
    beta * (pc - lax.stop_gradient(rc)),
    beta * (pr - lax.stop_gradient(rr)),
    label_smoothing=label_smoothing,
  )


def dpo_loss(
  policy_chosen_logps: ArrayLike,
  policy_rejected_logps: ArrayLike,
  ref_chosen_logps: ArrayLike,
  ref_rejected_logps: ArrayLike,
  *,
  beta: float,
  label_smoothing: float = 0.0,
  weights: ArrayLike | None = None,
) -> jax.Array:
  """Mean of :func:`dpo_losses` (weighted ``sum(w l) / sum(w)`` with ``weights [batch]``)."""
  losses = dpo_losses(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    beta=beta,
    label_smoothing=label_smoothing,
  )
  return weighted_mean(losses, weights)


def ipo_losses(
  policy_chosen_logps: ArrayLike,
  policy_rejected_logps: ArrayLike,
  ref_chosen_logps: ArrayLike,
  ref_rejected_logps: ArrayLike,
  *,
  beta: float,
) -> jax.Array:
  """Per-pair IPO losses ``(h - 1 / (2 beta))^2`` -> ``[batch]`` (Azar et al. 2023, Eq. 17).

  ``h`` is the chosen minus rejected policy/reference log-ratio; ``beta`` is the paper's
  regularisation ``tau`` (> 0). Arguments as :func:`dpo_losses`. Azar et al. (and TRL) use
  log-probs averaged over the response tokens; pass those to follow them.
  """
  _check_positive("beta", beta)
  pc, pr, rc, rr = _per_example(
    policy_chosen_logps=policy_chosen_logps,
    policy_rejected_logps=policy_rejected_logps,
    ref_chosen_logps=ref_chosen_logps,
    ref_rejected_logps=ref_rejected_logps,
  )
  h = (pc - lax.stop_gradient(rc)) - (pr - lax.stop_gradient(rr))
  return jnp.square(h - 1.0 / (2.0 * beta))


def ipo_loss(
  policy_chosen_logps: ArrayLike,
  policy_rejected_logps: ArrayLike,
  ref_chosen_logps: ArrayLike,
  ref_rejected_logps: ArrayLike,
  *,
  beta: float,
  weights: ArrayLike | None = None,
) -> jax.Array:
  """Mean of :func:`ipo_losses` (weighted with ``weights [batch]``)."""
  losses = ipo_losses(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta
  )
  return weighted_mean(losses, weights)


def simpo_losses(
  policy_chosen_logps: ArrayLike,
  policy_rejected_logps: ArrayLike,
  chosen_lengths: ArrayLike,
  rejected_lengths: ArrayLike,
  *,
  beta: float,
  gamma: float,
  label_smoothing: float = 0.0,
) -> jax.Array:
  """Per-pair SimPO losses -> ``[batch]`` (Meng et al. 2024, Eq. 6; reference-free).

  ``-(1 - eps) log sigmoid(z) - eps log sigmoid(-z)`` with
  ``z = beta * (log pi(y_w) / |y_w| - log pi(y_l) / |y_l|) - gamma``.

  Args:
    policy_chosen_logps: ``[batch]`` summed log-probs of the chosen responses.
    policy_rejected_logps: ``[batch]``, rejected responses.
    chosen_lengths: ``[batch]`` number of response tokens ``|y_w|`` (>= 1).
    rejected_lengths: ``[batch]`` ``|y_l|`` (>= 1).
    beta: reward scale (> 0; the paper uses 2.0-2.5).
    gamma: target reward margin (the paper's ``gamma``, e.g. 0.5-1.5;
      TRL's ``gamma_beta_ratio = gamma / beta``).
    label_smoothing: ``eps`` in [0, 0.5].

  Returns:
    ``[batch]`` losses.
  """
  _check_positive("beta", beta)
  _check_smoothing(label_smoothing)
  pc, pr, nc, nr = _per_example(
    policy_chosen_logps=policy_chosen_logps,
    policy_rejected_logps=policy_rejected_logps,
    chosen_lengths=chosen_lengths,
    rejected_lengths=rejected_lengths,
  )
  check_in_range(nc, "chosen_lengths", low=1)
  check_in_range(nr, "rejected_lengths", low=1)
  # The Bradley-Terry loss on the length-normalised rewards with margin gamma.
  return bradley_terry_losses(
    beta * pc / jnp.maximum(nc, 1.0),
    beta * pr / jnp.maximum(nr, 1.0),
    margin=gamma,
    label_smoothing=label_smoothing,
  )


def simpo_loss(
  policy_chosen_logps: ArrayLike,
  policy_rejected_logps: ArrayLike,
  chosen_lengths: ArrayLike,
  rejected_lengths: ArrayLike,
  *,
  beta: float,
  gamma: float,
  label_smoothing: float = 0.0,
  weights: ArrayLike | None = None,
) -> jax.Array:
  """Mean of :func:`simpo_losses` (weighted with ``weights [batch]``)."""
  losses = simpo_losses(
    policy_chosen_logps,
    policy_rejected_logps,
    chosen_lengths,
    rejected_lengths,
    beta=beta,
    gamma=gamma,
    label_smoothing=label_smoothing,
  )
  return weighted_mean(losses, weights)


def kto_reference_point(
  policy_logps: ArrayLike, ref_logps: ArrayLike, *, axis_name: str | None = None
) -> jax.Array:
  """KTO's reference point ``z0 = max(0, mean(log pi(y'|x) - log pi_ref(y'|x)))``, no gradient.

  Ethayarajh et al. 2024 (Sec. 4.1) estimate ``KL(pi || pi_ref)`` from *mismatched* pairs
  ``(x_i, y'_j)`` of the batch (TRL's ``KL_completion``); pass their sequence log-probs.
  With ``axis_name``, the mean is over the global batch (``lax.pmean``), as TRL gathers it.

  Args:
    policy_logps: ``[batch]`` policy sequence log-probs of the mismatched completions.
    ref_logps: ``[batch]`` reference sequence log-probs of the same.
    axis_name: mapped axis to average over (None: this batch).

  Returns:
    A non-negative scalar (a constant for differentiation).
  """
  policy_logps, ref_logps = _per_example(policy_logps=policy_logps, ref_logps=ref_logps)
  kl = jnp.mean(policy_logps - ref_logps)
  if axis_name is not None:
    kl = lax.pmean(kl, axis_name)
  kl = jnp.where(jnp.isfinite(kl), kl, jnp.nan)  # max(-inf, 0) would hide an overflowed log-prob
  return lax.stop_gradient(jnp.maximum(kl, 0.0))


def kto_losses(
  policy_logps: ArrayLike,
  ref_logps: ArrayLike,
  desirable: ArrayLike,
  *,
  beta: float,
  reference_point: ArrayLike,
  desirable_weight: float = 1.0,
  undesirable_weight: float = 1.0,
) -> jax.Array:
  """Per-example KTO losses -> ``[batch]`` (Ethayarajh et al. 2024, Eq. 8).

  With ``r = log pi(y|x) - log pi_ref(y|x)``: ``desirable_weight * (1 - sigmoid(beta (r -
  z0)))`` for desirable responses, ``undesirable_weight * (1 - sigmoid(beta (z0 - r)))`` for
  undesirable ones (TRL's ``KTOTrainer``; the paper's ``lambda_y - v(x, y)`` up to the
  constant ``lambda_y``).

  Args:
    policy_logps: ``[batch]`` policy sequence log-probs.
    ref_logps: ``[batch]`` reference sequence log-probs (constants).
    desirable: ``[batch]`` bool, True for desirable (thumbs-up) responses.
    beta: > 0.
    reference_point: ``z0``, a scalar (:func:`kto_reference_point`; not differentiated).
    desirable_weight: ``lambda_D`` >= 0.
    undesirable_weight: ``lambda_U`` >= 0.

  Returns:
    ``[batch]`` losses; NaN where the log-ratio or ``reference_point`` is not finite (an
    overflowed log-prob), so that a training step skips the update.
  """
  _check_positive("beta", beta)
  for name, w in (
    ("desirable_weight", desirable_weight),
    ("undesirable_weight", undesirable_weight),
  ):
    check_number(w, name, ge=0)
  policy_logps, ref_logps = _per_example(policy_logps=policy_logps, ref_logps=ref_logps)
  desirable = jnp.asarray(desirable)
  if desirable.shape != policy_logps.shape:
    raise ValueError(
      f"desirable must have the shape of policy_logps {policy_logps.shape}, got {desirable.shape}"
    )
  if jnp.ndim(reference_point) != 0:
    raise ValueError(f"reference_point must be a scalar, got shape {jnp.shape(reference_point)}")
  z0 = lax.stop_gradient(as_float(reference_point))
  r = policy_logps - lax.stop_gradient(ref_logps)
  good = desirable_weight * (1.0 - jax.nn.sigmoid(beta * (r - z0)))
  bad = undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z0 - r)))
  # an infinite log-ratio saturates the sigmoid into a finite loss with no gradient: make it NaN
  # (the steps then skip the update), as the DPO-family losses do
  valid = jnp.isfinite(r) & jnp.isfinite(z0)
  return jnp.where(valid, jnp.where(desirable.astype(bool), good, bad), jnp.nan)


def kto_loss(
  policy_logps: ArrayLike,
  ref_logps: ArrayLike,
  desirable: ArrayLike,
  *,
  beta: float,
  reference_point: ArrayLike,
  desirable_weight: float = 1.0,
  undesirable_weight: float = 1.0,
  weights: ArrayLike | None = None,
) -> jax.Array:
  """Mean of :func:`kto_losses` (weighted with ``weights [batch]``)."""
  losses = kto_losses(
    policy_logps,
    ref_logps,
    desirable,
    beta=beta,
    reference_point=reference_point,
    desirable_weight=desirable_weight,
    undesirable_weight=undesirable_weight,
  )
  return weighted_mean(losses, weights)
