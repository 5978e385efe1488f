"""Tests for jaxrm.steps.parallel: jit, shard_map, pmap and fsdp launchers on 8 host CPU devices."""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from model_helpers import bt_loss
import numpy as np
import optax
import pytest

from jaxrm.steps import parallel, rm_step
from jaxrm.steps import train_state as ts

VOCAB, WIDTH, SEQ = 16, 8, 6
NUM_DEVICES = 8
GLOBAL_BATCH = 16


def init_params(key):
  k1, k2 = jax.random.split(key)
  return {
    "embed": jax.random.normal(k1, (VOCAB, WIDTH)),
    "w": jax.random.normal(k2, (WIDTH,)),
    "scale": jnp.ones(()),
  }


def apply_fn(params, tokens, mask):
  """Masked mean of token embeddings, linear head, scalar scale: [b, s] -> [b].

  No bias: its Bradley–Terry gradient is exactly zero, and Adam would turn rounding noise in
  that zero into +-lr updates, which differ between summation orders.
  """
  emb = params["embed"][tokens]
  m = mask.astype(emb.dtype)[..., None]
  pooled = jnp.sum(emb * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
  return params["scale"] * (pooled @ params["w"])


def make_batch(seed, b=GLOBAL_BATCH):
  rng = np.random.default_rng(seed)
  batch = {}
  for name in ("chosen", "rejected"):
    lengths = rng.integers(1, SEQ + 1, size=b)
    mask = np.arange(SEQ)[None, :] < lengths[:, None]
    batch[name] = np.where(mask, rng.integers(3, VOCAB, size=(b, SEQ)), 0).astype(np.int32)
    batch[name + "_mask"] = mask
  batch["weight"] = rng.uniform(0.1, 3.0, size=b).astype(np.float32)
  batch["label"] = rng.uniform(0.0, 1.0, size=b).astype(np.float32)
  return batch


def host(tree):
  """Copies a pytree to NumPy (typed PRNG keys as their key data)."""

  def leaf(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(x)

  return jax.tree.map(leaf, tree)


OPTIMIZER = optax.adamw(3e-2, weight_decay=1e-2)
STEP_FN = functools.partial(
  rm_step.reward_model_step, apply_fn=apply_fn, loss_fn=bt_loss, optimizer=OPTIMIZER
)
MODES = [
  ("jit", {}),
  ("shard_map", {}),
  ("shard_map", {"check_vma": True}),
  ("pmap", {}),
  ("fsdp", {"fsdp_min_size": 8}),
]
MODE_IDS = ["jit", "shard_map", "shard_map_check_vma", "pmap", "fsdp"]


def initial_state():
  return ts.create_train_state(init_params(jax.random.key(0)), OPTIMIZER, jax.random.key(42))


def run(mode, kwargs, batches, step_fn=STEP_FN):
  pstep = parallel.make_parallel_step(step_fn, mode=mode, **kwargs)
  state = pstep.put_state(initial_state())
  metrics = []
  for batch in batches:
    state, m = pstep(state, pstep.shard_batch(batch))
    metrics.append(host(pstep.unreplicate(m)))
  return pstep, state, metrics


@pytest.fixture(scope="module")
def reference():
  """Three adamw steps with the single-device jit step."""
  _, state, metrics = run("jit", {}, [make_batch(i) for i in range(3)])
  return host(state), metrics


def test_conftest_provides_eight_devices():
  assert jax.device_count() == NUM_DEVICES


@pytest.mark.parametrize("mode, kwargs", MODES[1:], ids=MODE_IDS[1:])
def test_parallel_step_matches_single_device_jit_step(mode, kwargs, reference):
  pstep, state, metrics = run(mode, kwargs, [make_batch(i) for i in range(3)])
  assert pstep.mode == mode and pstep.num_devices == NUM_DEVICES
  assert_matches(reference, pstep, state, metrics)


@pytest.mark.parametrize("mode, kwargs", MODES, ids=MODE_IDS)
def test_microbatched_step_matches_the_whole_batch_jit_step(mode, kwargs, reference):
  # One pair per microbatch: 2 on each of the 8 devices, 16 under jit (weights unequal).
  step_fn = functools.partial(STEP_FN, microbatch_size=1)
  pstep, state, metrics = run(mode, kwargs, [make_batch(i) for i in range(3)], step_fn)
  assert_matches(reference, pstep, state, metrics)


def assert_matches(reference, pstep, state, metrics):
  """The state and metrics of three steps equal the single-device jit step's (1e-5)."""
  ref_state, ref_metrics = reference
  got = host(pstep.unreplicate(state))
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
    got.params,
    ref_state.params,
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
    got.opt_state,
    ref_state.opt_state,
  )
  assert int(got.step) == 3 and int(got.num_skipped) == 0
  np.testing.assert_array_equal(got.key, ref_state.key)
  for m, r in zip(metrics, ref_metrics):
    for name in ("loss", "accuracy", "margin", "grad_norm"):
      np.testing.assert_allclose(m[name], r[name], rtol=1e-5, atol=1e-6, err_msg=name)
  # The parameters actually moved, so the comparison is not vacuous.
  init = host(initial_state())
  assert np.abs(got.params["embed"] - init.params["embed"]).max() > 1e-2


def test_batch_mean_weighted_loss_matches_jit_with_weights_normalized_false():
  def mean_loss(rc, rr, *, weights=None, labels=None):
    return jnp.mean(
      weights * -(labels * jax.nn.log_sigmoid(rc - rr) + (1 - labels) * jax.nn.log_sigmoid(rr - rc))
    )

  step_fn = functools.partial(
    rm_step.reward_model_step,
    apply_fn=apply_fn,
    loss_fn=mean_loss,
    optimizer=OPTIMIZER,
    weights_normalized=False,
  )
  batches = [make_batch(i) for i in range(2)]
  _, ref, _ = run("jit", {}, batches, step_fn=step_fn)
  for microbatch_size in (None, 1):
    fn = functools.partial(step_fn, microbatch_size=microbatch_size)
    pstep, got, _ = run("shard_map", {}, batches, step_fn=fn)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
      host(pstep.unreplicate(got)),
      host(ref),
    )


