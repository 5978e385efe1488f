"""Rewards, returns and advantage estimators for RLHF policy optimisation.

Per-token RLHF rewards (a KL penalty on every response token plus the sequence score at the
last one), masked whitening, generalised advantage estimation, REINFORCE returns with a
moving-average baseline, group baselines (RLOO, GRPO), and the adaptive KL controller.

Token alignment follows ``jaxrm.models.policy``: entry ``t`` of ``r_t``, ``v_t`` and ``logp`` belongs to
the action "emit ``tokens[t]``", and ``v_t`` is the value of the state in which that token is
chosen. Masks are bool or float; a float mask is read as an indicator (nonzero means a real
token). A mask is True on the *response* tokens only: prompt tokens and padding are masked out,
neither contribute to nor receive rewards, returns or advantages (their outputs are 0), and the
results never depend on how much padding there is.

The sequence functions (``gae``, ``reinforce_returns``) work on one trajectory ``[seq]``, in
the style of rlax; ``batched_gae`` and ``batched_reinforce_returns`` map them over
``[batch, seq]``.
"""

import functools
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxrm.math._arrays import as_float, check_number, is_concrete


def _check_mask(name: str, mask: ArrayLike, ref_name: str, ref: jax.Array) -> jax.Array:
  """Returns ``mask`` as bool after checking it has the shape of ``ref``."""
  mask = jnp.asarray(mask)
  if mask.shape != ref.shape:
    raise ValueError(f"{name} must have the shape of {ref_name} {ref.shape}, got {mask.shape}")
  return mask != 0


def rlhf_token_rewards(
  score: ArrayLike, kl: ArrayLike, mask: ArrayLike, *, kl_coef: ArrayLike
) -> jax.Array:
  """Per-token RLHF rewards: ``-kl_coef * kl`` on each response token, plus the score at the last.

  ``r[b, t] = -kl_coef * kl[b, t] + score[b] * [t == last response token of b]`` on response
  tokens and 0 elsewhere. The last response token is the last True position of ``mask``, so
  left prompts and right padding are both handled; a row with no response token gets no
  reward at all.

  Args:
      score: sequence-level reward-model scores, ``[batch]``.
      kl: per-token KL estimates (e.g. ``jaxrm.math.kl.kl_estimate``), ``[batch, seq]``.
      mask: response mask, ``[batch, seq]`` bool or float.
      kl_coef: KL penalty coefficient (a scalar; may be traced, e.g. from
          ``AdaptiveKLState.kl_coef``).

  Returns:
      Rewards ``[batch, seq]``, 0 at masked positions.

  References:
      Ziegler et al., "Fine-Tuning Language Models from Human Preferences", 2019.
      Stiennon et al., "Learning to summarize from human feedback", 2020.
  """
  score, kl = as_float(score, "score"), as_float(kl, "kl")
  if kl.ndim != 2:
    raise ValueError(f"kl must have shape [batch, seq], got {kl.shape}")
  if score.shape != kl.shape[:1]:
    raise ValueError(f"score must have shape [batch] = {kl.shape[:1]}, got {score.shape}")
  m = _check_mask("mask", mask, "kl", kl)
  kl_coef = jnp.asarray(kl_coef, kl.dtype)
  if kl_coef.ndim != 0:
    raise ValueError(f"kl_coef must be a scalar, got shape {kl_coef.shape}")
  seq = kl.shape[1]
  last = jnp.max(jnp.where(m, jnp.arange(seq), -1), axis=-1)  # -1 when the row is empty.
  at_last = jnp.arange(seq)[None, :] == last[:, None]
  rewards = -kl_coef * kl + jnp.where(at_last, score[:, None], 0.0)
  return jnp.where(m, rewards, 0.0)


