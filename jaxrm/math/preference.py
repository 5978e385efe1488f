"""Preference likelihoods and losses for training reward models from comparisons.

Every function here is a pure function of reward arrays; none knows about models. The pairwise
losses (Bradley–Terry, Thurstone, hinge) take ``rewards_chosen`` and ``rewards_rejected`` of
shape ``[batch]`` and share one interface:

* ``margin`` (scalar or ``[batch]``): the chosen response must win by this much;
  ``delta = r_chosen - r_rejected - margin`` (Touvron et al., 2023).
* ``label_smoothing`` ``eps`` in ``[0, 1]``: the target probability that "chosen" is preferred
  is ``1 - eps`` instead of 1, i.e. the loss is the cross-entropy
  ``-(1 - eps) log P(delta) - eps log P(-delta)`` (as in conservative DPO, Mitchell 2023).
  ``eps = 0.5`` makes the labels uninformative: the loss is symmetric in the two responses and
  minimised at ``delta = 0``, where the probabilistic losses equal ``log 2``. (It is not
  constant: for Bradley–Terry it is ``log 2 + log cosh(delta / 2)``.)
* ``labels`` (``[batch]`` in ``[0, 1]``): soft labels ``P(chosen preferred)``, e.g. the fraction
  of annotators who preferred "chosen". Label smoothing *is* the constant soft label
  ``1 - eps``, so ``labels`` overrides ``label_smoothing`` when both are given.
* ``weights`` (``[batch]``, non-negative): per-example weights. The batch loss is the weighted
  mean ``sum(w * l) / sum(w)``, so its scale depends neither on the batch size nor on the scale
  of the weights; a zero weight removes an example exactly (value and gradient), and a batch
  whose weights are all zero has loss 0.

The ``*_log_prob`` functions give per-example log-likelihoods ``[batch]``, the ``*_losses``
functions per-example losses ``[batch]``, the ``*_loss`` functions the weighted-mean scalar.
`get_loss` maps the names accepted by the training script's ``--loss`` flag to a loss.
"""

from collections.abc import Callable
import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxrm.math._arrays import as_float, check_in_range, check_number, nan_where_invalid

_SQRT2 = 1.4142135623730951
_LOG_SQRT_2PI = 0.9189385332046727
# (-1)^n (2n - 1)!!, n = 0..10: coefficients of the asymptotic series of x Phi(x) / phi(x).
_MILLS_SERIES = (
  1.0,
  -1.0,
  3.0,
  -15.0,
  105.0,
  -945.0,
  10395.0,
  -135135.0,
  2027025.0,
  -34459425.0,
  654729075.0,
)


# ------------------------------------------------------------------------------ helpers


def _check_per_example(name: str, x: jax.Array, batch: int, allow_scalar: bool) -> None:
  if allow_scalar and x.ndim == 0:
    return
  if x.shape != (batch,):
    expected = f"() or ({batch},)" if allow_scalar else f"({batch},)"
    raise ValueError(f"{name} must have shape {expected}, got {x.shape}")


def _delta(rewards_chosen: ArrayLike, rewards_rejected: ArrayLike, margin: ArrayLike) -> jax.Array:
  """Checks shapes and returns ``r_chosen - r_rejected - margin``, ``[batch]``."""
  rewards_chosen = as_float(rewards_chosen, "rewards_chosen")
  rewards_rejected = as_float(rewards_rejected, "rewards_rejected")
  if rewards_chosen.ndim != 1:
    raise ValueError(f"rewards_chosen must have shape [batch], got {rewards_chosen.shape}")
  if rewards_rejected.shape != rewards_chosen.shape:
    raise ValueError(
      f"rewards_rejected must have the shape of rewards_chosen {rewards_chosen.shape}, "
      f"got {rewards_rejected.shape}"
    )
  margin = as_float(margin, "margin").astype(rewards_chosen.dtype)
  _check_per_example("margin", margin, rewards_chosen.shape[0], allow_scalar=True)
  return rewards_chosen - rewards_rejected - margin


def _targets(delta: jax.Array, label_smoothing: float, labels: ArrayLike | None) -> jax.Array:
  """Target probability that the chosen response is preferred, ``[batch]``.

  Labels outside ``[0, 1]`` raise when concrete; under ``jit`` they become NaN targets, so
  the example's loss is NaN rather than a silently wrong number.
  """
  if labels is None:
    if not 0.0 <= label_smoothing <= 1.0:
      raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    return jnp.full(delta.shape, 1.0 - label_smoothing, delta.dtype)
  labels = as_float(labels, "labels").astype(delta.dtype)
  _check_per_example("labels", labels, delta.shape[0], allow_scalar=False)
  check_in_range(labels, "labels", low=0.0, high=1.0)
  return nan_where_invalid(labels, (labels >= 0.0) & (labels <= 1.0))