@pytest.mark.parametrize(
  "mode, kwargs", [MODES[i] for i in (0, 1, 3, 4)], ids=[MODE_IDS[i] for i in (0, 1, 3, 4)]
)
@pytest.mark.parametrize("nonfinite", ["skip", "raise"])
def test_nan_on_one_shard_leaves_params_unchanged_on_all_devices(mode, kwargs, nonfinite):
  step_fn = functools.partial(STEP_FN, nonfinite=nonfinite)
  pstep = parallel.make_parallel_step(step_fn, mode=mode, **kwargs)
  state = pstep.put_state(initial_state())
  state, _ = pstep(state, pstep.shard_batch(make_batch(0)))
  before = host(pstep.unreplicate(state))
  bad = make_batch(1)
  bad["weight"][5] = np.nan  # example 5 lives on device 2 of 8
  state, metrics = pstep(state, pstep.shard_batch(bad))
  m = host(pstep.unreplicate(metrics))
  assert bool(m["nonfinite"])
  after = host(pstep.unreplicate(state))
  jax.tree.map(np.testing.assert_array_equal, after.params, before.params)
  jax.tree.map(np.testing.assert_array_equal, after.opt_state, before.opt_state)
  if nonfinite == "skip":
    assert int(after.num_skipped) == 1 and int(after.step) == 2
  else:
    assert int(after.num_skipped) == 0 and int(after.step) == 1
    with pytest.raises(FloatingPointError, match="at step 1"):
      ts.raise_if_nonfinite(m, step=before.step)
  # Every device holds the unchanged parameters and the same counters.
  for leaf, ref in zip(jax.tree.leaves(state.params), jax.tree.leaves(before.params)):
    for shard in leaf.addressable_shards:
      data = np.asarray(shard.data)
      expected = ref[shard.index] if mode != "pmap" else ref[None]
      np.testing.assert_array_equal(data, expected)
  for shard in state.num_skipped.addressable_shards:
    assert np.all(np.asarray(shard.data) == after.num_skipped)


@pytest.mark.parametrize("mode", ["shard_map", "pmap", "fsdp"])
def test_batch_size_not_divisible_by_device_count_raises(mode):
  pstep = parallel.make_parallel_step(STEP_FN, mode=mode)
  with pytest.raises(
    ValueError,
    match=r"batch size 12 is not divisible by the number of "
    r"devices 8",
  ):
    pstep.shard_batch(make_batch(0, b=12))
  state = pstep.put_state(initial_state())
  if mode != "pmap":  # an unsharded batch passed straight to the step is checked too
    with pytest.raises(ValueError, match="batch size 12 is not divisible"):
      pstep(state, make_batch(0, b=12))
  else:
    with pytest.raises(ValueError, match="leading device axis of size 8"):
      pstep(state, make_batch(0, b=16))


def test_batch_leaves_with_different_batch_sizes_raise():
  pstep = parallel.make_parallel_step(STEP_FN, mode="shard_map")
  batch = make_batch(0)
  batch["weight"] = batch["weight"][:8]
  with pytest.raises(ValueError, match="different leading"):
    pstep.shard_batch(batch)