def whiten(
  x: ArrayLike,
  mask: ArrayLike,
  *,
  shift_mean: bool = True,
  eps: float = 1e-8,
  axis_name: str | None = None,
) -> jax.Array:
  """Whitens ``x`` over the masked-in entries: ``(x - mean) / sqrt(var + eps)``.

  Mean and variance are taken over all entries where ``mask`` is True (every axis at once);
  the variance is the population variance (``ddof=0``, dividing by ``n``), so the result has
  zero mean and unit variance over the mask (up to ``eps``). TRL's ``masked_whiten`` divides
  by ``n - 1`` (Bessel's correction), which scales the output by ``sqrt((n - 1) / n)``
  relative to this one; the difference vanishes for large batches. Masked entries are
  ignored (they may hold anything) and are 0 in the output.

  Args:
      x: values to whiten (e.g. advantages), any shape, e.g. ``[batch, seq]``.
      mask: same shape as ``x``, bool or float.
      shift_mean: if False, the mean is added back after scaling (only the scale changes), as
          done for rewards in Ziegler et al. (2019) and TRL.
      eps: added to the variance (> 0).
      axis_name: if given, the statistics are summed over this mapped axis (``lax.psum``), so
          that under ``shard_map`` / ``pmap`` every shard is whitened with the global statistics.

  Returns:
      Whitened values, same shape as ``x``, 0 at masked positions.
  """
  x = as_float(x, "x")
  m = _check_mask("mask", mask, "x", x)
  check_number(eps, "eps", gt=0)

  def total(v):
    s = jnp.sum(v)
    return s if axis_name is None else lax.psum(s, axis_name)

  count = jnp.maximum(total(m.astype(x.dtype)), 1.0)
  mean = total(jnp.where(m, x, 0.0)) / count
  var = total(jnp.where(m, jnp.square(x - mean), 0.0)) / count
  out = (x - mean) * lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return jnp.where(m, out, 0.0)


def clip_rewards(x: ArrayLike, *, max_abs: float) -> jax.Array:
  """Clips rewards elementwise to ``[-max_abs, max_abs]``.

  Args:
      x: rewards, any shape.
      max_abs: the bound (> 0).

  Returns:
      ``clip(x, -max_abs, max_abs)``, same shape as ``x``.
  """
  check_number(max_abs, "max_abs", gt=0)
  return jnp.clip(as_float(x, "x"), -max_abs, max_abs)


def _check_scalar(name: str, value: ArrayLike) -> None:
  if jnp.ndim(value) != 0:
    raise ValueError(
      f"{name} must be a scalar (one discount for the whole trajectory; per-step discounts "
      f"are not supported), got shape {jnp.shape(value)}"
    )


def _masked_lambda_advantages(
  r_t: jax.Array, v_t: jax.Array, m: jax.Array, gamma: ArrayLike, lam: ArrayLike
) -> jax.Array:
  """Reverse scan computing GAE(gamma, lam) over the masked-in positions of one trajectory."""
  _check_scalar("gamma", gamma)
  _check_scalar("lam", lam)
  gamma = jnp.asarray(gamma, r_t.dtype)
  lam = jnp.asarray(lam, r_t.dtype)

  def body(carry, inputs):
    v_next, adv_next = carry  # value and advantage at the next *real* position.
    r, v, real = inputs
    delta = r + gamma * v_next - v
    adv = delta + gamma * lam * adv_next
    carry = (jnp.where(real, v, v_next), jnp.where(real, adv, adv_next))
    return carry, jnp.where(real, adv, 0.0)

  zero = jnp.zeros((), r_t.dtype)  # bootstrap value 0 after the last response token.
  _, adv = lax.scan(body, (zero, zero), (r_t, v_t, m), reverse=True)
  return adv


