"""Tests for jaxrm.steps.rm_step and jaxrm.steps.train_state (single device, under jax.jit)."""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from model_helpers import bt_loss
import numpy as np
import optax
import pytest

from jaxrm.math import preference
from jaxrm.steps import rm_step
from jaxrm.steps import train_state as ts

# The reward model's step, model and losses at XLA's default level, as users run them.
pytestmark = pytest.mark.usefixtures("xla_optimized")  # tests/conftest.py

VOCAB, WIDTH, BATCH, SEQ = 11, 4, 6, 5


def init_params(key):
  k1, k2 = jax.random.split(key)
  return {
    "embed": jax.random.normal(k1, (VOCAB, WIDTH)),
    "w": jax.random.normal(k2, (WIDTH,)),
    "b": jnp.zeros(()),
  }


def apply_fn(params, tokens, mask):
  """Masked mean of token embeddings followed by a linear head: [b, s] -> [b]."""
  emb = params["embed"][tokens]
  m = mask.astype(emb.dtype)[..., None]
  pooled = jnp.sum(emb * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
  return pooled @ params["w"] + params["b"]


def make_batch(seed, b=BATCH, s=SEQ, with_weight=True, with_label=True):
  rng = np.random.default_rng(seed)
  batch = {}
  for name in ("chosen", "rejected"):
    lengths = rng.integers(1, s + 1, size=b)
    mask = np.arange(s)[None, :] < lengths[:, None]
    batch[name] = np.where(mask, rng.integers(3, VOCAB, size=(b, s)), 0).astype(np.int32)
    batch[name + "_mask"] = mask
  if with_weight:
    batch["weight"] = rng.uniform(0.5, 1.5, size=b).astype(np.float32)
  if with_label:
    batch["label"] = rng.uniform(0.0, 1.0, size=b).astype(np.float32)
  return batch


def np_rewards(params, tokens, mask):
  emb = np.asarray(params["embed"], np.float64)[tokens]
  m = mask.astype(np.float64)
  pooled = (emb * m[..., None]).sum(1) / np.maximum(m.sum(1), 1.0)[:, None]
  return pooled, pooled @ np.asarray(params["w"], np.float64) + float(params["b"])


def np_loss_and_grads(params, batch):
  """Float64 NumPy loss and analytic gradients of the Bradley–Terry loss."""
  pc, rc = np_rewards(params, batch["chosen"], batch["chosen_mask"])
  pr, rr = np_rewards(params, batch["rejected"], batch["rejected_mask"])
  d = rc - rr
  y, w = batch["label"].astype(np.float64), batch["weight"].astype(np.float64)
  log_sig = lambda x: -np.logaddexp(0.0, -x)
  loss = -np.sum(w * (y * log_sig(d) + (1 - y) * log_sig(-d))) / np.sum(w)
  sig = 1.0 / (1.0 + np.exp(-d))
  dl_dd = -w * (y - sig) / np.sum(w)  # d loss / d d_i
  g_w = ((pc - pr) * dl_dd[:, None]).sum(0)
  g_embed = np.zeros((VOCAB, WIDTH))
  wv = np.asarray(params["w"], np.float64)
  for tokens, mask, sign in (
    (batch["chosen"], batch["chosen_mask"], 1.0),
    (batch["rejected"], batch["rejected_mask"], -1.0),
  ):
    m = mask.astype(np.float64)
    coef = sign * dl_dd[:, None] * m / np.maximum(m.sum(1), 1.0)[:, None]  # [b, s]
    np.add.at(g_embed, tokens, coef[..., None] * wv)
  return loss, {"embed": g_embed, "w": g_w, "b": 0.0}, rc, rr


def host(tree):
  """Copies a pytree to NumPy (typed PRNG keys as their key data)."""

  def leaf(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(x)

  return jax.tree.map(leaf, tree)


def make_step(optimizer, **kw):
  kw = {"apply_fn": apply_fn, "loss_fn": bt_loss, **kw}
  return jax.jit(functools.partial(rm_step.reward_model_step, optimizer=optimizer, **kw))


@pytest.mark.parametrize("microbatch_size", [None, 1, 2, 3])
def test_sgd_step_matches_numpy_float64_reference(microbatch_size):
  # In microbatches: the whole batch's weighted loss and gradient, from slices of unequal weight.
  lr = 0.1
  params = init_params(jax.random.key(0))
  state = ts.create_train_state(params, optax.sgd(lr), jax.random.key(1))
  batch = make_batch(0)
  new_state, metrics = make_step(optax.sgd(lr), microbatch_size=microbatch_size)(state, batch)
  loss, grads, rc, rr = np_loss_and_grads(params, batch)
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["margin"], np.mean(rc - rr), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["accuracy"], np.mean(rc > rr), rtol=1e-6)
  gnorm = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads)))
  np.testing.assert_allclose(metrics["grad_norm"], gnorm, rtol=1e-5)
  for name in params:
    np.testing.assert_allclose(
      new_state.params[name],
      np.asarray(params[name], np.float64) - lr * grads[name],
      rtol=1e-5,
      atol=1e-6,
    )
  assert int(new_state.step) == 1 and int(new_state.num_skipped) == 0
  assert not bool(metrics["nonfinite"])