@pytest.mark.parametrize("mode", ["jit", "shard_map", "pmap", "fsdp"])
def test_eval_step_gathers_rewards_of_global_batch_in_order(mode):
  params = init_params(jax.random.key(3))
  batch = make_batch(7)
  eval_fn = functools.partial(rm_step.reward_model_eval_step, apply_fn=apply_fn)
  pstep = parallel.make_parallel_step(eval_fn, mode=mode, donate=False)
  out = host(pstep.unreplicate(pstep(pstep.put_state(params), pstep.shard_batch(batch))))
  expected_c = apply_fn(params, batch["chosen"], batch["chosen_mask"])
  expected_r = apply_fn(params, batch["rejected"], batch["rejected_mask"])
  assert out["rewards_chosen"].shape == (GLOBAL_BATCH,)
  np.testing.assert_allclose(out["rewards_chosen"], expected_c, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["rewards_rejected"], expected_r, rtol=1e-5, atol=1e-6)


def test_state_is_donated_but_put_state_copies_the_callers_arrays():
  pstep = parallel.make_parallel_step(STEP_FN, mode="shard_map")
  host_state = initial_state()
  state = pstep.put_state(host_state)
  new_state, _ = pstep(state, pstep.shard_batch(make_batch(0)))
  assert state.params["embed"].is_deleted()  # donated
  assert not host_state.params["embed"].is_deleted()
  assert not new_state.params["embed"].is_deleted()


def test_auto_mode_uses_shard_map_on_several_devices_and_jit_on_one():
  assert parallel.make_parallel_step(STEP_FN).mode == "shard_map"
  one = parallel.make_parallel_step(STEP_FN, devices=jax.devices()[:1])
  assert one.mode == "jit" and one.axis_name is None
  with pytest.raises(ValueError, match="mode must be one of"):
    parallel.make_parallel_step(STEP_FN, mode="gspmd")


def test_fsdp_shardings_split_largest_divisible_dim_of_large_leaves():
  mesh = parallel.make_data_mesh()
  tree = {
    "big": jnp.zeros((12, 64)),
    "tall": jnp.zeros((64, 8)),
    "odd": jnp.zeros((9, 7, 5)),
    "small": jnp.zeros((8,)),
    "scalar": jnp.zeros(()),
    "key": jax.random.key(0),
  }
  specs = jax.tree.map(lambda s: s.spec, parallel.fsdp_shardings(tree, mesh, min_size=64))
  assert specs == {
    "big": P(None, "data"),
    "tall": P("data"),
    "odd": P(),
    "small": P(),
    "scalar": P(),
    "key": P(),
  }
  with pytest.raises(ValueError, match="not an axis of the mesh"):
    parallel.fsdp_shardings(tree, mesh, axis_name="model")


def test_fsdp_mode_keeps_params_and_adam_moments_sharded_across_steps():
  pstep, state, _ = run("fsdp", {"fsdp_min_size": 8}, [make_batch(0), make_batch(1)])
  assert state.params["embed"].sharding.spec == P("data")
  assert state.params["w"].sharding.spec == P("data")
  assert state.params["scale"].sharding.spec == P()
  mu = state.opt_state[0].mu
  assert mu["embed"].sharding.spec == P("data")
  assert len({s.device for s in state.params["embed"].addressable_shards}) == NUM_DEVICES
  assert state.params["embed"].addressable_shards[0].data.shape == (VOCAB // NUM_DEVICES, WIDTH)


def test_shard_params_places_large_leaves_sharded_with_equal_values():
  mesh = parallel.make_data_mesh()
  params = init_params(jax.random.key(0))
  sharded = parallel.shard_params(params, mesh, min_size=8)
  assert sharded["embed"].sharding.spec == P("data")
  jax.tree.map(np.testing.assert_array_equal, host(sharded), host(params))


def test_pmap_put_state_adds_device_axis_and_unreplicate_removes_it():
  pstep = parallel.make_parallel_step(STEP_FN, mode="pmap")
  host_state = initial_state()
  state = pstep.put_state(host_state)
  assert state.params["embed"].shape == (NUM_DEVICES, VOCAB, WIDTH)
  assert state.step.shape == (NUM_DEVICES,)
  jax.tree.map(np.testing.assert_array_equal, host(pstep.unreplicate(state)), host(host_state))
  batch = pstep.shard_batch(make_batch(0))
  assert batch["chosen"].shape == (NUM_DEVICES, GLOBAL_BATCH // NUM_DEVICES, SEQ)