def weighted_mean(losses: ArrayLike, weights: ArrayLike | None = None) -> jax.Array:
  """Weighted mean ``sum(w * l) / sum(w)`` of per-example losses.

  Args:
      losses: per-example losses, ``[batch]``.
      weights: non-negative weights, ``[batch]``; ``None`` means all ones.

  Returns:
      A scalar; 0 when every weight is zero. A zero-weight example contributes nothing to the
      value, even if its loss is not finite, and the gradient with respect to its loss is
      exactly zero.

  Raises:
      ValueError: a concrete weight is negative or NaN. Under ``jit`` such a weight makes the
      result NaN instead (never a silently wrong finite number).
  """
  losses = as_float(losses, "losses")
  if losses.ndim != 1:
    raise ValueError(f"losses must have shape [batch], got {losses.shape}")
  if weights is None:
    return jnp.mean(losses)
  weights = as_float(weights, "weights").astype(losses.dtype)
  _check_per_example("weights", weights, losses.shape[0], allow_scalar=False)
  check_in_range(weights, "weights", low=0.0)
  weights = nan_where_invalid(weights, weights >= 0.0)
  total = jnp.sum(weights)
  weighted = jnp.where(weights != 0, weights * losses, 0.0)
  # total is > 0, 0 (every weight zero) or NaN (an invalid weight, which must show).
  return jnp.where(total == 0, 0.0, jnp.sum(weighted) / jnp.where(total == 0, 1.0, total))


# ------------------------------------------------------------------------------ Bradley–Terry
def bradley_terry_log_prob(
  rewards_chosen: ArrayLike, rewards_rejected: ArrayLike, *, margin: ArrayLike = 0.0
) -> jax.Array:
  """Bradley–Terry log-likelihood that the chosen response is preferred.

  ``log P(chosen > rejected) = log sigmoid(r_chosen - r_rejected - margin)``, computed
  stably: finite values and gradients for any reward gap.

  Args:
      rewards_chosen: rewards of the preferred responses, ``[batch]``.
      rewards_rejected: rewards of the dispreferred responses, ``[batch]``.
      margin: required reward margin, scalar or ``[batch]``.

  Returns:
      Log-probabilities, ``[batch]``.

  References:
      Bradley & Terry, "Rank analysis of incomplete block designs", Biometrika 1952.
      Ouyang et al., "Training language models to follow instructions with human feedback",
      2022.
  """
  return jax.nn.log_sigmoid(_delta(rewards_chosen, rewards_rejected, margin))


def bradley_terry_losses(
  rewards_chosen: ArrayLike,
  rewards_rejected: ArrayLike,
  *,
  margin: ArrayLike = 0.0,
  label_smoothing: float = 0.0,
  labels: ArrayLike | None = None,
) -> jax.Array:
  """Per-example Bradley–Terry negative log-likelihood.

  ``l = -p log sigmoid(delta) - (1 - p) log sigmoid(-delta)`` with
  ``delta = r_chosen - r_rejected - margin`` and target ``p = labels`` if given, else
  ``1 - label_smoothing`` (see the module docstring).

  Args:
      rewards_chosen: ``[batch]``.
      rewards_rejected: ``[batch]``.
      margin: scalar or ``[batch]``.
      label_smoothing: ``eps`` in ``[0, 1]``; ignored when ``labels`` is given.
      labels: soft labels ``P(chosen preferred)``, ``[batch]``.

  Returns:
      Losses, ``[batch]``.

  References:
      Bradley & Terry 1952; Stiennon et al., "Learning to summarize from human feedback",
      2020; Touvron et al., "Llama 2" (margin), 2023.
  """
  delta = _delta(rewards_chosen, rewards_rejected, margin)
  p = _targets(delta, label_smoothing, labels)
  return -(p * jax.nn.log_sigmoid(delta) + (1.0 - p) * jax.nn.log_sigmoid(-delta))


