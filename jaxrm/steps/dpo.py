"""Direct preference optimisation steps (DPO, conservative DPO, IPO, SimPO, KTO), model-agnostic.

:func:`dpo_step` is a pure ``(state, batch) -> (state, metrics)`` function, like
:func:`jaxrm.steps.rm_step.reward_model_step`: it computes the policy's sequence log-probs
with a user ``apply_fn(params, tokens [b, s], mask [b, s]) -> logits [b, s, V]`` (or a tuple
whose first element is the logits, e.g. jaxrm's ``PolicyModel.apply``), evaluates a loss of
:mod:`jaxrm.math.dpo`, averages loss and gradients over ``axis_name`` with ``lax.pmean`` and
applies the update through :func:`jaxrm.steps.train_state.apply_if_finite` (a NaN never
reaches the parameters). Under ``shard_map`` use ``check_vma=False`` (the default of
:func:`jaxrm.steps.parallel.make_parallel_step`); every device must hold the same number of
examples.

The reference policy's log-probs are part of the batch (computed once per batch or once per
data set by :func:`add_reference_logps`, as TRL's ``precompute_ref_log_probs``), so the step
needs no reference parameters.

Paired batch (``'dpo'``, ``'ipo'``, ``'simpo'``), leading axis = the local batch:
  ``'chosen'``/``'rejected'`` ``[b, s]`` int, ``'chosen_mask'``/``'rejected_mask'`` ``[b, s]``
  bool (real tokens), optional ``'chosen_response_mask'``/``'rejected_response_mask'``
  ``[b, s]`` bool (the response tokens whose log-probs are summed; default: the mask, which
  for DPO and IPO gives the same loss, as the prompt's log-ratio cancels between the two
  responses), and ``'ref_chosen_logps'``/``'ref_rejected_logps'`` ``[b]`` (not for SimPO).

Unpaired batch (``'kto'``): ``'tokens'``, ``'mask'``, optional ``'response_mask'``, ``'desirable'``
``[b]`` bool, ``'ref_logps'`` ``[b]``, and the mismatched completions ``(x_i, y_j)`` whose
log-ratio estimates KL for the reference point: ``'kl_tokens'``, ``'kl_mask'``, optional
``'kl_response_mask'``, ``'ref_kl_logps'`` (:func:`mismatched_completions` builds them).

:func:`implicit_reward_fn` turns a DPO-trained policy into a reward function
``(params, tokens, mask) -> [b]`` with ``params = (policy_params, ref_params)``, usable
wherever a reward model's ``apply_fn`` is (evaluation steps, best-of-n, reports), as
RewardBench's DPO mode does.

References:
  Rafailov et al. 2023 (DPO); Mitchell 2023 (conservative DPO); Azar et al. 2023 (IPO);
  Meng et al. 2024 (SimPO); Ethayarajh et al. 2024 (KTO). See :mod:`jaxrm.math.dpo`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
import functools
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import optax

from jaxrm.math import dpo as dpo_lib
from jaxrm.models.policy import sequence_logprobs
from jaxrm.steps import microbatch
from jaxrm.steps import train_state as train_state_lib

LOSSES = ("dpo", "ipo", "simpo", "kto")


@dataclasses.dataclass(frozen=True)
class DPOConfig:
  """Hyperparameters of :func:`dpo_step` (hashable: a static jit argument).

  Attributes:
    loss: ``'dpo'`` (conservative DPO with ``label_smoothing > 0``), ``'ipo'``, ``'simpo'`` or
      ``'kto'``.
    beta: inverse temperature of the implicit reward (IPO's ``tau``; SimPO's reward scale).
    label_smoothing: assumed label-flip rate of conservative DPO / SimPO, in [0, 0.5].
    gamma: SimPO's target reward margin.
    desirable_weight: KTO's ``lambda_D``.
    undesirable_weight: KTO's ``lambda_U``.
    nonfinite: ``'skip'`` or ``'raise'`` (:func:`jaxrm.steps.train_state.apply_if_finite`).
  """

  loss: str = "dpo"
  beta: float = 0.1
  label_smoothing: float = 0.0
  gamma: float = 0.5
  desirable_weight: float = 1.0
  undesirable_weight: float = 1.0
  nonfinite: str = "skip"

  def __post_init__(self):
    def bad(name, want):
      raise ValueError(f"DPOConfig.{name} must be {want}, got {getattr(self, name)!r}")

    if self.loss not in LOSSES:
      bad("loss", f"one of {LOSSES}")
    if not self.beta > 0:
      bad("beta", "> 0")
    if not 0 <= self.label_smoothing <= 0.5:
      bad("label_smoothing", "in [0, 0.5]")
    for name in ("desirable_weight", "undesirable_weight"):
      if not getattr(self, name) >= 0:
        bad(name, ">= 0")
    if self.nonfinite not in train_state_lib.NONFINITE_MODES:
      bad("nonfinite", f"one of {train_state_lib.NONFINITE_MODES}")


def _logits(apply_fn: Callable[..., Any], params: Any, tokens, mask) -> jax.Array:
  out = apply_fn(params, tokens, mask)
  return out[0] if isinstance(out, tuple) else out


def sequence_logps(
  apply_fn: Callable[..., Any],
  params: Any,
  tokens: jax.typing.ArrayLike,
  mask: jax.typing.ArrayLike,
  response_mask: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  """``log pi(response | prompt)``: token log-probs summed over ``response_mask`` -> ``[b]``.

  Args:
    apply_fn: ``apply_fn(params, tokens, mask)`` -> logits ``[b, s, V]`` (or a tuple whose
      first element is the logits); ``logits[:, t]`` predicts ``tokens[:, t + 1]``.
    params: the model's parameters.
    tokens: ``[b, s]`` int.
    mask: ``[b, s]`` bool, True on real tokens.
    response_mask: ``[b, s]`` bool, the tokens to sum over (default ``mask``; the first real
      token has no prediction and adds 0).
  """
  mask = jnp.asarray(mask).astype(bool)
  response_mask = mask if response_mask is None else jnp.asarray(response_mask).astype(bool)
  if response_mask.shape != mask.shape:
    raise ValueError(
      f"response_mask must have the shape of mask {mask.shape}, got {response_mask.shape}"
    )
  return sequence_logprobs(_logits(apply_fn, params, tokens, mask), tokens, response_mask & mask)


def _require(batch: Mapping[str, Any], keys: tuple[str, ...], loss: str) -> None:
  if not isinstance(batch, Mapping):
    raise ValueError(f"batch must be a dict of arrays, got {type(batch).__name__}")
  missing = [k for k in keys if k not in batch]
  if missing:
    raise ValueError(f"the {loss!r} batch is missing keys {missing}; got keys {sorted(batch)}")


def _paired_logps(apply_fn, params, batch) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Policy sequence log-probs and response lengths of the chosen and rejected sequences."""
  parts = {}
  for side in ("chosen", "rejected"):
    tokens, mask = batch[side], jnp.asarray(batch[f"{side}_mask"]).astype(bool)
    if jnp.ndim(tokens) != 2 or jnp.shape(mask) != jnp.shape(tokens):
      raise ValueError(
        f"batch['{side}'] and batch['{side}_mask'] must have the same shape [batch, seq], got "
        f"{jnp.shape(tokens)} and {jnp.shape(mask)}"
      )
    resp = batch.get(f"{side}_response_mask")
    if resp is not None and jnp.shape(resp) != mask.shape:
      raise ValueError(
        f"batch['{side}_response_mask'] must have the shape of batch['{side}'] "
        f"{jnp.shape(tokens)}, got {jnp.shape(resp)}"
      )
    resp = mask if resp is None else jnp.asarray(resp).astype(bool) & mask
    parts[side] = (tokens, mask, resp)
  (tc, mc, rc), (tr, mr, rr) = parts["chosen"], parts["rejected"]
  b = tc.shape[0]
  if tr.shape[0] != b:
    raise ValueError(
      f"batch['chosen'] and batch['rejected'] must have the same batch size, got {tc.shape} "
      f"and {tr.shape}"
    )
  if tc.shape[1] == tr.shape[1]:  # one forward pass for both
    logps = sequence_logps(
      apply_fn,
      params,
      jnp.concatenate([tc, tr]),
      jnp.concatenate([mc, mr]),
      jnp.concatenate([rc, rr]),
    )
    lc, lr = logps[:b], logps[b:]
  else:
    lc = sequence_logps(apply_fn, params, tc, mc, rc)
    lr = sequence_logps(apply_fn, params, tr, mr, rr)
  length = lambda m: jnp.sum(m, axis=1, dtype=jnp.float32)
  return lc, lr, length(rc), length(rr)