def test_microbatches_whose_weights_are_all_zero_add_nothing():
  optimizer = optax.sgd(1.0)
  params = init_params(jax.random.key(0))
  state = ts.create_train_state(params, optimizer, jax.random.key(1))
  batch = make_batch(2)
  batch["weight"][:2] = 0.0  # the first slice of two pairs
  batch["label"][0] = np.nan  # masked by its zero weight
  loss_fn = preference.bradley_terry_loss  # 0, with zero gradients, for all-zero weights
  step = functools.partial(
    rm_step.reward_model_step, apply_fn=apply_fn, loss_fn=loss_fn, optimizer=optimizer
  )
  whole_state, whole = jax.jit(step)(state, batch)
  sliced_state, sliced = jax.jit(functools.partial(step, microbatch_size=2))(state, batch)
  for name in ("loss", "accuracy", "margin", "grad_norm"):
    np.testing.assert_allclose(sliced[name], whole[name], rtol=1e-5, err_msg=name)
  assert not bool(sliced["nonfinite"]) and float(whole["loss"]) > 0
  for name in params:
    np.testing.assert_allclose(sliced_state.params[name], whole_state.params[name], atol=1e-6)


@pytest.mark.parametrize("size", [4, 0, -2, 2.0, True])
def test_microbatch_size_that_does_not_divide_the_batch_is_refused(size):
  optimizer = optax.sgd(0.1)
  state = ts.create_train_state(init_params(jax.random.key(0)), optimizer, jax.random.key(0))
  with pytest.raises(
    ValueError, match="microbatch_size must be a positive int dividing the batch of 6 pairs"
  ):
    make_step(optimizer, microbatch_size=size)(state, make_batch(0))


@pytest.mark.parametrize("size", [BATCH, 4 * BATCH])
def test_microbatch_size_of_at_least_the_batch_is_the_whole_batch(size):
  optimizer = optax.sgd(0.1)
  state = ts.create_train_state(init_params(jax.random.key(0)), optimizer, jax.random.key(0))
  step = make_step(optimizer, microbatch_size=size)
  want = jax.make_jaxpr(make_step(optimizer))(state, make_batch(0))
  assert str(jax.make_jaxpr(step)(state, make_batch(0))) == str(want)


def test_chosen_and_rejected_of_different_lengths_give_same_result_as_padded():
  params = init_params(jax.random.key(0))
  optimizer = optax.sgd(0.1)
  batch = make_batch(1)
  padded = dict(batch)
  padded["rejected"] = np.pad(batch["rejected"], ((0, 0), (0, 3)))
  padded["rejected_mask"] = np.pad(batch["rejected_mask"], ((0, 0), (0, 3)))
  step = make_step(optimizer)
  s1, m1 = step(ts.create_train_state(params, optimizer, jax.random.key(1)), batch)
  s2, m2 = step(ts.create_train_state(params, optimizer, jax.random.key(1)), padded)
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), s1.params, s2.params
  )


def test_preference_accuracy_counts_ties_as_half():
  rc = np.array([1.0, 2.0, 0.5, 3.0, -1.0], np.float32)
  rr = np.array([0.0, 2.0, 0.7, 3.0, -2.0], np.float32)
  expected = np.mean(np.where(rc > rr, 1.0, np.where(rc == rr, 0.5, 0.0)))
  np.testing.assert_allclose(jax.jit(rm_step.preference_accuracy)(rc, rr), expected)
  assert expected == pytest.approx(0.6)