def bradley_terry_loss(
  rewards_chosen: ArrayLike,
  rewards_rejected: ArrayLike,
  *,
  margin: ArrayLike = 0.0,
  label_smoothing: float = 0.0,
  labels: ArrayLike | None = None,
  weights: ArrayLike | None = None,
) -> jax.Array:
  """Bradley–Terry loss: the weighted mean ``sum(w l) / sum(w)`` of `bradley_terry_losses`.

  Example:
      >>> loss = bradley_terry_loss(jnp.array([1.0, 2.0]), jnp.array([0.0, 2.0]))
      >>> # (softplus(-1) + log 2) / 2 = 0.5032...

  Returns:
      A scalar.
  """
  losses = bradley_terry_losses(
    rewards_chosen, rewards_rejected, margin=margin, label_smoothing=label_smoothing, labels=labels
  )
  return weighted_mean(losses, weights)


# ------------------------------------------------------------------------------ Thurstone
@jax.custom_jvp
def log_ndtr(x: ArrayLike) -> jax.Array:
  """``log Phi(x)``, the log standard-normal CDF, with a gradient accurate for any ``x``.

  The value is `jax.scipy.special.log_ndtr`. Its autodiff gradient loses accuracy in float32
  below ``x ~ -3000`` (it gives 2981 at ``x = -1e4`` instead of about 1e4), so the derivative
  ``phi(x) / Phi(x)`` (the inverse Mills ratio) is supplied explicitly: from the log-density
  difference for ``x >= -10`` and below from the asymptotic series
  ``-x / sum_{n=0}^{10} (-1)^n (2n - 1)!! x^(-2n)`` (relative error < 2e-12).
  """
  return jax.scipy.special.log_ndtr(x)


@log_ndtr.defjvp
def _log_ndtr_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  y = log_ndtr(x)
  direct = jnp.exp(-0.5 * jnp.square(x) - _LOG_SQRT_2PI - y)
  xs = jnp.minimum(x, -10.0)  # keeps the unselected branch finite
  z = 1.0 / jnp.square(xs)
  series = jnp.zeros_like(z)
  for c in _MILLS_SERIES[::-1]:  # Horner
    series = c + z * series
  return y, jnp.where(x < -10.0, -xs / series, direct) * t


def thurstone_log_prob(
  rewards_chosen: ArrayLike, rewards_rejected: ArrayLike, *, margin: ArrayLike = 0.0
) -> jax.Array:
  """Thurstone (Case V, probit) log-likelihood that the chosen response is preferred.

  Each response's utility is its reward plus independent unit-variance Gaussian noise, so
  ``P(chosen > rejected) = Phi((r_chosen - r_rejected - margin) / sqrt(2))``. Computed with a
  stable ``log Phi`` (`log_ndtr`): finite values and gradients for any reward gap.

  Args:
      rewards_chosen: ``[batch]``.
      rewards_rejected: ``[batch]``.
      margin: scalar or ``[batch]``.

  Returns:
      Log-probabilities, ``[batch]``.

  References:
      Thurstone, "A law of comparative judgment", Psychological Review 1927 (Case V).
  """
  return log_ndtr(_delta(rewards_chosen, rewards_rejected, margin) / _SQRT2)


def thurstone_losses(
  rewards_chosen: ArrayLike,
  rewards_rejected: ArrayLike,
  *,
  margin: ArrayLike = 0.0,
  label_smoothing: float = 0.0,
  labels: ArrayLike | None = None,
) -> jax.Array:
  """Per-example Thurstone negative log-likelihood, ``[batch]``.

  ``l = -p log Phi(delta / sqrt 2) - (1 - p) log Phi(-delta / sqrt 2)``, with ``delta`` and
  ``p`` as in `bradley_terry_losses`.
  """
  delta = _delta(rewards_chosen, rewards_rejected, margin)
  p = _targets(delta, label_smoothing, labels)
  return -(p * log_ndtr(delta / _SQRT2) + (1.0 - p) * log_ndtr(-delta / _SQRT2))


def thurstone_loss(
  rewards_chosen: ArrayLike,
  rewards_rejected: ArrayLike,
  *,
  margin: ArrayLike = 0.0,
  label_smoothing: float = 0.0,
  labels: ArrayLike | None = None,
  weights: ArrayLike | None = None,
) -> jax.Array:
  """Thurstone loss: the weighted mean of `thurstone_losses`. Returns a scalar."""
  losses = thurstone_losses(
    rewards_chosen, rewards_rejected, margin=margin, label_smoothing=label_smoothing, labels=labels
  )
  return weighted_mean(losses, weights)