def add_reference_logps(
  batch: Mapping[str, Any], ref_params: Any, *, apply_fn: Callable[..., Any], loss: str = "dpo"
) -> dict[str, Any]:
  """Returns ``batch`` with the reference log-probs :func:`dpo_step` reads (jit-compatible).

  Paired losses get ``'ref_chosen_logps'`` and ``'ref_rejected_logps'``; ``'kto'`` gets
  ``'ref_logps'`` and ``'ref_kl_logps'``. ``apply_fn`` is the policy's (same architecture).
  """
  if loss == "kto":
    _require(batch, ("tokens", "mask", "kl_tokens", "kl_mask"), loss)
    ref = sequence_logps(
      apply_fn, ref_params, batch["tokens"], batch["mask"], batch.get("response_mask")
    )
    ref_kl = sequence_logps(
      apply_fn, ref_params, batch["kl_tokens"], batch["kl_mask"], batch.get("kl_response_mask")
    )
    return {**batch, "ref_logps": ref, "ref_kl_logps": ref_kl}
  _require(batch, ("chosen", "chosen_mask", "rejected", "rejected_mask"), loss)
  lc, lr, _, _ = _paired_logps(apply_fn, ref_params, batch)
  return {**batch, "ref_chosen_logps": lc, "ref_rejected_logps": lr}