def gae(
  r_t: ArrayLike,
  v_t: ArrayLike,
  mask: ArrayLike,
  *,
  gamma: ArrayLike,
  lam: ArrayLike,
) -> tuple[jax.Array, jax.Array]:
  """Generalised advantage estimation over the response tokens of one trajectory.

  The trajectory is the sequence of positions where ``mask`` is True, in order; masked
  positions (left prompt, right padding, anything in between) are skipped: their rewards and
  values are ignored and their outputs are 0. After the last response token the episode ends
  (bootstrap value 0). (OpenRLHF instead steps through masked positions, zeroing their
  rewards and values; the two agree for contiguous response masks, the usual case, and
  differ only for masks with holes.) With ``u`` the next real position after ``t``:

      ``delta_t = r_t + gamma * v_u - v_t``,  ``A_t = delta_t + gamma * lam * A_u``,
      ``G_t = A_t + v_t``.

  Args:
      r_t: rewards, ``[seq]`` (e.g. a row of ``rlhf_token_rewards``).
      v_t: value estimates of the state in which token ``t`` is chosen, ``[seq]``.
      mask: response mask, ``[seq]`` bool or float.
      gamma: discount, a scalar (per-step discounts are not supported).
      lam: GAE mixing parameter ``lambda`` (1 gives Monte-Carlo advantages, 0 gives TD(0)),
          a scalar.

  Returns:
      ``(advantages, returns)``, each ``[seq]``, 0 at masked positions. ``returns`` are the
      lambda-returns, the targets for the value function.

  References:
      Schulman et al., "High-Dimensional Continuous Control Using Generalized Advantage
      Estimation", 2016.
      Ouyang et al., "Training language models to follow instructions with human feedback",
      2022.
  """
  r_t, v_t = as_float(r_t, "r_t"), as_float(v_t, "v_t")
  if r_t.ndim != 1:
    raise ValueError(f"r_t must have shape [seq], got {r_t.shape} (use batched_gae)")
  if v_t.shape != r_t.shape:
    raise ValueError(f"v_t must have the shape of r_t {r_t.shape}, got {v_t.shape}")
  m = _check_mask("mask", mask, "r_t", r_t)
  dtype = jnp.result_type(r_t, v_t)
  r_t, v_t = r_t.astype(dtype), v_t.astype(dtype)
  adv = _masked_lambda_advantages(r_t, v_t, m, gamma, lam)
  returns = jnp.where(m, adv + v_t, 0.0)
  return adv, returns


def _check_batch(r_t: ArrayLike, **others: ArrayLike) -> jax.Array:
  """``r_t`` as an array after checking it is ``[batch, seq]`` and ``others`` have its shape."""
  r_t = jnp.asarray(r_t)
  if r_t.ndim != 2:
    raise ValueError(f"r_t must have shape [batch, seq], got {r_t.shape}")
  for name, x in others.items():
    if jnp.shape(x) != r_t.shape:
      raise ValueError(f"{name} must have the shape of r_t {r_t.shape}, got {jnp.shape(x)}")
  return r_t


def batched_gae(
  r_t: ArrayLike,
  v_t: ArrayLike,
  mask: ArrayLike,
  *,
  gamma: ArrayLike,
  lam: ArrayLike,
) -> tuple[jax.Array, jax.Array]:
  """``gae`` mapped over a batch: ``[batch, seq]`` inputs, ``([batch, seq], [batch, seq])``."""
  r_t = _check_batch(r_t, v_t=v_t, mask=mask)
  return jax.vmap(functools.partial(gae, gamma=gamma, lam=lam))(r_t, v_t, mask)


def reinforce_returns(r_t: ArrayLike, mask: ArrayLike, *, gamma: ArrayLike = 1.0) -> jax.Array:
  """Discounted reward-to-go ``G_t = sum_{u >= t, u real} gamma^k(t, u) r_u`` of one trajectory.

  ``k(t, u)`` counts the real (masked-in) steps between ``t`` and ``u``, so masked positions
  are skipped exactly as in ``gae``; outputs at masked positions are 0.

  Args:
      r_t: rewards, ``[seq]``.
      mask: response mask, ``[seq]`` bool or float.
      gamma: discount, a scalar (default 1, the usual choice for RLHF).

  Returns:
      Returns ``[seq]``.

  References:
      Williams, "Simple statistical gradient-following algorithms for connectionist
      reinforcement learning", 1992.
  """
  r_t = as_float(r_t, "r_t")
  if r_t.ndim != 1:
    raise ValueError(f"r_t must have shape [seq], got {r_t.shape} (use batched_reinforce_returns)")
  m = _check_mask("mask", mask, "r_t", r_t)
  # With zero values and lambda = 1, GAE advantages are the discounted reward-to-go.
  return _masked_lambda_advantages(r_t, jnp.zeros_like(r_t), m, gamma, 1.0)