# ------------------------------------------------------------------------------ hinge
def hinge_losses(
  rewards_chosen: ArrayLike,
  rewards_rejected: ArrayLike,
  *,
  margin: ArrayLike = 1.0,
  label_smoothing: float = 0.0,
  labels: ArrayLike | None = None,
) -> jax.Array:
  """Per-example pairwise hinge loss.

  ``l = p max(0, margin - gap) + (1 - p) max(0, margin + gap)`` with
  ``gap = r_chosen - r_rejected``: the expected hinge loss under the target ``p`` (``p = 1``
  gives the usual ``max(0, margin - gap)``).

  Args:
      rewards_chosen: ``[batch]``.
      rewards_rejected: ``[batch]``.
      margin: scalar or ``[batch]``; default 1.
      label_smoothing: as in `bradley_terry_losses`.
      labels: soft labels ``P(chosen preferred)``, ``[batch]``.

  Returns:
      Losses, ``[batch]``.

  References:
      Herbrich, Graepel & Obermayer, "Large margin rank boundaries for ordinal regression",
      2000.
  """
  gap = _delta(rewards_chosen, rewards_rejected, 0.0)
  margin = jnp.asarray(margin, gap.dtype)
  _check_per_example("margin", margin, gap.shape[0], allow_scalar=True)
  p = _targets(gap, label_smoothing, labels)
  return p * jax.nn.relu(margin - gap) + (1.0 - p) * jax.nn.relu(margin + gap)


def hinge_loss(
  rewards_chosen: ArrayLike,
  rewards_rejected: ArrayLike,
  *,
  margin: ArrayLike = 1.0,
  label_smoothing: float = 0.0,
  labels: ArrayLike | None = None,
  weights: ArrayLike | None = None,
) -> jax.Array:
  """Pairwise hinge loss: the weighted mean of `hinge_losses`. Returns a scalar."""
  losses = hinge_losses(
    rewards_chosen, rewards_rejected, margin=margin, label_smoothing=label_smoothing, labels=labels
  )
  return weighted_mean(losses, weights)


# ------------------------------------------------------------------------------ Plackett–Luce
def plackett_luce_log_prob(rewards: ArrayLike, *, mask: ArrayLike | None = None) -> jax.Array:
  """Plackett–Luce log-likelihood of a ranking of K responses.

  ``log P = sum_k [r_k - logsumexp_{j >= k} r_j]`` over the valid responses, which are given
  in ranked order, best first. With ``mask``, invalid entries are ignored wherever they sit:
  the ranking is the order of the valid entries, so a ragged batch may be padded anywhere and
  the result does not depend on the padding. For K = 2 this is `bradley_terry_log_prob`.

  Args:
      rewards: ``[batch, K]``, each row in ranked order, best first.
      mask: bool ``[batch, K]``, True on real responses; ``None`` means all valid.

  Returns:
      Log-probabilities, ``[batch]`` (0 for a row with fewer than two valid responses).

  References:
      Plackett, "The analysis of permutations", 1975; Luce, "Individual choice behavior",
      1959; Zhu, Jordan & Jiao, "Principled RLHF from pairwise or K-wise comparisons", 2023.
  """
  rewards = as_float(rewards, "rewards")
  if rewards.ndim != 2:
    raise ValueError(f"rewards must have shape [batch, K], got {rewards.shape}")
  mask = jnp.ones(rewards.shape, bool) if mask is None else jnp.asarray(mask, bool)
  if mask.shape != rewards.shape:
    raise ValueError(f"mask must have the shape of rewards {rewards.shape}, got {mask.shape}")
  k = rewards.shape[1]
  not_before = jnp.arange(k)[None, :] >= jnp.arange(k)[:, None]  # [k, j]: j >= k
  # Row k of the [batch, K, K] logits holds the valid j >= k. It always includes j = k (rows
  # of invalid k are dropped below), so every logsumexp is finite and so is its gradient.
  include = (not_before[None] & mask[:, None, :]) | jnp.eye(k, dtype=bool)[None]
  safe = jnp.where(mask, rewards, 0.0)
  normaliser = jax.nn.logsumexp(
    jnp.broadcast_to(safe[:, None, :], include.shape), axis=-1, where=include
  )
  return jnp.sum(jnp.where(mask, safe - normaliser, 0.0), axis=-1)