def mismatched_completions(
  tokens: jax.typing.ArrayLike, mask: jax.typing.ArrayLike, *, prompt_len: int
) -> dict[str, jax.Array]:
  """KTO's mismatched pairs: prompt ``i`` with the response of example ``i - 1`` (cyclic).

  For sequences made of a LEFT-padded prompt of ``prompt_len`` tokens followed by the
  response (the layout of :mod:`jaxrm.steps.rollout` and the synthetic world).

  Returns:
    ``{'kl_tokens', 'kl_mask', 'kl_response_mask'}``, each ``[b, s]``.
  """
  tokens, mask = jnp.asarray(tokens), jnp.asarray(mask).astype(bool)
  if tokens.ndim != 2 or mask.shape != tokens.shape:
    raise ValueError(
      f"tokens and mask must have the same shape [batch, seq], got {tokens.shape} and {mask.shape}"
    )
  if not 0 < prompt_len < tokens.shape[1]:
    raise ValueError(f"prompt_len must be in (0, seq={tokens.shape[1]}), got {prompt_len}")
  prompt = jnp.arange(tokens.shape[1]) < prompt_len
  kl_tokens = jnp.where(prompt, tokens, jnp.roll(tokens, 1, axis=0))
  kl_mask = jnp.where(prompt, mask, jnp.roll(mask, 1, axis=0))
  return {"kl_tokens": kl_tokens, "kl_mask": kl_mask, "kl_response_mask": kl_mask & ~prompt}


def _pmean(x: Any, axis_name: Any) -> Any:
  return x if axis_name is None else lax.pmean(x, axis_name)


def _paired_keys(config: DPOConfig) -> tuple[str, ...]:
  keys = ("chosen", "chosen_mask", "rejected", "rejected_mask")
  return keys if config.loss == "simpo" else (*keys, "ref_chosen_logps", "ref_rejected_logps")


_KTO_KEYS = ("tokens", "mask", "desirable", "ref_logps", "kl_tokens", "kl_mask", "ref_kl_logps")


def _paired_objective(params, batch, *, apply_fn, config: DPOConfig):
  lc, lr, nc, nr = _paired_logps(apply_fn, params, batch)
  c = config
  if c.loss == "simpo":
    loss = dpo_lib.simpo_loss(
      lc, lr, nc, nr, beta=c.beta, gamma=c.gamma, label_smoothing=c.label_smoothing
    )
    r_c = c.beta * lc / jnp.maximum(nc, 1.0)
    r_r = c.beta * lr / jnp.maximum(nr, 1.0)
  else:
    ref_c, ref_r = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    if c.loss == "ipo":
      loss = dpo_lib.ipo_loss(lc, lr, ref_c, ref_r, beta=c.beta)
    else:
      loss = dpo_lib.dpo_loss(lc, lr, ref_c, ref_r, beta=c.beta, label_smoothing=c.label_smoothing)
    r_c = dpo_lib.implicit_reward(lc, ref_c, beta=c.beta)
    r_r = dpo_lib.implicit_reward(lr, ref_r, beta=c.beta)
  aux = {
    "accuracy": jnp.mean((r_c > r_r).astype(jnp.float32) + 0.5 * (r_c == r_r)),
    "margin": jnp.mean(r_c - r_r),
    "reward_chosen": jnp.mean(r_c),
    "reward_rejected": jnp.mean(r_r),
    "logps_chosen": jnp.mean(lc),
    "logps_rejected": jnp.mean(lr),
  }
  return loss, aux


