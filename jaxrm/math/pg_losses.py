"""Policy-gradient losses for language-model policies: PPO, REINFORCE, value and entropy terms.

All losses take per-token arrays ``[batch, seq]`` and a mask ``[batch, seq]`` (bool or float,
read as an indicator: nonzero means a real token, normally the response tokens). Masked
positions contribute nothing to the loss and get exactly zero gradient, whatever they hold.

Token losses are reduced to a scalar by ``masked_aggregate``:

* ``'token_mean'``: sum over all real tokens of the batch / number of real tokens (every token
  weighs the same; longer responses weigh more);
* ``'seq_mean'``: mean over sequences of each sequence's mean over its real tokens (every
  sequence weighs the same). Sequences without any real token are left out;
* ``'constant_length'``: sum over all real tokens of the batch / (number of sequences x
  ``norm_length``), a constant normaliser (Dr. GRPO, Liu et al. 2025: no length bias from
  dividing by each response's own length; TRL ``loss_type='dr_grpo'`` with
  ``norm_length = max_completion_length``). Every sequence (row) counts, with or without
  real tokens.

With ``axis_name`` (data parallelism), the denominators are averaged over the mapped axis, so
that ``lax.pmean`` of the per-shard loss, and of its per-device gradients, equals the loss (and
gradient) of the whole global batch even when shards hold different numbers of tokens. This is
the "average gradients with ``lax.pmean``" convention of ``jax.pmap`` and of ``jax.shard_map``
with ``check_vma=False``. (With ``check_vma=True``, ``shard_map`` already *sums* the gradients
of replicated parameters over the axis, so a further ``pmean`` changes nothing and the result
is ``axis_size`` times the global gradient.)

Advantages, old log-probabilities and old values are constants: the losses apply
``lax.stop_gradient`` to them.
"""

import jax
from jax import lax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxrm.math._arrays import as_float, check_number, is_int

AGGREGATIONS = ("token_mean", "seq_mean", "constant_length")
RATIO_LEVELS = ("token", "sequence")


def _check_same(ref_name: str, ref: jax.Array, **others: jax.Array) -> None:
  if ref.ndim != 2:
    raise ValueError(f"{ref_name} must have shape [batch, seq], got {ref.shape}")
  for name, x in others.items():
    if jnp.shape(x) != ref.shape:
      raise ValueError(f"{name} must have the shape of {ref_name} {ref.shape}, got {jnp.shape(x)}")


