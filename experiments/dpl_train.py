"""Seed sweeps of reward models with vector outputs (distributional heads) for the DPL study.

:class:`jaxrm.steps.rm_sweep.RewardModelSweep` trains scalar reward models: its step
(:func:`jaxrm.steps.rm_step.reward_model_step`) requires ``apply_fn`` to return rewards
``[batch]``. A distributional model returns ``[batch, 2]`` (mean, std) or ``[batch, K]``
logits, so :class:`OutputSweep` keeps RewardModelSweep's initialisation (inherited), its data
order (the same per-seed epoch permutations, ``rm_sweep._chunk_permutations`` of the same
data key) and its non-finite-safe update (:func:`jaxrm.steps.train_state.apply_if_finite`),
and replaces only the step: the loss takes the two sides' outputs, whatever their trailing
shape. With a scalar model and the Bradley–Terry loss it is RewardModelSweep step for step
(``tests/test_dpl.py`` checks it).
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import functools
import time

from absl import logging
import jax
from jax import lax
import jax.numpy as jnp

from jaxrm.steps import rm_sweep
from jaxrm.steps import train_state as train_state_lib


@dataclasses.dataclass(frozen=True)
class OutputSweep(rm_sweep.RewardModelSweep):
  """A :class:`RewardModelSweep` whose ``apply_fn`` returns ``[batch, ...]`` outputs.

  ``loss_fn(outputs_chosen, outputs_rejected, *, weights, labels) -> ()`` (e.g.
  :meth:`jaxrm.models.distributional_rm.Head.loss_fn`). ``init`` is RewardModelSweep's.
  """

  def train(
    self,
    states: train_state_lib.TrainState,
    pairs: Mapping[str, jax.Array],
    *,
    num_steps: int,
    chunk: int = 100,
    log_every_chunk: bool = True,
  ):
    """Runs ``num_steps`` steps of every seed (see :meth:`RewardModelSweep.train`).

    Returns:
      ``(states, metrics)``; ``loss`` and ``nonfinite`` have shape ``[num_seeds, num_steps]``.
    """
    num_pairs = rm_sweep._num_pairs(pairs)
    if num_pairs < self.batch_size:
      raise ValueError(f"need at least batch_size={self.batch_size} pairs, got {num_pairs}")
    if num_steps < 1 or chunk < 1:
      raise ValueError(f"num_steps and chunk must be >= 1, got {num_steps} and {chunk}")
    pairs = {k: jnp.asarray(v) for k, v in pairs.items()}
    all_metrics, done, start = [], 0, time.perf_counter()
    while done < num_steps:
      n = min(chunk, num_steps - done)
      states, metrics = _train_chunk(self, states, pairs, n)
      all_metrics.append(metrics)
      done += n
      if log_every_chunk:
        jax.block_until_ready(metrics)
        elapsed = time.perf_counter() - start
        logging.info(
          "output sweep: step %d/%d  loss %.4f  %.0f pairs/s  ETA %.0fs",
          done,
          num_steps,
          float(metrics["loss"][:, -1].mean()),
          done * self.batch_size * states.step.shape[0] / elapsed,
          elapsed / done * (num_steps - done),
        )
    return states, {k: jnp.concatenate([m[k] for m in all_metrics], axis=1) for k in all_metrics[0]}


def output_step(state, batch, *, apply_fn, loss_fn, optimizer, nonfinite="skip"):
  """One update on a preference batch; the loss sees the outputs of both sides."""
  b = batch["chosen"].shape[0]
  tokens = jnp.concatenate([batch["chosen"], batch["rejected"]])
  mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])

  def objective(params):
    out = apply_fn(params, tokens, mask)
    return loss_fn(out[:b], out[b:], weights=batch.get("weight"), labels=batch.get("label"))

  loss, grads = jax.value_and_grad(objective)(state.params)
  state, is_nonfinite = train_state_lib.apply_if_finite(
    state, grads, loss, optimizer, nonfinite=nonfinite
  )
  return state, {"loss": loss, "nonfinite": is_nonfinite}


@functools.partial(jax.jit, static_argnums=(0, 3), donate_argnums=1)
def _train_chunk(sweep: OutputSweep, states, pairs, num_steps: int):
  num_pairs = rm_sweep._num_pairs(pairs)
  step_fn = functools.partial(
    output_step,
    apply_fn=sweep.apply_fn,
    loss_fn=sweep.loss_fn,
    optimizer=sweep.optimizer,
    nonfinite=sweep.nonfinite,
  )

  def one_seed(state):
    data_key = jax.random.fold_in(state.key, 0x7FFFFFFF)  # RewardModelSweep's data key
    steps_per_epoch = num_pairs // sweep.batch_size
    perms, first_epoch = rm_sweep._chunk_permutations(
      data_key, state.step, num_steps, num_pairs, sweep.batch_size
    )

    def body(state, _):
      epoch, pos = state.step // steps_per_epoch, state.step % steps_per_epoch
      idx = lax.dynamic_slice_in_dim(
        perms[epoch - first_epoch], pos * sweep.batch_size, sweep.batch_size
      )
      return step_fn(state, {k: v[idx] for k, v in pairs.items()})

    return lax.scan(body, state, None, length=num_steps)

  return jax.vmap(one_seed)(states)
