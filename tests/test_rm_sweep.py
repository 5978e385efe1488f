"""Tests of the vmapped, scanned reward-model sweep (jaxrm.steps.rm_sweep)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrm.math import preference
from jaxrm.steps import rm_step, rm_sweep, train_state


class _BagOfTokens(nn.Module):
  @nn.compact
  def __call__(self, tokens, mask):
    emb = nn.Embed(8, 4)(tokens) * mask[..., None]
    # No bias: it cancels in r_c - r_r, its gradient is rounding noise that Adam amplifies.
    return nn.Dense(1, use_bias=False)(emb.sum(1))[:, 0]


def _pairs(num=96, seq=5, seed=0):
  rng = np.random.default_rng(seed)
  chosen = rng.integers(0, 8, (num, seq)).astype(np.int32)
  rejected = rng.integers(0, 8, (num, seq)).astype(np.int32)
  mask = np.ones((num, seq), bool)
  return {"chosen": chosen, "chosen_mask": mask, "rejected": rejected, "rejected_mask": mask}


def _sweep():
  model = _BagOfTokens()
  pairs = _pairs()
  return rm_sweep.RewardModelSweep(
    init_fn=lambda k: model.init(k, pairs["chosen"][:1], pairs["chosen_mask"][:1]),
    apply_fn=model.apply,
    loss_fn=preference.bradley_terry_loss,
    optimizer=optax.adam(1e-2),
    batch_size=16,
  ), pairs


def test_sweep_equals_separate_runs_of_the_step():
  """Each seed of the vmapped scan equals a host loop of reward_model_step on its batches."""
  sweep, pairs = _sweep()
  keys = jax.random.split(jax.random.key(0), 3)
  states, metrics = sweep.train(sweep.init(keys), pairs, num_steps=13, chunk=5)
  step = jax.jit(
    functools.partial(
      rm_step.reward_model_step,
      apply_fn=sweep.apply_fn,
      loss_fn=sweep.loss_fn,
      optimizer=sweep.optimizer,
    )
  )
  for s, key in enumerate(keys):
    k_init, k_state = jax.random.split(key)
    state = train_state.create_train_state(sweep.init_fn(k_init), sweep.optimizer, k_state)
    data_key = jax.random.fold_in(state.key, 0x7FFFFFFF)
    losses = []
    for t in range(13):
      # Reference batch order: a fresh permutation per epoch (6 steps of 16 from 96 pairs).
      perm = np.asarray(jax.random.permutation(jax.random.fold_in(data_key, t // 6), 96))
      idx = perm[(t % 6) * 16 : (t % 6 + 1) * 16]
      state, m = step(state, {k: v[idx] for k, v in pairs.items()})
      losses.append(float(m["loss"]))
    np.testing.assert_allclose(metrics["loss"][s], losses, rtol=1e-5, atol=1e-6)
    for a, b in zip(
      jax.tree.leaves(state.params),
      jax.tree.leaves(jax.tree.map(lambda x, s=s: x[s], states.params)),
    ):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_thread_groups_train_each_seed_as_one_program_of_all_seeds_does():
  """Four seeds in two threads of two: the same seeds, order, metrics and parameters as one
  vmapped program (up to its rounding), over 13 steps in chunks of 5."""
  sweep, pairs = _sweep()
  keys = jax.random.split(jax.random.key(4), 4)
  one, m_one = sweep.train(sweep.init(keys), pairs, num_steps=13, chunk=5, log_every_chunk=False)
  two, m_two = sweep.train(sweep.init(keys), pairs, num_steps=13, chunk=5, thread_groups=2)
  assert m_two["loss"].shape == (4, 13)
  np.testing.assert_allclose(m_two["loss"], m_one["loss"], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(two.step, [13] * 4)
  np.testing.assert_array_equal(jax.random.key_data(two.key), jax.random.key_data(one.key))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               two.params, one.params)  # fmt: skip


def test_looped_seeds_train_each_seed_as_the_vmapped_program_does():
  """Seeds one after another (``seed_batch=1``), two at a time (three seeds: a batch of two,
  then a remainder of one) and in two threads of looped seeds: the same metrics, steps, keys
  and parameters as one vmapped program (up to its rounding), over 13 steps in chunks of 5."""
  sweep, pairs = _sweep()
  for seeds, batch, groups in ((3, 1, 1), (3, 2, 1), (4, 1, 2)):
    keys = jax.random.split(jax.random.key(seeds), seeds)
    want, m_want = sweep.train(sweep.init(keys), pairs, num_steps=13, chunk=5)
    got, m_got = sweep.train(
      sweep.init(keys), pairs, num_steps=13, chunk=5, seed_batch=batch, thread_groups=groups
    )
    assert m_got["loss"].shape == (seeds, 13)
    np.testing.assert_allclose(m_got["loss"], m_want["loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got.step, [13] * seeds)
    np.testing.assert_array_equal(jax.random.key_data(got.key), jax.random.key_data(want.key))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 got.params, want.params)  # fmt: skip


def test_seed_batch_loops_over_the_seeds_in_the_program():
  """``seed_batch`` reaches the compiled chunk: a loop over the seeds wraps the steps' loop
  (one ``while`` more than the vmapped program's); with a remainder (three seeds, two at a
  time) the remainder's vmapped steps are a second copy of the program's loops."""
  sweep, pairs = _sweep()
  pairs = {k: jnp.asarray(v) for k, v in pairs.items()}

  def whiles(seeds, seed_batch):
    states = sweep.init(jax.random.split(jax.random.key(0), seeds))
    text = rm_sweep._train_chunk.lower(sweep, states, pairs, 5, seed_batch).as_text()
    return text.count("stablehlo.while")

  vmapped = whiles(4, None)
  assert whiles(4, 1) == whiles(4, 2) == vmapped + 1
  assert whiles(3, 2) == 2 * vmapped + 1


def test_chunk_permutations_are_the_epochs_permutations():
  """A chunk of 13 steps from step 5 (6 steps per epoch) touches epochs 0..3; each row is the
  permutation of fold_in(key, epoch), a permutation of all pairs, and seeds differ."""
  key = jax.random.key(1)
  perms, first = rm_sweep._chunk_permutations(key, jnp.int32(5), 13, 96, 16)
  assert int(first) == 0 and perms.shape == (4, 96)
  for e in range(4):
    expected = jax.random.permutation(jax.random.fold_in(key, e), 96)
    np.testing.assert_array_equal(perms[e], expected)
    assert sorted(np.asarray(perms[e]).tolist()) == list(range(96))
  perms, first = rm_sweep._chunk_permutations(key, jnp.int32(13), 5, 96, 16)
  assert int(first) == 2 and perms.shape == (2, 96)
  np.testing.assert_array_equal(perms[0], jax.random.permutation(jax.random.fold_in(key, 2), 96))
  other, _ = rm_sweep._chunk_permutations(jax.random.key(2), jnp.int32(0), 6, 96, 16)
  assert not np.array_equal(perms[0], other[0])


def test_raise_mode_raises_naming_the_seed_and_step():
  sweep, pairs = _sweep()
  sweep = rm_sweep.RewardModelSweep(**{**sweep.__dict__, "nonfinite": "raise"})
  states = sweep.init(jax.random.split(jax.random.key(0), 2))
  weight = np.ones(len(pairs["chosen"]), np.float32)
  weight[5] = np.nan  # in some batch of every seed's first epoch
  with pytest.raises(FloatingPointError, match=r"seed \d: non-finite .* at step \d+ "):
    sweep.train(states, dict(pairs, weight=weight), num_steps=12, chunk=4, log_every_chunk=False)


def test_sweep_rejects_bad_arguments():
  sweep, pairs = _sweep()
  states = sweep.init(jax.random.split(jax.random.key(0), 2))
  with pytest.raises(ValueError, match="batch_size"):
    sweep.train(states, {k: v[:8] for k, v in pairs.items()}, num_steps=1)
  with pytest.raises(ValueError, match="leading axis"):
    sweep.train(states, dict(pairs, rejected=pairs["rejected"][:50]), num_steps=1)
  for groups in (0, 3):
    with pytest.raises(ValueError, match=f"thread_groups={groups} must be >= 1 and divide the 2"):
      sweep.train(states, pairs, num_steps=1, thread_groups=groups)
  for batch in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match=rf"seed_batch={batch!r} must be None or an int >= 1"):
      sweep.train(states, pairs, num_steps=1, seed_batch=batch)
  with pytest.raises(ValueError, match="keys"):
    sweep.init(jax.random.split(jax.random.key(0), 4).reshape(2, 2))