def batched_reinforce_returns(
  r_t: ArrayLike, mask: ArrayLike, *, gamma: ArrayLike = 1.0
) -> jax.Array:
  """``reinforce_returns`` mapped over a batch: ``[batch, seq]`` in and out."""
  r_t = _check_batch(r_t, mask=mask)
  return jax.vmap(functools.partial(reinforce_returns, gamma=gamma))(r_t, mask)


class ReinforceBaselineState(NamedTuple):
  """Moving-average baseline for REINFORCE (a pytree, so it is checkpointed with the run)."""

  value: jax.Array  # shape=(), float32; current baseline (0 before the first update).
  count: jax.Array  # shape=(), int32; number of updates so far.


def reinforce_baseline_init() -> ReinforceBaselineState:
  """Returns the initial baseline state (value 0, no updates)."""
  return ReinforceBaselineState(value=jnp.zeros((), jnp.float32), count=jnp.zeros((), jnp.int32))


def reinforce_baseline_update(
  state: ReinforceBaselineState, episode_returns: ArrayLike, *, decay: ArrayLike = 0.9
) -> ReinforceBaselineState:
  """Folds a batch of episode returns into the exponential moving-average baseline.

  The first update sets the baseline to the batch mean (no bias towards the initial 0);
  later ones set ``value = decay * value + (1 - decay) * mean(episode_returns)``.

  Use the baseline *before* updating it with the current batch (``reinforce_advantages``
  then ``reinforce_baseline_update``): a baseline independent of the current samples keeps
  the policy gradient unbiased, which a mean over the same batch would not (cf. RLOO).

  Args:
      state: the current state.
      episode_returns: total return of each episode in the batch, ``[batch]`` (e.g. the
          return at the first response token, or the sequence score).
      decay: moving-average decay in ``[0, 1)``.

  Returns:
      The new state.
  """
  episode_returns = as_float(episode_returns, "episode_returns")
  if episode_returns.ndim != 1:
    raise ValueError(f"episode_returns must have shape [batch], got {episode_returns.shape}")
  batch_mean = jnp.mean(episode_returns).astype(state.value.dtype)
  decay = jnp.asarray(decay, state.value.dtype)
  ema = decay * state.value + (1.0 - decay) * batch_mean
  value = jnp.where(state.count == 0, batch_mean, ema)
  return ReinforceBaselineState(value=value, count=state.count + 1)


def reinforce_advantages(
  returns: ArrayLike, mask: ArrayLike, baseline: ReinforceBaselineState
) -> jax.Array:
  """REINFORCE advantages ``G_t - b`` with the moving-average baseline ``b``.

  Args:
      returns: reward-to-go, any shape (e.g. ``[batch, seq]`` from
          ``batched_reinforce_returns``).
      mask: same shape, bool or float.
      baseline: the baseline state (before folding in the current batch).

  Returns:
      Advantages, same shape as ``returns``, 0 at masked positions.

  References:
      Williams, 1992; Ahmadian et al., "Back to Basics: Revisiting REINFORCE Style
      Optimization for Learning from Human Feedback in LLMs", 2024.
  """
  returns = as_float(returns, "returns")
  m = _check_mask("mask", mask, "returns", returns)
  return jnp.where(m, returns - baseline.value.astype(returns.dtype), 0.0)


def _check_groups(scores: ArrayLike, *, min_k: int) -> jax.Array:
  scores = as_float(scores, "scores")
  if scores.ndim != 2:
    raise ValueError(f"scores must have shape [num_prompts, k], got {scores.shape}")
  if scores.shape[1] < min_k:
    raise ValueError(
      f"scores must have at least k={min_k} samples per prompt, got shape {scores.shape}"
    )
  return scores


# Deviations within this many ulps of a group's largest score are rounding, not signal.
TIE_ULPS = 8