@pytest.mark.parametrize("label", [np.nan, 2.0, -np.inf])
def test_a_bad_label_on_a_zero_weight_row_does_not_stop_the_update(label):
  # the row contributes nothing, so the update is the one with any valid label there
  params = init_params(jax.random.key(0))
  step = make_step(optax.sgd(0.1))
  clean = make_batch(2)
  clean["weight"][2] = 0.0
  bad = {k: v.copy() for k, v in clean.items()}
  bad["label"][2] = label
  s_clean, _ = step(ts.create_train_state(params, optax.sgd(0.1), jax.random.key(1)), clean)
  s_bad, m = step(ts.create_train_state(params, optax.sgd(0.1), jax.random.key(1)), bad)
  assert not bool(m["nonfinite"]) and int(s_bad.num_skipped) == 0
  jax.tree.map(np.testing.assert_array_equal, host(s_bad.params), host(s_clean.params))


def test_nan_weight_skips_update_and_increments_num_skipped():
  optimizer = optax.adamw(1e-2)
  params = init_params(jax.random.key(0))
  state = ts.create_train_state(params, optimizer, jax.random.key(1))
  step = make_step(optimizer, nonfinite="skip")
  state, _ = step(state, make_batch(0))  # one good step, so opt_state is non-trivial
  before = host(state)
  bad = make_batch(1)
  bad["weight"][2] = np.nan
  state, metrics = step(state, bad)
  assert bool(metrics["nonfinite"]) and np.isnan(metrics["loss"])
  assert int(state.num_skipped) == 1 and int(metrics["num_skipped"]) == 1
  assert int(state.step) == 2
  jax.tree.map(np.testing.assert_array_equal, state.params, before.params)
  jax.tree.map(np.testing.assert_array_equal, state.opt_state, before.opt_state)
  state, metrics = step(state, make_batch(2))  # training continues after the skip
  assert not bool(metrics["nonfinite"]) and int(state.step) == 3
  assert int(state.num_skipped) == 1
  assert not np.array_equal(state.params["w"], before.params["w"])


def test_inf_inputs_skip_update():
  optimizer = optax.sgd(0.1)
  params = init_params(jax.random.key(0))
  params["embed"] = params["embed"].at[4].set(jnp.inf)
  state = ts.create_train_state(params, optimizer, jax.random.key(1))
  batch = make_batch(0)
  batch["chosen"][0, 0] = 4
  batch["chosen_mask"][0, 0] = True
  new_state, metrics = make_step(optimizer)(state, batch)
  assert bool(metrics["nonfinite"]) and int(new_state.num_skipped) == 1
  jax.tree.map(np.testing.assert_array_equal, new_state.params, params)


def test_raise_mode_returns_input_state_sets_flag_and_host_check_names_step():
  optimizer = optax.adamw(1e-2)
  state = ts.create_train_state(init_params(jax.random.key(0)), optimizer, jax.random.key(1))
  step = make_step(optimizer, nonfinite="raise")
  state, metrics = step(state, make_batch(0))
  ts.raise_if_nonfinite(metrics, step=0)  # finite: no error
  before = host(state)
  bad = make_batch(1)
  bad["weight"][0] = np.nan
  new_state, metrics = step(state, bad)
  assert bool(metrics["nonfinite"])
  jax.tree.map(np.testing.assert_array_equal, host(new_state), before)  # step, num_skipped too
  with pytest.raises(FloatingPointError, match="at step 1"):
    ts.raise_if_nonfinite(metrics, step=new_state.step)