def _kto_reference_point(apply_fn, params, batch, k: int, axis_name) -> jax.Array:
  """KTO's ``z0`` from the whole batch's mismatched completions (forward passes only, in
  ``k`` slices one after another): a constant for differentiation."""
  kl = {n: batch[n] for n in ("kl_tokens", "kl_mask", "kl_response_mask") if n in batch}

  def logps(part):
    return sequence_logps(
      apply_fn, params, part["kl_tokens"], part["kl_mask"], part.get("kl_response_mask")
    )

  kl_logps = logps(kl) if k == 1 else microbatch.join(lax.map(logps, microbatch.split(kl, k)))
  return dpo_lib.kto_reference_point(kl_logps, batch["ref_kl_logps"], axis_name=axis_name)


def _kto_objective(params, batch, *, apply_fn, config: DPOConfig, reference_point):
  logps = sequence_logps(
    apply_fn, params, batch["tokens"], batch["mask"], batch.get("response_mask")
  )
  loss = dpo_lib.kto_loss(
    logps,
    batch["ref_logps"],
    batch["desirable"],
    beta=config.beta,
    reference_point=reference_point,
    desirable_weight=config.desirable_weight,
    undesirable_weight=config.undesirable_weight,
  )
  reward = dpo_lib.implicit_reward(logps, batch["ref_logps"], beta=config.beta)
  desirable = jnp.asarray(batch["desirable"]).astype(bool)
  sums = jnp.stack(
    [
      jnp.sum(jnp.where(desirable, reward, 0.0)),
      jnp.sum(desirable, dtype=jnp.float32),
      jnp.sum(jnp.where(desirable, 0.0, reward)),
      jnp.sum(~desirable, dtype=jnp.float32),
    ]
  )
  return loss, {"reward": jnp.mean(reward), "class_sums": sums}