def plackett_luce_loss(
  rewards: ArrayLike, *, mask: ArrayLike | None = None, weights: ArrayLike | None = None
) -> jax.Array:
  """Plackett–Luce loss: the weighted mean of ``-plackett_luce_log_prob``.

  The per-example loss is the negative log-likelihood of the whole ranking (a sum of K - 1
  choice terms, not divided by K).

  Args:
      rewards: ``[batch, K]`` in ranked order, best first.
      mask: bool ``[batch, K]`` for ragged K.
      weights: ``[batch]``.

  Returns:
      A scalar.
  """
  return weighted_mean(-plackett_luce_log_prob(rewards, mask=mask), weights)


# ------------------------------------------------------------------------------ regulariser
CENTERING_FORMS = ("pair", "batch")


def reward_centering_penalty(
  rewards_chosen: ArrayLike, rewards_rejected: ArrayLike, *, coef: float, form: str = "pair"
) -> jax.Array:
  """Reward-centring penalty of Eisenstein et al. (2023, Eq. 2): ``coef * mean_i (r_c + r_r)^2``.

  Preference likelihoods only see reward differences, so a reward model's offset is free and
  drifts; this auxiliary loss pins the rewards of each pair to sum to zero, making rewards
  comparable across models and runs (e.g. across ensemble members). It is TRL's
  ``center_rewards_coefficient * mean((r_c + r_r) ** 2)``.

  ``form='batch'`` is the weaker ``coef * mean(concat(r_c, r_r))^2``, which only pins the
  batch mean (the minimal constraint that fixes the offset, leaving each pair's sum free);
  it was this function's only form before, so results trained with it differ from the paper's.
  Example: ``r_c = [5, -5]``, ``r_r = [4, -4]`` (pairs (5, 4) and (-5, -4)) give 81 with
  ``'pair'`` and 0 with ``'batch'``.

  Args:
      rewards_chosen: ``[batch]`` rewards of the chosen responses (any shape, matched by
          ``rewards_rejected``; every entry is one pair).
      rewards_rejected: rewards of the rejected responses, the shape of ``rewards_chosen``.
      coef: penalty coefficient >= 0 (Eisenstein et al. and TRL use 0.01).
      form: ``'pair'`` (the paper's) or ``'batch'``.

  Returns:
      A scalar.

  References:
      Eisenstein et al., "Helping or herding? Reward model ensembles mitigate but do not
      eliminate reward hacking", 2023, Eq. 2 (reward-centring auxiliary loss).
  """
  rc, rr = as_float(rewards_chosen), as_float(rewards_rejected)
  if rc.shape != rr.shape:
    raise ValueError(
      f"rewards_rejected must have the shape of rewards_chosen {rc.shape}, got {rr.shape}"
    )
  if rc.size == 0:
    raise ValueError(f"rewards_chosen must be non-empty, got shape {rc.shape}")
  if form not in CENTERING_FORMS:
    raise ValueError(f"form must be one of {CENTERING_FORMS}, got {form!r}")
  check_number(coef, "coef", ge=0)
  if form == "pair":
    return coef * jnp.mean(jnp.square(rc + rr))
  return coef * jnp.square(jnp.mean(jnp.concatenate([rc.ravel(), rr.ravel()])))


# ------------------------------------------------------------------------------ registry
PairwiseLoss = Callable[..., jax.Array]

_LOSSES = {
  "bradley_terry": bradley_terry_loss,
  "thurstone": thurstone_loss,
  "hinge": hinge_loss,
}
LOSS_NAMES = tuple(sorted(_LOSSES))
_HYPERPARAMETERS = ("margin", "label_smoothing")


def get_loss(name: str, **kwargs) -> PairwiseLoss:
  """Returns the pairwise loss called ``name`` with its hyperparameters bound.

  The result is called as ``loss(rewards_chosen, rewards_rejected, *, weights=None,
  labels=None) -> scalar``.

  Args:
      name: one of `LOSS_NAMES`: ``'bradley_terry'``, ``'hinge'``, ``'thurstone'``.
      **kwargs: ``margin`` and/or ``label_smoothing``.

  Raises:
      ValueError: for an unknown name or hyperparameter.
  """
  if name not in _LOSSES:
    raise ValueError(f"unknown loss {name!r}; valid names: {list(LOSS_NAMES)}")
  unknown = sorted(set(kwargs) - set(_HYPERPARAMETERS))
  if unknown:
    raise ValueError(
      f"unknown hyperparameters {unknown} for loss {name!r}; valid: {list(_HYPERPARAMETERS)}"
    )
  return functools.partial(_LOSSES[name], **kwargs)