def masked_aggregate(
  x: ArrayLike,
  mask: ArrayLike,
  *,
  aggregation: str = "token_mean",
  axis_name: str | None = None,
  norm_length: int | None = None,
) -> jax.Array:
  """Reduces per-token values ``[batch, seq]`` to a scalar over the real tokens.

  ``'token_mean'`` is ``sum_{b,t} m x / sum_{b,t} m``; ``'seq_mean'`` is the mean over
  sequences with at least one real token of ``sum_t m x / sum_t m``; ``'constant_length'``
  is ``sum_{b,t} m x / (batch * norm_length)``. With no real token at all the result is 0.
  Masked entries are ignored even if they are ``nan`` or ``inf``.

  Args:
      x: per-token values, ``[batch, seq]``.
      mask: ``[batch, seq]``, bool or float (nonzero = real token).
      aggregation: ``'token_mean'``, ``'seq_mean'`` or ``'constant_length'``.
      axis_name: if given, the number of tokens (or sequences) is averaged over this mapped
          axis with ``lax.pmean``, so that ``lax.pmean(masked_aggregate(...), axis_name)``
          equals the aggregate over the global batch, and so do per-device gradients
          averaged with ``lax.pmean`` (see the module docstring).
      norm_length: the constant length of ``'constant_length'`` (e.g. the response budget
          ``max_new_tokens``), a positive int; ignored by the other aggregations.

  Returns:
      A scalar.
  """
  x = as_float(x)
  _check_same("x", x, mask=mask)
  m = jnp.asarray(mask) != 0
  xm = jnp.where(m, x, 0.0)

  def across(v):
    return v if axis_name is None else lax.pmean(v, axis_name)

  if aggregation == "token_mean":
    count = across(jnp.sum(m, dtype=x.dtype))
    return jnp.sum(xm) / jnp.maximum(count, 1.0)
  if aggregation == "seq_mean":
    per_seq_count = jnp.sum(m, axis=-1, dtype=x.dtype)
    per_seq_mean = jnp.sum(xm, axis=-1) / jnp.maximum(per_seq_count, 1.0)
    num_seqs = across(jnp.sum(per_seq_count > 0, dtype=x.dtype))
    return jnp.sum(per_seq_mean) / jnp.maximum(num_seqs, 1.0)
  if aggregation == "constant_length":
    if not is_int(norm_length) or norm_length < 1:
      raise ValueError(
        f"aggregation='constant_length' needs norm_length, a positive int, got {norm_length!r}"
      )
    num_seqs = across(jnp.asarray(x.shape[0], x.dtype))
    return jnp.sum(xm) / (jnp.maximum(num_seqs, 1.0) * norm_length)
  raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def ppo_policy_loss(
  logp: ArrayLike,
  old_logp: ArrayLike,
  advantages: ArrayLike,
  mask: ArrayLike,
  *,
  clip_eps: float,
  aggregation: str = "token_mean",
  axis_name: str | None = None,
  norm_length: int | None = None,
  clip_eps_high: float | None = None,
  dual_clip: float | None = None,
  ratio_level: str = "token",
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """PPO clipped surrogate loss ``-min(rho A, clip(rho, 1 - eps, 1 + eps_high) A)`` per token.

  ``rho = exp(logp - old_logp)``. Where the ratio has left the trust region in the direction
  the advantage pushes it (``A > 0`` and ``rho > 1 + eps_high``, or ``A < 0`` and
  ``rho < 1 - eps``) the clipped term is selected and the token's gradient is zero.

  Variants (each off by default):

  * asymmetric clipping ("clip-higher", DAPO, Yu et al. 2025): ``clip_eps_high`` is the
    upper range (``clip_eps`` the lower), e.g. ``clip_eps=0.2, clip_eps_high=0.28``;
  * dual-clip PPO (Ye et al. 2020): for ``A < 0`` the loss is bounded by ``-dual_clip * A``,
    i.e. ``max(-min(rho A, clip(rho) A), ...)`` becomes ``min(that, -c A)`` (OpenRLHF's
    ``dual_clip``), so a huge ratio on a bad action cannot blow up the update; ``c > 1``;
  * sequence-level ratio (GSPO, Zheng et al. 2025): ``ratio_level='sequence'`` replaces each
    token's ratio by the sequence's ``s_i = exp(mean_t (logp - old_logp))`` over its masked
    tokens (TRL's ``importance_sampling_level='sequence'``); with sequence-level
    advantages and ``aggregation='seq_mean'`` this is GSPO's objective (use a small
    ``clip_eps``, the paper's 3e-4 / 4e-4).

  Args:
      logp: log-probabilities of the sampled tokens under the current policy,
          ``[batch, seq]`` (differentiated).
      old_logp: log-probabilities under the policy that sampled them, ``[batch, seq]``.
      advantages: advantages, ``[batch, seq]`` (e.g. from ``jaxrm.math.advantages.batched_gae``).
      mask: response mask, ``[batch, seq]``.
      clip_eps: clipping range ``eps`` (e.g. 0.2); the lower range with ``clip_eps_high``.
      aggregation: ``'token_mean'``, ``'seq_mean'`` or ``'constant_length'``, see
          ``masked_aggregate``.
      axis_name: see ``masked_aggregate``.
      norm_length: see ``masked_aggregate``.
      clip_eps_high: upper clipping range (None: ``clip_eps``).
      dual_clip: the dual-clip constant ``c > 1`` (None: off).
      ratio_level: ``'token'`` or ``'sequence'`` (GSPO).

  Returns:
      ``(loss, aux)``: the scalar loss and a dict of scalar diagnostics (gradient-free,
      aggregated like the loss):

      * ``'clip_fraction'``: fraction of tokens where the clipped term is selected (zero
        gradient; the dual clip is not counted);
      * ``'approx_kl'``: the k3 estimate ``(rho - 1) - log rho`` of ``KL(pi_old || pi)``
        from the token ratios. Conventions differ: TRL logs k2 (``0.5 (log rho)^2``),
        OpenRLHF k1 (``-log rho``); all estimate the same KL, k3 unbiased and non-negative;
      * ``'ratio_mean'``: mean of ``rho`` (the ratio used in the loss).

  References:
      Schulman et al., "Proximal Policy Optimization Algorithms", 2017.
      Ye et al., "Mastering Complex Control in MOBA Games with Deep Reinforcement Learning",
      2020 (dual-clip PPO).
      Yu et al., "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", 2025
      (clip-higher).
      Zheng et al., "Group Sequence Policy Optimization", 2025 (GSPO).
  """
  check_number(clip_eps, "clip_eps", gt=0, expected="> 0 (e.g. 0.2)")
  if clip_eps_high is not None:
    check_number(clip_eps_high, "clip_eps_high", gt=0)
  logp = as_float(logp, "logp")
  _check_same("logp", logp, old_logp=old_logp, advantages=advantages, mask=mask)
  m = jnp.asarray(mask) != 0
  # Zero masked entries first so that nan / inf there cannot reach the loss or its gradient
  # (and the ratio there is exactly 1).
  logp = jnp.where(m, logp, 0.0)
  old_logp = lax.stop_gradient(jnp.where(m, as_float(old_logp), 0.0))
  advantages = lax.stop_gradient(jnp.where(m, as_float(advantages), 0.0))
  if ratio_level not in RATIO_LEVELS:
    raise ValueError(f"ratio_level must be one of {RATIO_LEVELS}, got {ratio_level!r}")
  if dual_clip is not None:
    check_number(dual_clip, "dual_clip", gt=1, expected="None or > 1")
  high = clip_eps if clip_eps_high is None else clip_eps_high
  log_ratio = logp - old_logp
  token_log_ratio = log_ratio
  if ratio_level == "sequence":
    count = jnp.maximum(jnp.sum(m, axis=-1, keepdims=True, dtype=logp.dtype), 1.0)
    log_ratio = jnp.where(m, jnp.sum(log_ratio, axis=-1, keepdims=True) / count, 0.0)
  ratio = jnp.exp(log_ratio)
  unclipped = ratio * advantages
  clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + high) * advantages
  surrogate = jnp.minimum(unclipped, clipped)
  if dual_clip is not None:
    surrogate = jnp.where(advantages < 0, jnp.maximum(surrogate, dual_clip * advantages), surrogate)
  per_token = -surrogate

  def agg(v):
    return masked_aggregate(
      v, m, aggregation=aggregation, axis_name=axis_name, norm_length=norm_length
    )

  loss = agg(per_token)
  aux = {
    "clip_fraction": agg((clipped < unclipped).astype(logp.dtype)),
    "approx_kl": agg(jnp.expm1(token_log_ratio) - token_log_ratio),
    "ratio_mean": agg(ratio),
  }
  return loss, jax.tree.map(lax.stop_gradient, aux)