def dpo_step(
  state: train_state_lib.TrainState,
  batch: Mapping[str, jax.Array],
  *,
  apply_fn: Callable[..., Any],
  config: DPOConfig,
  optimizer: optax.GradientTransformation,
  axis_name: Any = None,
  microbatch_size: int | None = None,
) -> tuple[train_state_lib.TrainState, dict[str, jax.Array]]:
  """One optimizer step of a direct preference loss (see the module docstring for ``batch``).

  Microbatches (``microbatch_size``): the forward and backward passes run over consecutive
  slices of ``microbatch_size`` pairs (KTO: examples) one after another and their gradients
  are summed, each slice's loss scaled by ``1 / slices``
  (:func:`jaxrm.steps.microbatch.accumulate`): the whole batch's loss, gradients and metrics
  up to float rounding, with one slice's activations alive at a time (gradient
  accumulation). KTO's reference point is a whole-batch statistic: it is computed first, from
  the whole batch's mismatched completions (forward passes only, in the same slices).

  Args:
    state: :class:`jaxrm.steps.train_state.TrainState` of the policy.
    batch: paired (DPO, IPO, SimPO) or unpaired (KTO) batch with the reference log-probs.
    apply_fn: the policy's ``apply_fn(params, tokens, mask)`` -> logits (or a tuple starting
      with them).
    config: :class:`DPOConfig` (static).
    optimizer: optax transformation matching ``state.opt_state``.
    axis_name: mapped axis to average over (None under plain jit).
    microbatch_size: pairs (KTO: examples) per microbatch on each device, dividing the
      (per-device) batch; ``None`` or at least the batch: the whole batch in one pass.

  Returns:
    ``(state, metrics)``; metrics are global scalars: ``loss``, ``grad_norm``,
    ``nonfinite``, ``num_skipped``, and for paired losses ``accuracy`` (implicit reward of
    chosen > rejected, ties half), ``margin``, ``reward_chosen``, ``reward_rejected`` (mean
    implicit rewards; SimPO's is ``beta * log pi / |y|``), ``logps_chosen``,
    ``logps_rejected``; for KTO ``reference_point``, ``reward`` and
    ``reward_desirable_minus_undesirable``.
  """
  if not isinstance(config, DPOConfig):
    raise ValueError(f"config must be a DPOConfig, got {type(config).__name__}")
  kto = config.loss == "kto"
  _require(batch, _KTO_KEYS if kto else _paired_keys(config), config.loss)
  b = jnp.shape(batch["tokens" if kto else "chosen"])[0]
  k = microbatch.num_slices(microbatch_size, b, unit="examples" if kto else "pairs")
  if kto:
    z0 = _kto_reference_point(apply_fn, state.params, batch, k, axis_name)
    objective = functools.partial(
      _kto_objective, apply_fn=apply_fn, config=config, reference_point=z0
    )
  else:
    objective = functools.partial(_paired_objective, apply_fn=apply_fn, config=config)

  def scaled(params, part, share, _key):
    loss, aux = objective(params, part)
    return loss * share, aux

  grad_fn = jax.value_and_grad(scaled, has_aux=True)
  if k == 1:
    (loss, aux), grads = grad_fn(state.params, batch, 1.0, None)
  else:
    parts = microbatch.split(dict(batch), k)
    shares = jnp.full((k,), 1.0 / k, jnp.float32)
    loss, aux, grads = microbatch.accumulate(
      grad_fn, state.params, parts, shares, axis_name=axis_name
    )
    aux = jax.tree.map(lambda v: jnp.mean(v, axis=0), aux)  # equal slices: means of means
  grads, loss, aux = _pmean((grads, loss, aux), axis_name)
  if kto:
    sums = aux.pop("class_sums")  # class means over the global batch: ratios of averaged sums
    gap = sums[0] / jnp.maximum(sums[1], 1e-9) - sums[2] / jnp.maximum(sums[3], 1e-9)
    aux.update(reference_point=z0, reward_desirable_minus_undesirable=gap)
  new_state, bad = train_state_lib.apply_if_finite(
    state, grads, loss, optimizer, nonfinite=config.nonfinite, axis_name=axis_name
  )
  metrics = dict(aux, loss=loss, grad_norm=optax.tree.norm(grads), nonfinite=bad)
  metrics["num_skipped"] = new_state.num_skipped
  return new_state, metrics


def implicit_reward_fn(
  apply_fn: Callable[..., Any], *, beta: float, prompt_len: int | None = None
) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
  """The implicit reward model of a DPO-trained policy, ``beta * log pi / pi_ref``.

  Args:
    apply_fn: the policy's ``apply_fn(params, tokens, mask)`` -> logits (or a tuple).
    beta: the ``beta`` the policy was trained with (> 0).
    prompt_len: with LEFT-padded prompts of this many tokens followed by the response, only
      the response's log-ratio is counted (as RewardBench); None counts every real token,
      which ranks responses to the same prompt identically (the prompt's log-ratio is the
      same for all of them).

  Returns:
    ``reward_fn(params, tokens [b, s], mask [b, s]) -> [b]`` with ``params = (policy_params,
    ref_params)``: a drop-in ``apply_fn`` of a reward model (e.g. for
    :func:`jaxrm.steps.rm_step.reward_model_eval_step`) and a ``reward_fn`` of the RL steps.
  """
  if not beta > 0:
    raise ValueError(f"beta must be > 0, got {beta}")
  if prompt_len is not None and (not isinstance(prompt_len, int) or prompt_len < 1):
    raise ValueError(f"prompt_len must be None or a positive int, got {prompt_len!r}")

  def reward_fn(params, tokens, mask):
    if not (isinstance(params, tuple) and len(params) == 2):
      raise ValueError(
        f"params must be the pair (policy_params, ref_params), got {type(params).__name__}"
      )
    mask = jnp.asarray(mask).astype(bool)
    response = mask
    if prompt_len is not None:
      if not prompt_len < mask.shape[1]:
        raise ValueError(
          f"prompt_len={prompt_len} leaves no response tokens in sequences of length "
          f"{mask.shape[1]} (mask shape {mask.shape})"
        )
      response = mask & (jnp.arange(mask.shape[1]) >= prompt_len)[None, :]
    policy_params, ref_params = params
    logps = sequence_logps(apply_fn, policy_params, tokens, mask, response)
    ref_logps = sequence_logps(apply_fn, ref_params, tokens, mask, response)
    return dpo_lib.implicit_reward(logps, ref_logps, beta=beta)

  return reward_fn