def test_apply_if_finite_is_generic_over_state_types():
  class PolicyState(NamedTuple):  # another step's state, with an extra field
    step: jax.Array
    params: dict
    opt_state: tuple
    num_skipped: jax.Array
    kl_coef: jax.Array

  optimizer = optax.sgd(1.0)
  params = {"x": jnp.array([1.0, 2.0])}
  state = PolicyState(jnp.int32(0), params, optimizer.init(params), jnp.int32(0), jnp.float32(0.5))
  fn = jax.jit(functools.partial(ts.apply_if_finite, optimizer=optimizer))
  new, flag = fn(state, {"x": jnp.array([0.5, 0.5])}, jnp.float32(1.0))
  np.testing.assert_allclose(new.params["x"], [0.5, 1.5])
  assert not bool(flag) and int(new.step) == 1 and float(new.kl_coef) == 0.5
  new, flag = fn(new, {"x": jnp.array([jnp.inf, 0.5])}, jnp.float32(1.0))
  np.testing.assert_allclose(new.params["x"], [0.5, 1.5])
  assert bool(flag) and int(new.num_skipped) == 1 and int(new.step) == 2
  with pytest.raises(ValueError, match="nonfinite must be one of"):
    ts.apply_if_finite(state, params, 1.0, optimizer, nonfinite="ignore")
  with pytest.raises(ValueError, match="loss must be a scalar"):
    ts.apply_if_finite(state, params, jnp.ones(2), optimizer)


def noisy_apply(params, tokens, mask, *, key):
  return apply_fn(params, tokens, mask) + jax.random.normal(key, (tokens.shape[0],))


def noisy_step(optimizer, **kw):
  """The step of a model that adds the step key's noise to each reward."""
  return make_step(optimizer, apply_fn=noisy_apply, apply_takes_key=True, **kw)


def test_step_key_is_fold_in_of_state_key_and_step_when_apply_takes_key():
  optimizer = optax.sgd(0.0)
  params = init_params(jax.random.key(0))
  step = noisy_step(optimizer)
  state = ts.create_train_state(params, optimizer, jax.random.key(7))
  batch = make_batch(0)
  for t in range(2):
    state_t = state
    state, metrics = step(state, batch)
    key = jax.random.fold_in(jax.random.key(7), t)
    assert np.array_equal(jax.random.key_data(ts.step_key(state_t)), jax.random.key_data(key))
    noise = np.asarray(jax.random.normal(key, (2 * BATCH,)), np.float64)
    _, rc = np_rewards(params, batch["chosen"], batch["chosen_mask"])
    _, rr = np_rewards(params, batch["rejected"], batch["rejected_mask"])
    np.testing.assert_allclose(
      metrics["margin"], np.mean(rc + noise[:BATCH] - rr - noise[BATCH:]), rtol=1e-5, atol=1e-6
    )


