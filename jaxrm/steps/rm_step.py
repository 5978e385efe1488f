"""Reward-model training and evaluation steps on preference pairs (model-agnostic).

``reward_model_step`` is a pure ``(state, batch) -> (state, metrics)`` function that scores the
chosen and rejected sequences with one call of a user ``apply_fn``, evaluates a preference loss
(e.g. Bradley–Terry), averages loss and gradients over ``axis_name`` with ``lax.pmean`` and
applies the optax update through :func:`jaxrm.steps.train_state.apply_if_finite`. The same body runs
under ``jax.jit`` (``axis_name=None``), ``jax.shard_map`` and ``jax.pmap``; see
:mod:`jaxrm.steps.parallel` for the launchers.

Preference batch (dict of arrays, leading axis = the local batch):
  ``'chosen'`` ``[batch, seq]`` int32, ``'chosen_mask'`` ``[batch, seq]`` bool,
  ``'rejected'`` ``[batch, seq]`` int32, ``'rejected_mask'`` ``[batch, seq]`` bool,
  optional ``'weight'`` ``[batch]`` float (per-example weight) and ``'label'`` ``[batch]`` float
  (soft label P(chosen > rejected)).

Or packed, one row per pair (:func:`jaxrm.data.packing.pack_pairs`: the common prefix once,
then both responses' own tokens): ``'packed'`` ``[batch, P]`` int32, ``'packed_mask'``
``[batch, P]`` bool and ``'packed_segments'`` ``[batch, P]`` int32, with the same optional
keys; ``apply_fn(params, tokens, mask, segments=...)`` then returns ``[batch, 2]`` rewards
(chosen, rejected), as :class:`jaxrm.models.reward_model.RewardModel` does.

References:
  Ouyang et al., 2022. Training language models to follow instructions with human
  feedback. https://arxiv.org/abs/2203.02155
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import optax

from jaxrm.steps import microbatch
from jaxrm.steps import train_state as train_state_lib

_REQUIRED_KEYS = ("chosen", "chosen_mask", "rejected", "rejected_mask")
PACKED_KEYS = ("packed", "packed_mask", "packed_segments")  # jaxrm.data.packing.pack_pairs


def _check_batch(batch: Mapping[str, Any]) -> int:
  """Checks ranks and shapes of a preference batch at trace time; returns the batch size."""
  if "packed" in batch:
    return _check_packed(batch)
  missing = [k for k in _REQUIRED_KEYS if k not in batch]
  if missing:
    raise ValueError(f"preference batch is missing keys {missing}; got keys {sorted(batch)}")
  for name in _REQUIRED_KEYS:
    if jnp.ndim(batch[name]) != 2:
      raise ValueError(
        f"batch['{name}'] must have shape [batch, seq], got {jnp.shape(batch[name])}"
      )
  for tokens, mask in (("chosen", "chosen_mask"), ("rejected", "rejected_mask")):
    if jnp.shape(batch[tokens]) != jnp.shape(batch[mask]):
      raise ValueError(
        f"batch['{tokens}'] and batch['{mask}'] must have the same shape, got "
        f"{jnp.shape(batch[tokens])} and {jnp.shape(batch[mask])}"
      )
  b = jnp.shape(batch["chosen"])[0]
  if jnp.shape(batch["rejected"])[0] != b:
    raise ValueError(
      "batch['chosen'] and batch['rejected'] must have the same batch size, got "
      f"{jnp.shape(batch['chosen'])} and {jnp.shape(batch['rejected'])}"
    )
  _check_per_pair(batch, b)
  return b


def _check_packed(batch: Mapping[str, Any]) -> int:
  shape = jnp.shape(batch["packed"])
  if len(shape) != 2:
    raise ValueError(f"batch['packed'] must have shape [batch, seq], got {shape}")
  for name in PACKED_KEYS:
    if name not in batch:
      raise ValueError(f"a packed batch needs {list(PACKED_KEYS)}; got keys {sorted(batch)}")
    if jnp.shape(batch[name]) != shape:
      raise ValueError(
        f"batch['{name}'] must have the shape of batch['packed'] {shape}, got "
        f"{jnp.shape(batch[name])}"
      )
  _check_per_pair(batch, shape[0])
  return shape[0]


def _check_per_pair(batch: Mapping[str, Any], b: int) -> None:
  for name in ("weight", "label"):
    if batch.get(name) is not None and jnp.shape(batch[name]) != (b,):
      raise ValueError(
        f"batch['{name}'] must have shape [batch] = ({b},), got {jnp.shape(batch[name])}"
      )


def _labels(batch: Mapping[str, Any]) -> jax.Array | None:
  """``batch['label']`` with 0.5 where ``batch['weight']`` is 0: a zero-weight example must not
  reach the update, but a NaN label there would (its zero cotangent times a NaN partial is
  NaN in the backward pass, and the whole update would be skipped)."""
  labels, weights = batch.get("label"), batch.get("weight")
  if labels is None or weights is None:
    return labels
  return jnp.where(jnp.asarray(weights) != 0, labels, 0.5)


def _score_pairs(
  apply_fn: Callable[..., jax.Array],
  params: Any,
  batch: Mapping[str, Any],
  key: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
  """Scores chosen and rejected sequences; one ``apply_fn`` call when the lengths agree."""
  b = _check_batch(batch)
  extra = {} if key is None else {"key": key}
  if "packed" in batch:
    rewards = apply_fn(
      params, batch["packed"], batch["packed_mask"], segments=batch["packed_segments"], **extra
    )
    if jnp.shape(rewards) != (b, 2):
      raise ValueError(
        f"apply_fn must return rewards of shape [batch, 2] = ({b}, 2) for a packed batch, got "
        f"{jnp.shape(rewards)}"
      )
    return rewards[:, 0], rewards[:, 1]
  if jnp.shape(batch["chosen"])[1] == jnp.shape(batch["rejected"])[1]:
    tokens = jnp.concatenate([batch["chosen"], batch["rejected"]], axis=0)
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=0)
    rewards = apply_fn(params, tokens, mask, **extra)
    if jnp.shape(rewards) != (2 * b,):
      raise ValueError(
        f"apply_fn must return rewards of shape [batch] = ({2 * b},), got {jnp.shape(rewards)}"
      )
    return rewards[:b], rewards[b:]
  if key is not None:
    key_c, key_r = jax.random.split(key)
    extra_c, extra_r = {"key": key_c}, {"key": key_r}
  else:
    extra_c = extra_r = {}
  rewards_c = apply_fn(params, batch["chosen"], batch["chosen_mask"], **extra_c)
  rewards_r = apply_fn(params, batch["rejected"], batch["rejected_mask"], **extra_r)
  for name, r in (("chosen", rewards_c), ("rejected", rewards_r)):
    if jnp.shape(r) != (b,):
      raise ValueError(
        f"apply_fn must return rewards of shape [batch] = ({b},) for the {name} "
        f"sequences, got {jnp.shape(r)}"
      )
  return rewards_c, rewards_r


def _pmean(x: Any, axis_name: Any) -> Any:
  return x if axis_name is None else lax.pmean(x, axis_name)


def preference_accuracy(
  rewards_chosen: jax.typing.ArrayLike,
  rewards_rejected: jax.typing.ArrayLike,
) -> jax.Array:
  """Fraction of pairs with ``r_chosen > r_rejected``, ties counting one half.

  Args:
    rewards_chosen: ``[batch]`` rewards of the chosen sequences.
    rewards_rejected: ``[batch]`` rewards of the rejected sequences.

  Returns:
    Scalar accuracy in [0, 1] (float32).
  """
  rc = jnp.asarray(rewards_chosen, jnp.float32)
  rr = jnp.asarray(rewards_rejected, jnp.float32)
  if rc.ndim != 1 or rc.shape != rr.shape:
    raise ValueError(
      "rewards_chosen and rewards_rejected must both have shape [batch], got "
      f"{rc.shape} and {rr.shape}"
    )
  return jnp.mean((rc > rr).astype(jnp.float32) + 0.5 * (rc == rr).astype(jnp.float32))


def reward_model_step(
  state: train_state_lib.TrainState,
  batch: Mapping[str, jax.Array],
  *,
  apply_fn: Callable[..., jax.Array],
  loss_fn: Callable[..., jax.Array],
  optimizer: optax.GradientTransformation,
  axis_name: Any = None,
  nonfinite: str = "skip",
  weights_normalized: bool = True,
  apply_takes_key: bool = False,
  microbatch_size: int | None = None,
) -> tuple[train_state_lib.TrainState, dict[str, jax.Array]]:
  """One optimizer step of a reward model on a batch of preference pairs.

  The chosen and rejected sequences are scored in one ``apply_fn`` call on the concatenated
  ``[2 * batch, seq]`` tokens (two calls if their lengths differ). The loss and gradients are
  averaged over ``axis_name`` with ``lax.pmean``; the parameters are first marked
  device-varying (``lax.pcast``), so the gradients are per-device and the average is correct
  under ``pmap`` and under ``shard_map`` with or without ``check_vma``.

  Equivalence across modes: every device must hold the same number of pairs, and ``loss_fn``
  must be a (weighted) mean over the batch. With ``weights_normalized=True`` (the convention
  of :mod:`jaxrm.math.preference`) it is ``sum(w * l) / sum(w)``: each device's loss is then
  rescaled by ``sum(w_device) / pmean(sum(w_device))`` before averaging, so that loss and
  gradients equal those of the global batch on one device. With ``weights_normalized=False``
  it is ``mean(w * l)`` and plain averaging is exact. Without ``'weight'`` both are the same.

  Microbatches (``microbatch_size``): the forward and backward passes run over consecutive
  slices of ``microbatch_size`` pairs one after another (``lax.scan``), and their gradients
  are summed, each slice's loss weighted exactly as a device's is (by its share of the weight
  with ``weights_normalized``, else of the pairs): the same update as the whole batch (up to
  float rounding in the order of the sums), under the same condition on ``loss_fn``, with the
  activations of one slice alive at a time. That is gradient accumulation for a model whose
  batch does not fit in memory, and on a CPU a step whose activations can stay in cache (the
  README HH step 1.13x as fast in slices of 4 pairs, BUILD_NOTES.md, session 54).

  Randomness: the step key is ``jax.random.fold_in(state.key, state.step)``
  (:func:`jaxrm.steps.train_state.step_key`), folded with ``lax.axis_index(axis_name)`` under a
  mapped axis so devices draw different dropout masks. It is passed to ``apply_fn`` as
  ``key=`` only when ``apply_takes_key=True`` (deterministic models need nothing); each
  microbatch gets ``fold_in(key, i)``, so dropout masks differ from the whole batch's.

  Args:
    state: the current :class:`jaxrm.steps.train_state.TrainState`.
    batch: preference batch (see the module docstring); ``'weight'`` and ``'label'`` are
      optional and forwarded to ``loss_fn`` as ``weights=`` and ``labels=``.
    apply_fn: ``apply_fn(params, tokens [b, s] int32, mask [b, s] bool) -> rewards [b]``
      (plus ``key=`` if ``apply_takes_key``).
    loss_fn: ``loss_fn(rewards_chosen [b], rewards_rejected [b], *, weights=None,
      labels=None) -> scalar``, e.g. the Bradley–Terry loss ``-mean(log sigmoid(rc - rr))``.
    optimizer: optax gradient transformation matching ``state.opt_state``.
    axis_name: mapped axis to average over (``None`` under plain ``jit``).
    nonfinite: ``'skip'`` or ``'raise'``, see :func:`jaxrm.steps.train_state.apply_if_finite`.
    weights_normalized: whether ``loss_fn`` divides by ``sum(weights)`` (True) or by the
      batch size (False); only matters with ``'weight'`` in the batch and a mapped axis.
    apply_takes_key: pass the step key to ``apply_fn`` as ``key=``.
    microbatch_size: pairs per microbatch on each device, dividing the (per-device) batch;
      ``None`` or at least the batch: the whole batch in one pass.

  Returns:
    ``(new_state, metrics)`` where metrics are scalars averaged over devices:
    ``loss``; ``accuracy`` (fraction of pairs with ``r_chosen > r_rejected``, ties half);
    ``margin`` (mean ``r_chosen - r_rejected``); ``grad_norm`` (global L2 norm of the
    averaged gradient); ``nonfinite`` (bool, the update was not applied); ``num_skipped``
    (int32, after this step).
  """
  key = None
  if apply_takes_key:
    key = train_state_lib.step_key(state)
    if axis_name is not None:
      key = jax.random.fold_in(key, lax.axis_index(axis_name))

  params = microbatch.mark_varying(state.params, axis_name)
  weights = batch.get("weight")
  loss_scale = jnp.float32(1.0)
  if axis_name is not None and weights is not None and weights_normalized:
    # This device's share of the global weight, relative to an equal share.
    w_local = jnp.sum(jnp.asarray(weights, jnp.float32))
    w_mean = lax.pmean(w_local, axis_name)
    positive = w_mean > 0
    loss_scale = jnp.where(positive, w_local / jnp.where(positive, w_mean, 1.0), 0.0)

  def objective(p, part, scale, part_key):
    rewards_c, rewards_r = _score_pairs(apply_fn, p, part, part_key)
    loss = loss_fn(rewards_c, rewards_r, weights=part.get("weight"), labels=_labels(part))
    if jnp.shape(loss) != ():
      raise ValueError(f"loss_fn must return a scalar, got shape {jnp.shape(loss)}")
    return loss * scale, (rewards_c, rewards_r)

  grad_fn = jax.value_and_grad(objective, has_aux=True)
  b = _check_batch(batch)
  k = microbatch.num_slices(microbatch_size, b, unit="pairs")
  if k == 1:
    (loss, (rewards_c, rewards_r)), grads = grad_fn(params, batch, loss_scale, key)
  else:
    parts = microbatch.split(dict(batch), k)
    if weights is not None and weights_normalized:
      # Each slice's weighted mean counts by its share of the weight, as a device's does.
      part_weight = jnp.sum(jnp.asarray(parts["weight"], jnp.float32), axis=1)
      total = jnp.sum(part_weight)
      shares = part_weight / jnp.where(total > 0, total, 1.0)
    else:
      shares = jnp.full((k,), 1.0 / k, jnp.float32)
    loss, (rewards_c, rewards_r), grads = microbatch.accumulate(
      grad_fn,
      params,
      parts,
      shares * loss_scale,
      microbatch.slice_keys(key, k),
      axis_name=axis_name,
    )
    rewards_c, rewards_r = microbatch.join((rewards_c, rewards_r))
  grads = _pmean(grads, axis_name)
  loss = _pmean(loss, axis_name)
  new_state, is_nonfinite = train_state_lib.apply_if_finite(
    state, grads, loss, optimizer, nonfinite=nonfinite, axis_name=axis_name
  )
  metrics = {
    "loss": loss,
    "accuracy": _pmean(preference_accuracy(rewards_c, rewards_r), axis_name),
    "margin": _pmean(jnp.mean(rewards_c - rewards_r), axis_name),
    "grad_norm": optax.tree.norm(grads),
    "nonfinite": is_nonfinite,
    "num_skipped": new_state.num_skipped,
  }
  return new_state, metrics


def reward_model_eval_step(
  params: Any,
  batch: Mapping[str, jax.Array],
  *,
  apply_fn: Callable[..., jax.Array],
  axis_name: Any = None,
) -> dict[str, jax.Array]:
  """Scores a batch of preference pairs for evaluation (no gradients, no state change).

  Args:
    params: reward-model parameters.
    batch: preference batch (only the token and mask keys are used).
    apply_fn: ``apply_fn(params, tokens [b, s], mask [b, s]) -> rewards [b]``.
    axis_name: mapped axis; when given, the per-device rewards are gathered with
      ``lax.all_gather(..., tiled=True, to='invarying')``, so every device returns the
      global batch in device order (the order of the batch split by
      ``ParallelStep.shard_batch``).

  Returns:
    dict with ``'rewards_chosen'`` and ``'rewards_rejected'``, each ``[global_batch]``
    float32.
  """
  rewards_c, rewards_r = _score_pairs(apply_fn, params, batch, None)
  out = {
    "rewards_chosen": rewards_c.astype(jnp.float32),
    "rewards_rejected": rewards_r.astype(jnp.float32),
  }
  if axis_name is not None:
    out = jax.tree.map(lambda x: lax.all_gather(x, axis_name, tiled=True, to="invarying"), out)
  return out


def output_pair_step(
  state: train_state_lib.TrainState,
  batch: Mapping[str, jax.Array],
  *,
  apply_fn: Callable[..., Any],
  loss_fn: Callable[..., jax.Array],
  optimizer: optax.GradientTransformation,
  nonfinite: str = "skip",
) -> tuple[train_state_lib.TrainState, dict[str, jax.Array]]:
  """One update of a model with ``[batch, ...]`` outputs on a batch of preference pairs.

  :func:`reward_model_step` for models that return more than a scalar per sequence, e.g. a
  distributional head's ``(mean, std)`` ``[b, 2]`` or logits ``[b, K]``
  (:mod:`jaxrm.models.distributional_rm`): the loss sees both sides' outputs. Chosen and
  rejected are scored in one ``apply_fn`` call on the concatenated ``[2 * batch, seq]``
  tokens (their lengths must agree); single device (no mapped axis). With a scalar model and
  a pairwise loss it is :func:`reward_model_step`'s update.

  Args:
    state: the current train state.
    batch: preference batch (module docstring); ``'weight'`` and ``'label'`` are forwarded to
      ``loss_fn`` as ``weights=`` and ``labels=``.
    apply_fn: ``apply_fn(params, tokens [b, s], mask [b, s]) -> outputs [b, ...]``.
    loss_fn: ``loss_fn(outputs_chosen [b, ...], outputs_rejected [b, ...], *, weights=None,
      labels=None) -> scalar``.
    optimizer: optax gradient transformation matching ``state.opt_state``.
    nonfinite: ``'skip'`` or ``'raise'`` (:func:`jaxrm.steps.train_state.apply_if_finite`).

  Returns:
    ``(new_state, metrics)``: ``loss``, ``grad_norm``, ``nonfinite``, ``num_skipped``.

  Raises:
    ValueError: a malformed batch, chosen and rejected of different lengths, outputs whose
      leading axis is not ``2 * batch``, or a non-scalar loss (at trace time).
  """
  b = _check_batch(batch)
  if jnp.shape(batch["chosen"])[1] != jnp.shape(batch["rejected"])[1]:
    raise ValueError(
      f"chosen and rejected must have the same length, got {jnp.shape(batch['chosen'])} "
      f"and {jnp.shape(batch['rejected'])}"
    )
  tokens = jnp.concatenate([batch["chosen"], batch["rejected"]])
  mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])

  def objective(params):
    out = apply_fn(params, tokens, mask)
    if jnp.shape(out)[:1] != (2 * b,):
      raise ValueError(
        f"apply_fn must return outputs [2 * batch, ...] = ({2 * b}, ...), got {jnp.shape(out)}"
      )
    loss = loss_fn(out[:b], out[b:], weights=batch.get("weight"), labels=_labels(batch))
    if jnp.shape(loss) != ():
      raise ValueError(f"loss_fn must return a scalar, got shape {jnp.shape(loss)}")
    return loss

  loss, grads = jax.value_and_grad(objective)(state.params)
  new_state, is_nonfinite = train_state_lib.apply_if_finite(
    state, grads, loss, optimizer, nonfinite=nonfinite
  )
  metrics = {
    "loss": loss,
    "grad_norm": optax.tree.norm(grads),
    "nonfinite": is_nonfinite,
    "num_skipped": new_state.num_skipped,
  }
  return new_state, metrics
