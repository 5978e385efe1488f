"""Supervised fine-tuning (SFT) step: next-token cross-entropy on response tokens only.

``sft_step`` is a pure ``(state, batch) -> (state, metrics)`` function with the conventions
of :func:`jaxrm.steps.rm_step.reward_model_step`: a user ``apply_fn``, loss and gradients
averaged over ``axis_name`` with ``lax.pmean`` (parameters marked device-varying first), the
update applied through :func:`jaxrm.steps.train_state.apply_if_finite` (a non-finite loss or
gradient never reaches the parameters). The same body runs under ``jax.jit``,
``jax.shard_map``, ``jax.pmap`` and the FSDP mode of :mod:`jaxrm.steps.parallel`.

SFT batch (dict of arrays, leading axis = the local batch):
  ``'tokens'`` ``[batch, seq]`` int32 (prompt followed by response, any padding),
  ``'mask'`` ``[batch, seq]`` bool (True on real tokens),
  ``'response_mask'`` ``[batch, seq]`` bool (True on the response tokens to learn, EOS
  included; a subset of ``mask``), aligned with ``tokens`` as in
  :func:`jaxrm.models.policy.token_logprobs`.

The loss is the mean negative log-likelihood per response token over the *global* batch,
``sum(-log p(response tokens)) / (number of response tokens)``. Under a mapped axis each
device's share is rescaled by its token count relative to the device average, so the loss
and gradients equal those of the whole batch on one device whatever the split.

References:
  Ouyang et al. 2022, "Training language models to follow instructions with human feedback"
  (supervised fine-tuning on demonstrations).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import optax

from jaxrm.models.policy import token_logprobs
from jaxrm.steps import microbatch
from jaxrm.steps import train_state as train_state_lib
from jaxrm.steps.rm_step import _pmean

_KEYS = ("tokens", "mask", "response_mask")


def _check_batch(batch: Mapping[str, Any]) -> None:
  missing = [k for k in _KEYS if k not in batch]
  if missing:
    raise ValueError(f"SFT batch is missing keys {missing}; got keys {sorted(batch)}")
  shape = jnp.shape(batch["tokens"])
  if len(shape) != 2:
    raise ValueError(f"batch['tokens'] must have shape [batch, seq], got {shape}")
  for name in ("mask", "response_mask"):
    if jnp.shape(batch[name]) != shape:
      raise ValueError(
        f"batch['{name}'] must have the shape of batch['tokens'] {shape}, got "
        f"{jnp.shape(batch[name])}"
      )


def _logits(out: Any) -> jax.Array:
  return out[0] if isinstance(out, tuple) else out


def response_nll(
  logits: jax.typing.ArrayLike, tokens: jax.typing.ArrayLike, response_mask: jax.typing.ArrayLike
) -> tuple[jax.Array, jax.Array]:
  """Summed negative log-likelihood of the response tokens and their number.

  Args:
    logits: ``[batch, seq, vocab]``; ``logits[:, t]`` predicts ``tokens[:, t + 1]``.
    tokens: ``[batch, seq]`` int.
    response_mask: ``[batch, seq]`` bool, aligned with ``tokens``; entry 0 is ignored (no
      token predicts it).

  Returns:
    ``(nll_sum, count)`` float32 scalars; the SFT loss is ``nll_sum / count``.
  """
  logp = token_logprobs(logits, tokens)
  response_mask = jnp.asarray(response_mask).astype(bool)
  if response_mask.shape != logp.shape:
    raise ValueError(
      f"response_mask must have shape {logp.shape} to match tokens, got {response_mask.shape}"
    )
  mask = response_mask.at[:, 0].set(False)
  nll = -jnp.sum(jnp.where(mask, logp, 0.0))
  return nll, jnp.sum(mask).astype(jnp.float32)


def sft_loss(
  logits: jax.typing.ArrayLike, tokens: jax.typing.ArrayLike, response_mask: jax.typing.ArrayLike
) -> jax.Array:
  """Mean negative log-likelihood per response token (0 when there is none); see :func:`response_nll`."""
  nll, count = response_nll(logits, tokens, response_mask)
  return nll / jnp.maximum(count, 1.0)


def sft_step(
  state: train_state_lib.TrainState,
  batch: Mapping[str, jax.Array],
  *,
  apply_fn: Callable[..., Any],
  optimizer: optax.GradientTransformation,
  axis_name: Any = None,
  nonfinite: str = "skip",
  microbatch_size: int | None = None,
) -> tuple[train_state_lib.TrainState, dict[str, jax.Array]]:
  """One optimizer step of supervised fine-tuning on response tokens.

  Microbatches (``microbatch_size``): the forward and backward passes run over consecutive
  slices of ``microbatch_size`` sequences one after another and their gradients are summed
  (:func:`jaxrm.steps.microbatch.accumulate`); each slice's summed log-likelihood is divided
  by the whole batch's token count, so the sum is the whole batch's loss and gradient up to
  float rounding, with one slice's activations alive at a time (gradient accumulation).

  Args:
    state: the current :class:`jaxrm.steps.train_state.TrainState`.
    batch: SFT batch (see the module docstring).
    apply_fn: ``apply_fn(params, tokens [b, s], mask [b, s])`` returning ``logits
      [b, s, vocab]`` or a tuple whose first element is the logits (``PolicyModel.apply``).
    optimizer: optax gradient transformation matching ``state.opt_state``.
    axis_name: mapped axis to average over (``None`` under plain ``jit`` / FSDP).
    nonfinite: ``'skip'`` or ``'raise'``, see :func:`jaxrm.steps.train_state.apply_if_finite`.
    microbatch_size: sequences per microbatch on each device, dividing the (per-device)
      batch; ``None`` or at least the batch: the whole batch in one pass.

  Returns:
    ``(new_state, metrics)`` with scalar metrics over the global batch: ``loss`` (mean NLL
    per response token), ``perplexity`` (``exp(loss)``), ``num_tokens`` (response tokens),
    ``grad_norm``, ``nonfinite`` and ``num_skipped``.
  """
  _check_batch(batch)
  params = microbatch.mark_varying(state.params, axis_name)
  count_local = jnp.sum(jnp.asarray(batch["response_mask"])[:, 1:]).astype(jnp.float32)
  count_mean = _pmean(count_local, axis_name)  # global count / num devices
  denom = jnp.maximum(count_mean, 1e-9)

  def objective(p, part, share, _key):
    logits = _logits(apply_fn(p, part["tokens"], part["mask"]))
    nll, _ = response_nll(logits, part["tokens"], part["response_mask"])
    return nll * share / denom, ()

  grad_fn = jax.value_and_grad(objective, has_aux=True)
  k = microbatch.num_slices(microbatch_size, jnp.shape(batch["tokens"])[0], unit="sequences")
  batch = {n: batch[n] for n in _KEYS}
  if k == 1:
    (loss, _), grads = grad_fn(params, batch, 1.0, None)
  else:  # a slice's summed NLL over the whole batch's count: no share to apply
    ones = jnp.ones((k,), jnp.float32)
    loss, _, grads = microbatch.accumulate(
      grad_fn, params, microbatch.split(batch, k), ones, axis_name=axis_name
    )
  grads = _pmean(grads, axis_name)
  loss = _pmean(loss, axis_name)
  new_state, is_nonfinite = train_state_lib.apply_if_finite(
    state, grads, loss, optimizer, nonfinite=nonfinite, axis_name=axis_name
  )
  num_tokens = count_mean if axis_name is None else lax.psum(count_local, axis_name)
  metrics = {
    "loss": loss,
    "perplexity": jnp.exp(loss),
    "num_tokens": num_tokens,
    "grad_norm": optax.tree.norm(grads),
    "nonfinite": is_nonfinite,
    "num_skipped": new_state.num_skipped,
  }
  return new_state, metrics