def ppo_value_loss(
  values: ArrayLike,
  old_values: ArrayLike,
  returns: ArrayLike,
  mask: ArrayLike,
  *,
  clip_eps: float,
  aggregation: str = "token_mean",
  axis_name: str | None = None,
  norm_length: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Clipped value loss ``1/2 max((v - G)^2, (v_clip - G)^2)`` per token.

  ``v_clip = old_v + clip(v - old_v, -eps, eps)`` keeps the new value within ``eps`` of the
  value at sampling time; taking the larger error makes the clipping pessimistic, as in the
  policy loss. The factor ``1/2`` makes the gradient of the unclipped term ``v - G``.

  Args:
      values: current value predictions, ``[batch, seq]`` (differentiated).
      old_values: value predictions at sampling time, ``[batch, seq]``.
      returns: value targets (e.g. the returns of ``jaxrm.math.advantages.batched_gae``),
          ``[batch, seq]``.
      mask: response mask, ``[batch, seq]``.
      clip_eps: value clipping range ``eps`` (absolute, in reward units).
      aggregation: ``'token_mean'``, ``'seq_mean'`` or ``'constant_length'``, see
          ``masked_aggregate``.
      axis_name: see ``masked_aggregate``.
      norm_length: see ``masked_aggregate``.

  Returns:
      ``(loss, aux)``: the scalar loss and ``aux['clip_fraction']``, the fraction of tokens
      whose value moved more than ``eps`` and whose clipped error is the larger one
      (gradient-free).

  References:
      Schulman et al., "Proximal Policy Optimization Algorithms", 2017; the value clipping
      of the OpenAI baselines implementation (Dhariwal et al., 2017), also used by
      Ziegler et al. (2019) and Ouyang et al. (2022).
  """
  check_number(clip_eps, "clip_eps", gt=0)
  values = as_float(values, "values")
  _check_same("values", values, old_values=old_values, returns=returns, mask=mask)
  m = jnp.asarray(mask) != 0
  # Zero masked entries first so that nan / inf there cannot reach the loss or its gradient.
  values = jnp.where(m, values, 0.0)
  old_values = lax.stop_gradient(jnp.where(m, as_float(old_values), 0.0))
  returns = lax.stop_gradient(jnp.where(m, as_float(returns), 0.0))
  values_clipped = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
  err_unclipped = jnp.square(values - returns)
  err_clipped = jnp.square(values_clipped - returns)
  per_token = 0.5 * jnp.maximum(err_unclipped, err_clipped)

  def agg(v):
    return masked_aggregate(
      v, m, aggregation=aggregation, axis_name=axis_name, norm_length=norm_length
    )

  loss = agg(per_token)
  # Inside the range ``v_clip`` is ``v`` only up to rounding (``old + (v - old)``), so the
  # comparison alone would count some unclipped tokens.
  clipped = (jnp.abs(values - old_values) > clip_eps) & (err_clipped > err_unclipped)
  clip_fraction = agg(clipped.astype(values.dtype))
  return loss, {"clip_fraction": lax.stop_gradient(clip_fraction)}


def entropy_bonus(
  entropy: ArrayLike,
  mask: ArrayLike,
  *,
  aggregation: str = "token_mean",
  axis_name: str | None = None,
  norm_length: int | None = None,
) -> jax.Array:
  """Aggregated per-token policy entropy, to be *subtracted* from a loss.

  Returns the (positive) mean entropy; a training loss uses
  ``loss = policy_loss - entropy_coef * entropy_bonus(...)`` to encourage exploration.

  Args:
      entropy: per-token entropy of the policy's next-token distribution, ``[batch, seq]``
          (``-sum_v p log p`` over the vocabulary).
      mask: response mask, ``[batch, seq]``.
      aggregation: ``'token_mean'``, ``'seq_mean'`` or ``'constant_length'``, see
          ``masked_aggregate``.
      axis_name: see ``masked_aggregate``.
      norm_length: see ``masked_aggregate``.

  Returns:
      A scalar.

  References:
      Mnih et al., "Asynchronous Methods for Deep Reinforcement Learning", 2016.
  """
  entropy = as_float(entropy)
  return masked_aggregate(
    entropy, mask, aggregation=aggregation, axis_name=axis_name, norm_length=norm_length
  )


def reinforce_loss(
  logp: ArrayLike,
  advantages: ArrayLike,
  mask: ArrayLike,
  *,
  aggregation: str = "token_mean",
  axis_name: str | None = None,
  norm_length: int | None = None,
) -> jax.Array:
  """REINFORCE loss ``-A * logp`` per token (advantages are constants).

  Its gradient is the policy-gradient estimate ``-A grad log pi``; with RLOO or GRPO
  sequence advantages broadcast over the response tokens it is the loss of those methods
  without ratio clipping.

  Args:
      logp: log-probabilities of the sampled tokens under the current policy,
          ``[batch, seq]`` (differentiated).
      advantages: advantages (or returns), ``[batch, seq]``; ``lax.stop_gradient`` is
          applied.
      mask: response mask, ``[batch, seq]``.
      aggregation: ``'token_mean'``, ``'seq_mean'`` or ``'constant_length'``, see
          ``masked_aggregate``.
      axis_name: see ``masked_aggregate``.
      norm_length: see ``masked_aggregate``.

  Returns:
      A scalar.

  References:
      Williams, "Simple statistical gradient-following algorithms for connectionist
      reinforcement learning", 1992.
      Ahmadian et al., "Back to Basics: Revisiting REINFORCE Style Optimization for Learning
      from Human Feedback in LLMs", 2024.
  """
  logp = as_float(logp)
  _check_same("logp", logp, advantages=advantages, mask=mask)
  m = jnp.asarray(mask) != 0
  advantages = lax.stop_gradient(jnp.where(m, as_float(advantages), 0.0))
  per_token = -advantages * jnp.where(m, logp, 0.0)
  return masked_aggregate(
    per_token, m, aggregation=aggregation, axis_name=axis_name, norm_length=norm_length
  )
