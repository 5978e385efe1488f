"""Tests for jaxrm.steps.train_state: the update-level non-finite guard of apply_if_finite."""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

from jaxrm.steps import train_state as ts

# The reward model's step, model and losses at XLA's default level, as users run them.
pytestmark = pytest.mark.usefixtures("xla_optimized")  # tests/conftest.py

NUM_DEVICES = 8


def make_state(optimizer, params=None):
  if params is None:
    params = {"w": jnp.array([1.0, -2.0, 0.5], jnp.float32), "b": jnp.float32(0.25)}
  return ts.create_train_state(params, optimizer, jax.random.key(0))


def host(tree):
  return jax.tree.map(
    lambda x: np.asarray(
      jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
    ),
    tree,
  )


def assert_unchanged(new, old):
  jax.tree.map(np.testing.assert_array_equal, host(new.params), host(old.params))
  jax.tree.map(np.testing.assert_array_equal, host(new.opt_state), host(old.opt_state))


GRADS = {"w": jnp.array([0.5, -1.0, 2.0], jnp.float32), "b": jnp.float32(1.0)}


@pytest.fixture(params=["select", "cond"])
def guard_path(request, monkeypatch):
  """Both ways apply_if_finite applies an update: every leaf small (computed once, selected)
  and, with every leaf counted large, computed again under lax.cond."""
  if request.param == "cond":
    monkeypatch.setattr(ts, "CHECK_TOGETHER_MAX_SIZE", 0)
  return request.param


@pytest.mark.parametrize(
  "optimizer",
  [
    optax.sgd(jnp.inf),
    optax.adam(jnp.inf),
    optax.adamw(1e-3, weight_decay=jnp.inf),
    optax.sgd(jnp.nan),
  ],
  ids=["sgd_lr_inf", "adam_lr_inf", "adamw_weight_decay_inf", "sgd_lr_nan"],
)
def test_bad_learning_rate_leaves_params_unchanged_and_counts_the_skip(optimizer, guard_path):
  # Loss and gradients are finite: only the update (or the new parameters) is not.
  state = make_state(optimizer)
  fn = jax.jit(functools.partial(ts.apply_if_finite, optimizer=optimizer))
  new, flag = fn(state, GRADS, jnp.float32(1.0))
  assert bool(flag)
  assert_unchanged(new, state)
  assert int(new.num_skipped) == 1 and int(new.step) == 1
  # Unguarded, the same update would have written non-finite parameters.
  updates, _ = optimizer.update(GRADS, state.opt_state, state.params)
  unguarded = optax.apply_updates(state.params, updates)
  assert not all(np.all(np.isfinite(x)) for x in jax.tree.leaves(unguarded))


def test_finite_update_that_overflows_the_parameters_is_refused(guard_path):
  # The update 3e38 is finite, but 3e38 + 3e38 overflows float32 to inf.
  optimizer = optax.sgd(1.0)
  state = make_state(optimizer, {"w": jnp.array([3e38, 0.0], jnp.float32)})
  grads = {"w": jnp.array([-3e38, 1.0], jnp.float32)}
  updates, _ = optimizer.update(grads, state.opt_state, state.params)
  assert np.all(np.isfinite(updates["w"]))
  new, flag = jax.jit(functools.partial(ts.apply_if_finite, optimizer=optimizer))(
    state, grads, jnp.float32(0.0)
  )
  assert bool(flag) and int(new.num_skipped) == 1
  np.testing.assert_array_equal(new.params["w"], np.float32([3e38, 0.0]))


def test_update_that_overflows_the_optimizer_state_is_refused(guard_path):
  # Adam's second moment squares the gradient: 1e30^2 overflows float32, the params would not.
  optimizer = optax.adam(1e-3)
  state = make_state(optimizer)
  grads = jax.tree.map(lambda g: g * 1e30, GRADS)
  new, flag = jax.jit(functools.partial(ts.apply_if_finite, optimizer=optimizer))(
    state, grads, jnp.float32(1.0)
  )
  assert bool(flag)
  assert_unchanged(new, state)


def test_raise_mode_keeps_the_input_state_and_the_host_check_names_the_step(guard_path):
  optimizer = optax.sgd(jnp.inf)
  state = make_state(optimizer)
  new, flag = ts.apply_if_finite(state, GRADS, jnp.float32(1.0), optimizer, nonfinite="raise")
  assert bool(flag) and int(new.step) == 0 and int(new.num_skipped) == 0
  assert_unchanged(new, state)
  with pytest.raises(FloatingPointError, match="update or new parameters at step 0"):
    ts.raise_if_nonfinite({"nonfinite": flag, "loss": jnp.float32(1.0)}, step=new.step)


