"""KL-divergence estimators between a policy and a reference policy.

The policy ``pi`` generated the sampled tokens; ``pi_ref`` is the reference (usually the
initial, supervised policy). At a sampled token ``x ~ pi`` write the likelihood ratio
``rho = pi_ref(x) / pi(x)``, so that ``log rho = ref_logp - logp``. The per-token estimators
of ``KL(pi || pi_ref)`` (Schulman, 2020) are

* ``k1 = -log rho`` — unbiased, high variance, can be negative;
* ``k2 = (log rho)^2 / 2`` — biased, low variance, close to the KL when ``pi ~ pi_ref``;
* ``k3 = (rho - 1) - log rho`` — unbiased (``E_pi[rho] = 1``), low variance, always >= 0.

``exact_kl_from_logits`` computes ``KL(pi || pi_ref)`` over the full vocabulary, and
``sequence_kl`` sums per-token values over the real tokens of each sequence.

Masks are bool or float ``[batch, seq]``; a float mask is read as an indicator (nonzero means a
real token). Masked positions contribute nothing, even if they hold ``nan`` or ``inf``.

References:
    Schulman, "Approximating KL divergence", 2020, http://joschu.net/blog/kl-approx.html
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxrm.math._arrays import as_float


def _log_ratio(logp: ArrayLike, ref_logp: ArrayLike) -> jax.Array:
  """Returns ``log rho = ref_logp - logp`` after checking the shapes agree."""
  logp, ref_logp = as_float(logp, "logp"), as_float(ref_logp, "ref_logp")
  if logp.shape != ref_logp.shape:
    raise ValueError(
      f"logp and ref_logp must have the same shape, got {logp.shape} and {ref_logp.shape}"
    )
  return ref_logp - logp


def kl_k1(logp: ArrayLike, ref_logp: ArrayLike) -> jax.Array:
  """The k1 estimator ``-log rho = logp - ref_logp`` of ``KL(pi || pi_ref)``.

  Unbiased for ``KL(pi || pi_ref)`` when the tokens are sampled from ``pi``; its variance is
  high and single values can be negative.

  Args:
      logp: log-probabilities ``log pi(x)`` of the sampled tokens, any shape (e.g.
          ``[batch, seq]``).
      ref_logp: log-probabilities ``log pi_ref(x)`` of the same tokens, same shape.

  Returns:
      Per-token estimates, same shape as ``logp``.

  References:
      Schulman, "Approximating KL divergence", 2020.
  """
  return -_log_ratio(logp, ref_logp)


def kl_k2(logp: ArrayLike, ref_logp: ArrayLike) -> jax.Array:
  """The k2 estimator ``(log rho)^2 / 2`` of ``KL(pi || pi_ref)``.

  Biased, but non-negative and of low variance; its expectation agrees with the KL to second
  order when ``pi`` and ``pi_ref`` are close (it is an f-divergence with the same second-order
  behaviour).

  Args:
      logp: log-probabilities ``log pi(x)`` of the sampled tokens, any shape.
      ref_logp: log-probabilities ``log pi_ref(x)`` of the same tokens, same shape.

  Returns:
      Per-token estimates, same shape as ``logp``.

  References:
      Schulman, "Approximating KL divergence", 2020.
  """
  return 0.5 * jnp.square(_log_ratio(logp, ref_logp))


def kl_k3(logp: ArrayLike, ref_logp: ArrayLike) -> jax.Array:
  """The k3 estimator ``(rho - 1) - log rho`` of ``KL(pi || pi_ref)``.

  Unbiased (``E_pi[rho] = 1``), non-negative everywhere (``e^u - 1 - u >= 0``) and of low
  variance. Computed as ``expm1(log rho) - log rho``, which is accurate for small ratios.

  Args:
      logp: log-probabilities ``log pi(x)`` of the sampled tokens, any shape.
      ref_logp: log-probabilities ``log pi_ref(x)`` of the same tokens, same shape.

  Returns:
      Per-token estimates (>= 0), same shape as ``logp``.

  References:
      Schulman, "Approximating KL divergence", 2020.
  """
  u = _log_ratio(logp, ref_logp)
  # exp(u) - 1 - u >= 0 exactly; the clamp removes rounding below zero at u ~ 0.
  return jnp.maximum(jnp.expm1(u) - u, 0.0)


_ESTIMATORS: dict[str, Callable[[ArrayLike, ArrayLike], jax.Array]] = {
  "k1": kl_k1,
  "k2": kl_k2,
  "k3": kl_k3,
}


def kl_estimate(logp: ArrayLike, ref_logp: ArrayLike, *, estimator: str = "k1") -> jax.Array:
  """Per-token estimate of ``KL(pi || pi_ref)`` with the named estimator.

  Args:
      logp: log-probabilities ``log pi(x)`` of tokens sampled from ``pi``, any shape.
      ref_logp: log-probabilities ``log pi_ref(x)`` of the same tokens, same shape.
      estimator: ``'k1'``, ``'k2'`` or ``'k3'`` (see the module docstring).

  Returns:
      Per-token estimates, same shape as ``logp``.

  Raises:
      ValueError: for an unknown estimator name.

  References:
      Schulman, "Approximating KL divergence", 2020.
  """
  try:
    fn = _ESTIMATORS[estimator]
  except (KeyError, TypeError):
    raise ValueError(f"estimator must be one of {sorted(_ESTIMATORS)}, got {estimator!r}") from None
  return fn(logp, ref_logp)


def exact_kl_from_logits(logits: ArrayLike, ref_logits: ArrayLike) -> jax.Array:
  """Exact ``KL(pi || pi_ref) = sum_v pi(v) (log pi(v) - log pi_ref(v))`` over the vocabulary.

  Logits may contain ``-inf`` (tokens removed by top-k / top-p): a token with ``pi(v) = 0``
  contributes 0; a token with ``pi(v) > 0`` and ``pi_ref(v) = 0`` makes the KL ``inf``.
  Computed in at least float32.

  Args:
      logits: unnormalised log-probabilities of ``pi``, ``[..., vocab]``.
      ref_logits: unnormalised log-probabilities of ``pi_ref``, same shape.

  Returns:
      The KL divergence, ``[...]`` (the vocabulary axis is reduced).
  """
  logits, ref_logits = as_float(logits, "logits"), as_float(ref_logits, "ref_logits")
  if logits.shape != ref_logits.shape or logits.ndim < 1:
    raise ValueError(
      "logits and ref_logits must have the same shape [..., vocab], got "
      f"{logits.shape} and {ref_logits.shape}"
    )
  logp = jax.nn.log_softmax(logits, axis=-1)
  ref_logp = jax.nn.log_softmax(ref_logits, axis=-1)
  p = jnp.exp(logp)
  diff = jnp.where(p > 0, logp - ref_logp, 0.0)
  return jnp.sum(p * diff, axis=-1)


def sequence_kl(per_token_kl: ArrayLike, mask: ArrayLike) -> jax.Array:
  """Sums a per-token KL over the real tokens of each sequence.

  Args:
      per_token_kl: per-token KL values (e.g. from ``kl_estimate``), ``[batch, seq]``.
      mask: ``[batch, seq]``, bool or float; True / nonzero on tokens to count (usually the
          response tokens).

  Returns:
      ``[batch]`` sums ``sum_t mask[b, t] * per_token_kl[b, t]``; masked positions contribute
      nothing, whatever they hold.
  """
  per_token_kl, mask = as_float(per_token_kl, "per_token_kl"), jnp.asarray(mask)
  if per_token_kl.ndim != 2:
    raise ValueError(f"per_token_kl must have shape [batch, seq], got {per_token_kl.shape}")
  if mask.shape != per_token_kl.shape:
    raise ValueError(
      f"mask must have the shape of per_token_kl {per_token_kl.shape}, got {mask.shape}"
    )
  return jnp.sum(jnp.where(mask != 0, per_token_kl, 0.0), axis=-1)