def test_each_microbatch_scores_with_its_own_fold_of_the_step_key():
  optimizer = optax.sgd(0.0)
  params = init_params(jax.random.key(0))
  step = noisy_step(optimizer, microbatch_size=2)
  state = ts.create_train_state(params, optimizer, jax.random.key(7))
  batch = make_batch(0)
  _, metrics = step(state, batch)
  _, rc = np_rewards(params, batch["chosen"], batch["chosen_mask"])
  _, rr = np_rewards(params, batch["rejected"], batch["rejected_mask"])
  margins = []
  for i in range(BATCH // 2):  # slice i: chosen then rejected rows, noise of fold_in(key, i)
    noise = np.asarray(jax.random.normal(jax.random.fold_in(ts.step_key(state), i), (4,)))
    rows = slice(2 * i, 2 * i + 2)
    margins.append(rc[rows] + noise[:2] - rr[rows] - noise[2:])
  np.testing.assert_allclose(metrics["margin"], np.mean(margins), rtol=1e-5, atol=1e-6)


def test_eval_step_returns_per_example_rewards():
  params = init_params(jax.random.key(0))
  batch = make_batch(3, with_weight=False, with_label=False)
  out = jax.jit(functools.partial(rm_step.reward_model_eval_step, apply_fn=apply_fn))(params, batch)
  _, rc = np_rewards(params, batch["chosen"], batch["chosen_mask"])
  _, rr = np_rewards(params, batch["rejected"], batch["rejected_mask"])
  np.testing.assert_allclose(out["rewards_chosen"], rc, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["rewards_rejected"], rr, rtol=1e-5, atol=1e-6)


def test_optional_weight_and_label_default_to_plain_bradley_terry():
  optimizer = optax.sgd(0.1)
  params = init_params(jax.random.key(0))
  batch = make_batch(4, with_weight=False, with_label=False)
  _, metrics = make_step(optimizer)(
    ts.create_train_state(params, optimizer, jax.random.key(0)), batch
  )
  _, rc = np_rewards(params, batch["chosen"], batch["chosen_mask"])
  _, rr = np_rewards(params, batch["rejected"], batch["rejected_mask"])
  np.testing.assert_allclose(metrics["loss"], np.mean(np.logaddexp(0.0, -(rc - rr))), rtol=1e-5)


@pytest.mark.parametrize(
  "mutate, message",
  [
    (lambda b: b.pop("rejected_mask"), "missing keys"),
    (lambda b: b.update(chosen=b["chosen"][0]), r"batch\['chosen'\] must have shape"),
    (lambda b: b.update(weight=np.ones((BATCH, 2), np.float32)), r"batch\['weight'\]"),
    (
      lambda b: b.update(rejected=b["rejected"][:2], rejected_mask=b["rejected_mask"][:2]),
      "same batch size",
    ),
  ],
)
def test_malformed_batch_raises_value_error_naming_the_field(mutate, message):
  optimizer = optax.sgd(0.1)
  state = ts.create_train_state(init_params(jax.random.key(0)), optimizer, jax.random.key(0))
  batch = make_batch(0)
  mutate(batch)
  with pytest.raises(ValueError, match=message):
    make_step(optimizer)(state, batch)


def test_apply_fn_with_wrong_output_shape_raises():
  optimizer = optax.sgd(0.1)
  state = ts.create_train_state(init_params(jax.random.key(0)), optimizer, jax.random.key(0))
  bad_apply = lambda p, t, m: apply_fn(p, t, m)[:, None]
  step = jax.jit(
    functools.partial(
      rm_step.reward_model_step, apply_fn=bad_apply, loss_fn=bt_loss, optimizer=optimizer
    )
  )
  with pytest.raises(ValueError, match="apply_fn must return rewards of shape"):
    step(state, make_batch(0))


def test_create_train_state_accepts_typed_and_raw_keys_and_rejects_others():
  params = {"x": jnp.ones(2)}
  s1 = ts.create_train_state(params, optax.adam(1e-3), jax.random.key(0))
  s2 = ts.create_train_state(params, optax.adam(1e-3), jax.random.PRNGKey(0))
  assert s1.step.dtype == jnp.int32 and s1.step.shape == () and s2.num_skipped.dtype == jnp.int32
  with pytest.raises(ValueError, match="key must be"):
    ts.create_train_state(params, optax.adam(1e-3), jnp.ones(2, jnp.float32))


def test_output_pair_step_rejects_outputs_without_the_pair_axis_and_non_scalar_losses():
  pairs = {
    "chosen": jnp.zeros((4, 3), jnp.int32),
    "chosen_mask": jnp.ones((4, 3), bool),
    "rejected": jnp.zeros((4, 3), jnp.int32),
    "rejected_mask": jnp.ones((4, 3), bool),
  }
  params = {"w": jnp.ones(2)}
  opt = optax.sgd(0.1)
  state = ts.create_train_state(params, opt, jax.random.key(0))

  def two_outputs(p, tokens, mask):  # [b, 2]: fine
    return jnp.ones((tokens.shape[0], 1)) * p["w"]

  def loss(c, r, *, weights=None, labels=None):
    return jnp.mean((c - r) ** 2 + c.sum(-1, keepdims=True))

  step = functools.partial(rm_step.output_pair_step, loss_fn=loss, optimizer=opt)
  new, m = step(state, pairs, apply_fn=two_outputs)
  assert m["loss"].shape == () and not bool(m["nonfinite"])
  with pytest.raises(ValueError, match=r"outputs \[2 \* batch, \.\.\.\] = \(8, \.\.\.\)"):
    step(state, pairs, apply_fn=lambda p, t, mk: jnp.ones((3, 2)) * p["w"])
  with pytest.raises(ValueError, match="loss_fn must return a scalar"):
    step(state, pairs, apply_fn=two_outputs, loss_fn=lambda c, r, **kw: c - r)
  short = {
    **pairs,
    "rejected": pairs["rejected"][:, :2],
    "rejected_mask": pairs["rejected_mask"][:, :2],
  }
  with pytest.raises(ValueError, match="same length"):
    step(state, short, apply_fn=two_outputs)