def _from_first(scores: jax.Array) -> jax.Array:
  """Each group's scores relative to its first one, ties zeroed, ``[n, k]``.

  Group means are taken of these deviations, not of the scores, so a group of tied scores
  gets advantages of exactly zero. Without this, ties leave rounding residues: the float32
  mean of ``k`` equal scores is an ulp off for 10-66% of groups (``k`` = 3, 5, 6, 7, 8),
  XLA may compute one score in two fusions that disagree in the last bits (e.g. a reward
  normalisation), and a group standard deviation of ~1e-7 against ``eps = 1e-6`` turns such a
  residue into advantages of up to 0.2 whose sign depends on the summation order. A deviation
  within ``TIE_ULPS`` ulps of the group's largest absolute score is a tie.
  """
  # The barrier materialises the scores once, so the slice and the difference read one copy.
  scores = lax.optimization_barrier(scores)
  deviations = scores - scores[:, :1]
  scale = jnp.max(jnp.abs(scores), axis=1, keepdims=True)
  tol = TIE_ULPS * jnp.finfo(scores.dtype).eps * scale
  return jnp.where(jnp.abs(deviations) <= tol, 0.0, deviations).astype(scores.dtype)


def rloo_advantages(scores: ArrayLike) -> jax.Array:
  """REINFORCE leave-one-out advantages: ``a_i = r_i - mean_{j != i} r_j`` within each group.

  Equal to ``k / (k - 1) * (r_i - mean_j r_j)``; the advantages of a group sum to zero and
  each baseline is independent of its own sample, so the gradient estimate is unbiased.
  Scores within ``TIE_ULPS`` ulps of each other are ties: a group of tied scores gets
  advantages of exactly zero (see ``_from_first``).

  Args:
      scores: rewards of ``k`` samples for each prompt, ``[num_prompts, k]``, ``k >= 2``.

  Returns:
      Advantages ``[num_prompts, k]``.

  Raises:
      ValueError: if ``scores`` is not rank 2 or ``k < 2``.

  References:
      Kool et al., "Buy 4 REINFORCE Samples, Get a Baseline for Free!", 2019.
      Ahmadian et al., "Back to Basics: Revisiting REINFORCE Style Optimization for Learning
      from Human Feedback in LLMs", 2024.
  """
  deviations = _from_first(_check_groups(scores, min_k=2))
  k = deviations.shape[1]
  total = jnp.sum(deviations, axis=1, keepdims=True)
  return deviations - (total - deviations) / (k - 1)


GRPO_SCALES = ("group", "batch", "none")


def grpo_advantages(
  scores: ArrayLike,
  *,
  eps: float = 1e-6,
  scale: bool | str = "group",
  axis_name: str | None = None,
) -> jax.Array:
  """Group-relative advantages ``(r_i - mean(r)) / (std + eps)`` within each group.

  The mean is the group's. ``std`` depends on ``scale`` (TRL's ``scale_rewards``):

  * ``'group'`` (GRPO, Shao et al. 2024): the group's standard deviation, so the advantages
    of each group have zero mean and unit standard deviation (up to ``eps``); a group whose
    scores are all equal (within ``TIE_ULPS`` ulps) gets advantages of exactly zero;
  * ``'batch'``: the standard deviation of all scores of the (global, with ``axis_name``)
    batch, one scale for every group (robust to groups with tiny spread);
  * ``'none'``: no division, only the group mean is subtracted (Dr. GRPO, Liu et al. 2025).

  ``True`` / ``False`` are accepted for ``'group'`` / ``'none'``. Standard deviations are
  population ones (``ddof=0``, dividing by ``n``); TRL and veRL use the sample standard
  deviation (``ddof=1``), which gives advantages smaller by ``sqrt((n - 1) / n)``.

  Args:
      scores: rewards of ``k`` samples for each prompt, ``[num_prompts, k]``, ``k >= 1``.
      eps: added to the standard deviation (> 0).
      scale: ``'group'``, ``'batch'`` or ``'none'`` (see above).
      axis_name: mapped axis over which ``'batch'`` statistics are taken (groups never span
          devices).

  Returns:
      Advantages ``[num_prompts, k]``.

  References:
      Shao et al., "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open
      Language Models", 2024.
      Liu et al., "Understanding R1-Zero-Like Training: A Critical Perspective", 2025
      (Dr. GRPO).
  """
  if isinstance(scale, bool):
    scale = "group" if scale else "none"
  if scale not in GRPO_SCALES:
    raise ValueError(f"scale must be one of {GRPO_SCALES} (or a bool), got {scale!r}")
  scores = _check_groups(scores, min_k=1)
  check_number(eps, "eps", gt=0)
  deviations = _from_first(scores)
  centred = deviations - jnp.mean(deviations, axis=1, keepdims=True)
  if scale == "none":
    return centred
  if scale == "group":
    std = jnp.sqrt(jnp.mean(jnp.square(centred), axis=1, keepdims=True))
    return centred / (std + eps)

  def across(v):
    return v if axis_name is None else lax.pmean(v, axis_name)

  mean = across(jnp.mean(scores))
  std = jnp.sqrt(across(jnp.mean(jnp.square(scores - mean))))
  return centred / (std + eps)


