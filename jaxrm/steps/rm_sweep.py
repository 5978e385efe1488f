"""Train many small reward models at once: vmap over seeds, ``lax.scan`` over steps.

For studies of small reward models (the synthetic world, seed sweeps) the host loop, not the
arithmetic, dominates a step. Here the pairs live on the device, each seed draws its own
epoch-wise shuffles with ``jax.random.permutation``, and a whole chunk of steps of all seeds
runs in one compiled call of :func:`jaxrm.steps.rm_step.reward_model_step` under ``jax.vmap`` and
``lax.scan``. The host only logs between chunks. ``train(..., thread_groups=G)`` runs the seeds
as ``G`` such calls in ``G`` host threads, which XLA runs concurrently; ``train(...,
seed_batch=1)`` runs a call's seeds one after another (``lax.map``) instead of vmapped.

Example::

  sweep = RewardModelSweep(init_fn=lambda k: model.init(k, tokens[:1], mask[:1]),
                           apply_fn=model.apply, loss_fn=preference.bradley_terry_loss,
                           optimizer=optax.adamw(1e-3), batch_size=64)
  states = sweep.init(jax.random.split(jax.random.key(0), 3))       # 3 seeds
  states, metrics = sweep.train(states, pairs, num_steps=500)        # metrics [3, 500]
  # On a small CPU: 8 seeds as two threads, each looping over its 4 seeds' own steps.
  states8 = sweep.init(jax.random.split(jax.random.key(1), 8))
  states8, metrics8 = sweep.train(states8, pairs, num_steps=500, thread_groups=2, seed_batch=1)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import concurrent.futures
import dataclasses
import functools
import time
from typing import Any

from absl import logging
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrm.steps import rm_step
from jaxrm.steps import train_state as train_state_lib


@dataclasses.dataclass(frozen=True)
class RewardModelSweep:
  """Trains one reward model per seed on the same in-memory pairs, all seeds in one jit (or one
  per thread group).

  Attributes:
    init_fn: ``init_fn(key) -> params`` for one seed.
    apply_fn: ``apply_fn(params, tokens [b, s], mask [b, s]) -> rewards [b]``.
    loss_fn: pairwise loss ``(rewards_chosen, rewards_rejected, *, weights, labels) -> ()``.
    optimizer: optax transformation shared by all seeds.
    batch_size: pairs per step and seed.
    nonfinite: ``'skip'`` or ``'raise'``, see :func:`jaxrm.steps.train_state.apply_if_finite`.
    step_fn: the update, ``step_fn(state, batch, *, apply_fn, loss_fn, optimizer, nonfinite)
      -> (state, metrics)``; default :func:`jaxrm.steps.rm_step.reward_model_step` (scalar
      rewards). :func:`jaxrm.steps.rm_step.output_pair_step` trains models with ``[batch, ...]``
      outputs (distributional heads) on the same data order.
  """

  init_fn: Callable[[jax.Array], Any]
  apply_fn: Callable[..., jax.Array]
  loss_fn: Callable[..., jax.Array]
  optimizer: optax.GradientTransformation
  batch_size: int
  nonfinite: str = "skip"
  step_fn: Callable[..., Any] = rm_step.reward_model_step

  def init(self, keys: jax.Array) -> train_state_lib.TrainState:
    """Stacked train states ``[num_seeds, ...]``, one per key of ``keys [num_seeds]``."""
    if keys.ndim != 1:
      raise ValueError(
        f"keys must be a 1-D array of typed PRNG keys [num_seeds], got shape {keys.shape}"
      )
    return _init(self, keys)

  def train(
    self,
    states: train_state_lib.TrainState,
    pairs: Mapping[str, jax.Array],
    *,
    num_steps: int,
    chunk: int = 100,
    log_every_chunk: bool = True,
    thread_groups: int = 1,
    seed_batch: int | None = None,
  ):
    """Runs ``num_steps`` steps of every seed; each seed shuffles the pairs every epoch.

    Args:
      states: stacked states from :meth:`init` (or a previous :meth:`train`).
      pairs: preference arrays with leading axis ``num_pairs`` (see :mod:`jaxrm.steps.rm_step`).
      num_steps: steps to run (continuing from ``states.step``).
      chunk: steps per compiled call; the host logs progress between calls.
      log_every_chunk: log step, pairs/s and ETA after each chunk.
      thread_groups: splits the seeds into this many equal groups, each run by its own call
        in its own host thread, so that XLA runs the groups concurrently. On a CPU one small
        vmapped program uses about one core; the groups use more (BUILD_NOTES.md, "Issue 14,
        session 30"). Each seed's arithmetic is the same, but a program over fewer seeds may
        round differently from one over all of them.
      seed_batch: how many of a call's seeds are vmapped together. None: all of them (one
        batched step). ``k``: the call loops over its seeds ``k`` at a time (``lax.map``); 1
        runs each seed's own unbatched step. On a small CPU the batched layout adds work
        instead of saving it: one seed of the study's L1W16 proxy steps 1.02-1.36x as fast
        alone as vmapped over an axis of one, and 8 seeds in two thread groups 1.13-1.57x as
        fast with 1 (BUILD_NOTES.md, "Issue 14, session 47"). The same arithmetic per seed,
        up to rounding.

    Returns:
      ``(states, metrics)``; every metric has shape ``[num_seeds, num_steps]``.
    """
    num_pairs = _num_pairs(pairs)
    if num_pairs < self.batch_size:
      raise ValueError(f"need at least batch_size={self.batch_size} pairs, got {num_pairs}")
    if num_steps < 1 or chunk < 1:
      raise ValueError(f"num_steps and chunk must be >= 1, got {num_steps} and {chunk}")
    num_seeds = states.step.shape[0]
    if thread_groups < 1 or num_seeds % thread_groups:
      raise ValueError(
        f"thread_groups={thread_groups} must be >= 1 and divide the {num_seeds} seeds"
      )
    if seed_batch is not None:
      integer = isinstance(seed_batch, (int, np.integer)) and not isinstance(seed_batch, bool)
      if not integer or seed_batch < 1:
        raise ValueError(f"seed_batch={seed_batch!r} must be None or an int >= 1")
      seed_batch = int(seed_batch)
    pairs = {k: jnp.asarray(v) for k, v in pairs.items()}
    first_step = np.asarray(jax.device_get(states.step))  # states are donated to the chunks
    size = num_seeds // thread_groups
    groups = [states] if thread_groups == 1 else [
      jax.tree.map(lambda x, g=g: x[g * size : (g + 1) * size], states) for g in range(thread_groups)
    ]  # fmt: skip
    all_metrics = []
    done, start = 0, time.perf_counter()

    def run(group, n):  # each thread waits for its call, so that the calls run concurrently
      return jax.block_until_ready(_train_chunk(self, group, pairs, n, seed_batch))

    with concurrent.futures.ThreadPoolExecutor(thread_groups) as pool:
      while done < num_steps:
        n = min(chunk, num_steps - done)
        if thread_groups == 1:  # no wait: the host dispatches the next chunk at once
          results = [_train_chunk(self, groups[0], pairs, n, seed_batch)]
        else:
          results = list(pool.map(run, groups, [n] * thread_groups))
        groups = [r[0] for r in results]
        metrics = _concat_seeds([r[1] for r in results])
        if self.nonfinite == "raise":  # a refused update does not advance the step: stop here
          _raise_if_nonfinite(metrics, first_step=first_step, done=done)
        all_metrics.append(metrics)
        done += n
        if log_every_chunk:
          jax.block_until_ready(metrics)
          elapsed = time.perf_counter() - start
          rate = done * self.batch_size * num_seeds / elapsed
          shown = [f"{k} {float(metrics[k][:, -1].mean()):.4f}" for k in _SHOWN if k in metrics]
          logging.info(
            "rm sweep: step %d/%d  %s  %.0f pairs/s  ETA %.0fs",
            done,
            num_steps,
            "  ".join(shown),
            rate,
            elapsed / done * (num_steps - done),
          )
    metrics = {k: jnp.concatenate([m[k] for m in all_metrics], axis=1) for k in all_metrics[0]}
    return _concat_seeds(groups), metrics


def _raise_if_nonfinite(metrics: Mapping[str, Any], *, first_step: np.ndarray, done: int) -> None:
  """Raises ``FloatingPointError`` naming the first seed and step of a chunk whose update was
  non-finite (``metrics['nonfinite']`` is ``[num_seeds, chunk]``)."""
  flags = np.asarray(jax.device_get(metrics["nonfinite"]))
  if flags.any():
    seed, j = (int(i) for i in np.argwhere(flags)[0])
    step = int(first_step[seed]) + done + j
    raise FloatingPointError(
      f"seed {seed}: non-finite loss, gradient, update or new parameters at step {step} "
      "(nonfinite='raise'); the update was not applied"
    )


_SHOWN = ("loss", "accuracy")  # the metrics of the progress line (when the step returns them)


def _concat_seeds(trees: list[Any]) -> Any:
  """The seed axes of ``trees`` (stacked states or metrics) joined into one, in order."""
  return trees[0] if len(trees) == 1 else jax.tree.map(lambda *x: jnp.concatenate(x), *trees)


def _num_pairs(pairs: Mapping[str, Any]) -> int:
  sizes = {k: jnp.shape(v)[0] for k, v in pairs.items()}
  if len(set(sizes.values())) != 1:
    raise ValueError(f"all pair arrays must share the leading axis, got {sizes}")
  return next(iter(sizes.values()))


@functools.partial(jax.jit, static_argnums=0)
def _init(sweep: RewardModelSweep, keys: jax.Array):
  def one(key):
    k_init, k_state = jax.random.split(key)
    return train_state_lib.create_train_state(sweep.init_fn(k_init), sweep.optimizer, k_state)

  return jax.vmap(one)(keys)


def _chunk_permutations(
  key: jax.Array, start: jax.Array, num_steps: int, num_pairs: int, batch_size: int
):
  """The permutations of every epoch that steps ``start .. start + num_steps - 1`` touch.

  Drawn once per chunk instead of once per step (a permutation is a sort of ``num_pairs``
  keys, the largest cost of a small proxy's step). Epoch ``e`` is the permutation of
  ``fold_in(key, e)``; step ``t`` takes its slice ``t % steps_per_epoch`` of epoch
  ``t // steps_per_epoch`` (the remainder of an epoch is dropped).

  Returns:
    ``(perms [num_epochs, num_pairs], first_epoch)``, ``num_epochs`` static.
  """
  steps_per_epoch = num_pairs // batch_size
  num_epochs = (num_steps - 1) // steps_per_epoch + 2
  first_epoch = start // steps_per_epoch
  epochs = first_epoch + jnp.arange(num_epochs)
  perms = jax.vmap(lambda e: jax.random.permutation(jax.random.fold_in(key, e), num_pairs))(epochs)
  return perms, first_epoch


@functools.partial(jax.jit, static_argnums=(0, 3, 4), donate_argnums=1)
def _train_chunk(
  sweep: RewardModelSweep, states, pairs, num_steps: int, seed_batch: int | None = None
):
  num_pairs = _num_pairs(pairs)
  step_fn = functools.partial(
    sweep.step_fn,
    apply_fn=sweep.apply_fn,
    loss_fn=sweep.loss_fn,
    optimizer=sweep.optimizer,
    nonfinite=sweep.nonfinite,
  )

  def one_seed(state):
    data_key = jax.random.fold_in(state.key, 0x7FFFFFFF)  # not a step index
    steps_per_epoch = num_pairs // sweep.batch_size
    perms, first_epoch = _chunk_permutations(
      data_key, state.step, num_steps, num_pairs, sweep.batch_size
    )

    def body(state, _):
      epoch, pos = state.step // steps_per_epoch, state.step % steps_per_epoch
      perm = perms[epoch - first_epoch]
      idx = lax.dynamic_slice_in_dim(perm, pos * sweep.batch_size, sweep.batch_size)
      batch = {k: v[idx] for k, v in pairs.items()}
      return step_fn(state, batch)

    return lax.scan(body, state, None, length=num_steps)

  if seed_batch is None:
    return jax.vmap(one_seed)(states)
  # lax.map's batch_size=1 would vmap each seed over an axis of one; None loops unbatched.
  return lax.map(one_seed, states, batch_size=None if seed_batch == 1 else seed_batch)