def test_good_update_is_applied_exactly(guard_path):
  optimizer = optax.sgd(0.5)
  state = make_state(optimizer)
  new, flag = ts.apply_if_finite(state, GRADS, jnp.float32(1.0), optimizer)
  assert not bool(flag) and int(new.num_skipped) == 0 and int(new.step) == 1
  expected = jax.tree.map(
    lambda p, g: np.float32(p) - np.float32(0.5) * np.float32(g), state.params, GRADS
  )
  jax.tree.map(np.testing.assert_array_equal, host(new.params), host(expected))


def place(mesh, state, per_device):
  """Replicates ``state`` and shards ``per_device`` over the mesh's ``data`` axis."""
  state = jax.device_put(state, NamedSharding(mesh, P()))
  return state, jax.device_put(per_device, NamedSharding(mesh, P("data")))


@pytest.mark.parametrize("lr", [1e-1, jnp.inf], ids=["finite", "inf"])
def test_shard_map_decision_matches_single_device(lr, guard_path):
  """8 devices, each with its own gradient shard, pmean'd: same result as one device."""
  optimizer = optax.adam(lr)
  mesh = jax.make_mesh((NUM_DEVICES,), ("data",))
  per_device = np.linspace(-1.0, 1.0, NUM_DEVICES * 3, dtype=np.float32).reshape(NUM_DEVICES, 3)

  def step(state, g, axis_name):
    grads = {"w": g.mean(0), "b": g.sum() * 0.0 + 1.0}
    if axis_name is not None:
      grads = jax.lax.pmean(grads, axis_name)
    return ts.apply_if_finite(state, grads, jnp.float32(1.0), optimizer, axis_name=axis_name)

  state = make_state(optimizer)
  single, flag1 = jax.jit(functools.partial(step, axis_name=None))(state, per_device)
  sharded = jax.jit(
    jax.shard_map(
      functools.partial(step, axis_name="data"),
      mesh=mesh,
      in_specs=(P(), P("data")),
      out_specs=(P(), P()),
      check_vma=False,
    )
  )
  multi, flag8 = sharded(*place(mesh, state, per_device))
  assert bool(flag1) == bool(flag8) == (lr == jnp.inf)
  assert int(multi.num_skipped) == int(single.num_skipped) == int(lr == jnp.inf)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
    host(multi.params),
    host(single.params),
  )
  if lr == jnp.inf:
    assert_unchanged(multi, state)


def test_one_device_overflowing_alone_makes_every_device_skip(guard_path):
  """An un-averaged input that is bad on one device only: lax.pmin makes all devices skip."""
  optimizer = optax.sgd(1.0)
  mesh = jax.make_mesh((NUM_DEVICES,), ("data",))
  scale = np.ones((NUM_DEVICES,), np.float32)
  scale[3] = 1e38  # device 3's update carries its parameter past float32's max

  def step(state, s):
    grads = {"w": -s[0] * jnp.array([3.0, 1.0, 1.0]), "b": jnp.float32(0.0)}
    return ts.apply_if_finite(state, grads, jnp.float32(1.0), optimizer, axis_name="data")

  state = make_state(
    optimizer, {"w": jnp.array([3e38, 0.0, 0.0], jnp.float32), "b": jnp.float32(0)}
  )
  new, flag = jax.jit(
    jax.shard_map(
      step,
      mesh=mesh,
      in_specs=(P(), P("data")),
      out_specs=(P(), P()),
      check_vma=False,
    )
  )(*place(mesh, state, scale))
  assert bool(flag) and int(new.num_skipped) == 1
  np.testing.assert_array_equal(new.params["w"], np.float32([3e38, 0.0, 0.0]))


def _random_tree(rng, bad):
  """Leaves of several dtypes and sizes, two shapes twice (a large leaf is checked with the
  others of its shape); ``bad`` = (leaf index, flat index, value) or None."""
  shapes = [(), (3,), (4, 5), (300,), (2, 3, 7), (1,), (0,), (300,), (4, 5)]
  dtypes = [np.float32, np.float16, jnp.bfloat16, np.float32, np.float64, np.int32, np.float32]
  dtypes += [jnp.bfloat16, np.float32]
  leaves = [rng.normal(size=s).astype(d) for s, d in zip(shapes, dtypes)]
  if bad is not None:
    i, j, value = bad
    flat = leaves[i].reshape(-1)
    flat[j % flat.size] = value
  return {"a": leaves[:3], "b": {"c": leaves[3], "d": tuple(leaves[4:7])}, "e": leaves[7:]}