class AdaptiveKLState(NamedTuple):
  """State of the adaptive KL controller (a pytree, so it is checkpointed with the run)."""

  kl_coef: jax.Array  # shape=(), float32


def adaptive_kl_init(*, init_kl_coef: ArrayLike) -> AdaptiveKLState:
  """Returns the controller state with ``kl_coef = init_kl_coef``.

  For a fixed KL coefficient, keep this state and do not call ``adaptive_kl_update``.

  References:
      Ziegler et al., "Fine-Tuning Language Models from Human Preferences", 2019.
  """
  check_number(init_kl_coef, "init_kl_coef", ge=0)
  return AdaptiveKLState(kl_coef=jnp.asarray(init_kl_coef, jnp.float32))


def adaptive_kl_update(
  state: AdaptiveKLState,
  current_kl: ArrayLike,
  n_steps: ArrayLike,
  *,
  target_kl: float,
  horizon: float,
) -> AdaptiveKLState:
  """Adapts the KL coefficient towards a target KL (Ziegler et al., 2019, Eq. 2).

  ``e = clip(current_kl / target_kl - 1, -0.2, 0.2)`` and
  ``kl_coef <- kl_coef * (1 + e * n_steps / horizon)``: the coefficient rises when the KL is
  above target and falls when it is below.

  A fixed (non-adaptive) coefficient is the caller's business: keep the state from
  ``adaptive_kl_init`` and do not call this function. ``target_kl=None`` is rejected so that a
  misconfigured run fails loudly instead of silently not adapting.

  Args:
      state: the current controller state.
      current_kl: the measured KL(pi || pi_ref) per sequence, averaged over the batch (scalar).
      n_steps: number of samples (or steps) since the last update (scalar).
      target_kl: the KL to aim for (> 0).
      horizon: the time scale of the adaptation, in the units of ``n_steps``; it must exceed
          ``0.2 * n_steps``, else a KL below target would make the coefficient <= 0.

  Returns:
      The new state.

  Raises:
      ValueError: ``target_kl`` or ``horizon`` not > 0, ``n_steps`` negative, or (where both are
          concrete) ``horizon <= 0.2 * n_steps``.

  References:
      Ziegler et al., "Fine-Tuning Language Models from Human Preferences", 2019.
  """
  if target_kl is None:
    raise ValueError(
      "target_kl is None: for a fixed KL coefficient keep the AdaptiveKLState from "
      "adaptive_kl_init and do not call adaptive_kl_update"
    )
  check_number(target_kl, "target_kl", gt=0)
  check_number(horizon, "horizon", gt=0)
  check_number(n_steps, "n_steps", ge=0)
  if is_concrete(n_steps) and is_concrete(horizon) and not 0.2 * n_steps < horizon:
    # the factor 1 + e * n_steps / horizon with e = -0.2 (KL far below target) would be <= 0
    raise ValueError(
      f"horizon ({horizon}) must exceed 0.2 * n_steps ({n_steps}): else a KL below target "
      "would turn the coefficient zero or negative"
    )
  dtype = state.kl_coef.dtype
  current_kl = jnp.asarray(current_kl, dtype)
  if current_kl.ndim != 0:
    raise ValueError(f"current_kl must be a scalar, got shape {current_kl.shape}")
  error = jnp.clip(current_kl / target_kl - 1.0, -0.2, 0.2)
  mult = 1.0 + error * jnp.asarray(n_steps, dtype) / horizon
  return AdaptiveKLState(kl_coef=state.kl_coef * mult)