@pytest.mark.parametrize("together_max_size", [0, 10, 1 << 16])
def test_tree_all_finite_matches_numpy_for_every_leaf_dtype_and_size(
  monkeypatch, together_max_size
):
  # 0: every leaf alone; 10: small leaves together, large alone; default: all together.
  monkeypatch.setattr(ts, "CHECK_TOGETHER_MAX_SIZE", together_max_size)
  rng = np.random.default_rng(0)
  cases = [None] + [
    (i, int(rng.integers(1000)), v)
    for i in (0, 1, 2, 3, 4, 7, 8)
    for v in (np.nan, np.inf, -np.inf)
  ]
  for bad in cases:
    tree = _random_tree(rng, bad)
    expected = all(
      np.isfinite(np.asarray(x, np.float64)).all()
      for x in jax.tree.leaves(tree)
      if not np.issubdtype(np.asarray(x).dtype, np.integer)
    )
    assert expected == (bad is None)
    assert bool(ts.tree_all_finite(tree)) == expected, bad
    assert bool(jax.jit(ts.tree_all_finite)(tree)) == expected, bad
  # vmapped over a leading axis: one flag per row.
  stacked = {"x": jnp.ones((4, 6)).at[2, 5].set(jnp.nan), "y": jnp.ones((4, 30))}
  np.testing.assert_array_equal(jax.vmap(ts.tree_all_finite)(stacked), [True, True, False, True])
  assert bool(ts.tree_all_finite({"n": jnp.arange(3)})) and bool(ts.tree_all_finite({}))


def _compiled_guard_instructions(leaves: int) -> int:
  """Instructions of the optimised program of an AdamW step under the guard over ``leaves``
  parameter leaves (checked one by one: ``CHECK_TOGETHER_MAX_SIZE`` patched to 0)."""
  params = {f"p{i}": jnp.ones((8,), jnp.float32) for i in range(leaves)}
  optimizer = optax.adamw(1e-3)
  state = make_state(optimizer, params)

  def step(state, grads):
    return ts.apply_if_finite(state, grads, jnp.float32(0.0), optimizer)[0]

  text = jax.jit(step).lower(state, params).compile().as_text()
  return sum(" = " in line for line in text.splitlines())


def test_the_guard_program_grows_linearly_with_the_leaves(monkeypatch):
  monkeypatch.setattr(ts, "CHECK_TOGETHER_MAX_SIZE", 0)
  # The finite flag is computed once. XLA:CPU turned a boolean reduction over the stacked flags
  # into a chain of `and`s and copied it into every selected leaf's fusion, so the program
  # grew with the square of the leaf count (20 -> 40 leaves: 4x the instructions).
  small, large = _compiled_guard_instructions(20), _compiled_guard_instructions(40)
  assert large < 2.5 * small, (small, large)


def test_both_guard_paths_write_the_same_state_bit_for_bit(monkeypatch):
  """The README runs' optimizer (global-norm clipping, AdamW with a masked weight decay) for
  three steps: computed once and selected, or computed again under lax.cond (every leaf
  counted large), the same parameters and optimizer state."""
  from jaxrm.train import rm_config

  config = rm_config.TrainConfig(steps=10)
  optimizer, _ = rm_config.make_optimizer(config)
  rng = np.random.default_rng(0)
  params = {"embed": rng.normal(size=(50, 8)), "w": rng.normal(size=(8, 8)), "b": np.zeros(8)}
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)]
  grads += [jax.tree.map(lambda g: 50.0 * g, grads[0]), grads[0]]  # the second one clipped
  step = lambda s, g: ts.apply_if_finite(s, g, jnp.float32(1.0), optimizer)
  states = {}
  for together_max_size in (ts.CHECK_TOGETHER_MAX_SIZE, 0):
    monkeypatch.setattr(ts, "CHECK_TOGETHER_MAX_SIZE", together_max_size)
    state = make_state(optimizer, params)
    for g in grads:
      state, flag = jax.jit(step)(state, g)
      assert not bool(flag)
    states[together_max_size] = host(state)
  (a, b) = states.values()
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert not np.array_equal(a.params["w"], host(params)["w"])  # three updates were applied
