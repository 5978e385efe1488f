"""jaxrm.io.program_cache: lowered programs on disk give jax.jit's results, under keys that
change with what the program depends on."""

import functools
import os
import subprocess
import sys
from typing import NamedTuple

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrm.io import program_cache
from jaxrm.steps import parallel
from tests import run_helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class State(NamedTuple):
  params: dict
  opt_state: optax.OptState
  step: jax.Array


OPTIMIZER = optax.adamw(1e-2)


def sgd_step(state, batch):
  """A small training step: pytree state (optax's state classes inside) and metrics out."""

  def loss_fn(params):
    pred = jnp.tanh(batch["x"] @ params["w"]) @ params["v"]
    return jnp.mean((pred - batch["y"]) ** 2)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = OPTIMIZER.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return State(params, opt_state, state.step + 1), {"loss": loss}


def fresh_state():
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {"w": jax.random.normal(k1, (8, 16)), "v": jax.random.normal(k2, (16,))}
  return State(params, OPTIMIZER.init(params), jnp.zeros((), jnp.int32))


BATCH = {
  "x": np.random.default_rng(1).normal(size=(32, 8)).astype(np.float32),
  "y": np.random.default_rng(2).normal(size=(32,)).astype(np.float32),
}


@pytest.fixture
def store(tmp_path):
  program_cache.enable(str(tmp_path))
  yield tmp_path
  program_cache.enable(None)


def run(step, n=3):
  state, out = fresh_state(), []
  for _ in range(n):
    state, metrics = step(state, BATCH)
    out.append(metrics["loss"])
  return jax.tree.leaves(state) + out


def assert_bitwise_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_stored_and_loaded_programs_give_jax_jits_results(store):
  expected = run(jax.jit(sgd_step))
  first = program_cache.jit(sgd_step, name="step", key="sgd")
  assert_bitwise_equal(run(first), expected)
  (stored,) = os.listdir(store)
  assert stored.startswith("step-") and stored.endswith(program_cache.SUFFIX)
  # A new function object (a later process): the program is read, not traced.
  traced = []
  counting = lambda state, batch: (traced.append(1), sgd_step(state, batch))[1]  # noqa: E731
  loaded = program_cache.jit(counting, name="step", key="sgd")
  assert_bitwise_equal(run(loaded), expected)
  assert traced == [] and os.listdir(store) == [stored]


def test_a_later_process_loads_the_program_and_gets_the_same_numbers(store):
  script = (
    "import sys, numpy as np; sys.path.insert(0, sys.argv[1]);"
    "from tests import test_program_cache as t; from jaxrm.io import program_cache;"
    "program_cache.enable(sys.argv[2]);"
    "out = t.run(program_cache.jit(t.sgd_step, name='step', key='sgd'));"
    "np.save(sys.argv[3], np.concatenate([np.ravel(np.asarray(x, np.float32)) for x in out]))"
  )
  outs = []
  for i in range(2):
    path = store.parent / f"out{i}.npy"
    env = dict(os.environ, PYTHONPATH=ROOT)
    subprocess.run([sys.executable, "-c", script, ROOT, str(store), str(path)], check=True, env=env)
    outs.append(np.load(path))
    assert len(os.listdir(store)) == 1
  np.testing.assert_array_equal(outs[0], outs[1])


def test_key_shapes_and_library_code_select_different_programs(store, monkeypatch):
  program_cache.jit(sgd_step, name="step", key="sgd")(fresh_state(), BATCH)
  program_cache.jit(sgd_step, name="step", key="sgd, another config")(fresh_state(), BATCH)
  half = jax.tree.map(lambda x: x[:16], BATCH)
  program_cache.jit(sgd_step, name="step", key="sgd")(fresh_state(), half)
  assert len(os.listdir(store)) == 3
  state = fresh_state()
  leaves, treedef = jax.tree.flatten((state, BATCH))
  signature = program_cache._signature(leaves)
  before = program_cache.program_digest("step", "sgd", treedef, signature)
  monkeypatch.setattr(program_cache, "library_digest", lambda: "edited source")
  assert program_cache.program_digest("step", "sgd", treedef, signature) != before


def test_library_digest_covers_every_jaxrm_module():
  digest = program_cache.library_digest()
  program_cache.library_digest.cache_clear()
  assert program_cache.library_digest() == digest and len(digest) == 64


def test_donated_state_is_consumed(store):
  step = program_cache.jit(sgd_step, name="step", key="sgd", donate_argnums=(0,))
  state = jax.device_put(fresh_state())
  new_state, _ = step(state, BATCH)
  assert all(x.is_deleted() for x in jax.tree.leaves(state))
  assert not any(x.is_deleted() for x in jax.tree.leaves(new_state))


def test_a_loaded_program_is_lowered_once_for_fresh_and_returned_arrays(store):
  """A state made outside any jit (uncommitted arrays) and the state a call returns (committed
  to its device) are one signature: the loaded program is lowered, and compiled, once."""
  batch = jax.tree.map(jnp.asarray, BATCH)
  program_cache.jit(sgd_step, name="step", key="sgd")(fresh_state(), batch)  # stores it
  step = program_cache.jit(sgd_step, name="step", key="sgd", donate_argnums=(0,))
  state = fresh_state()
  with run_helpers.recorded(run_helpers.LOWERING) as lowerings:
    for _ in range(3):
      state, _ = step(state, batch)
  assert len(lowerings) == 1, lowerings
  assert_bitwise_equal(jax.tree.leaves(state), run(jax.jit(sgd_step), n=3)[:-3])


def test_compiler_options_reach_the_compile_of_a_stored_and_of_a_plain_program(store):
  options = {"no_such_xla_option": 1}  # XLA refuses it, so the error shows it was passed
  for key in ("sgd", None):  # through the store; plain jax.jit
    f = program_cache.jit(sgd_step, name="step", key=key, compiler_options=options)
    with pytest.raises(Exception, match="no_such_xla_option"):
      f(fresh_state(), BATCH)
  assert len(os.listdir(store)) == 1  # the stored program (the options are not part of it)


def test_damaged_program_is_traced_again(store):
  expected = run(jax.jit(sgd_step))
  run(program_cache.jit(sgd_step, name="step", key="sgd"))
  (stored,) = os.listdir(store)
  (store / stored).write_bytes(b"not a program")
  with absltest.mock.patch.object(program_cache.logging, "warning") as warning:
    assert_bitwise_equal(run(program_cache.jit(sgd_step, name="step", key="sgd")), expected)
  assert "unreadable stored program" in warning.call_args[0][0]
  assert_bitwise_equal(run(program_cache.jit(sgd_step, name="step", key="sgd")), expected)


def test_an_unwritable_directory_costs_a_warning_not_the_run(tmp_path):
  blocked = tmp_path / "a_file"
  blocked.write_text("")
  program_cache.enable(str(blocked / "programs"))  # a directory that cannot be created
  try:
    with absltest.mock.patch.object(program_cache.logging, "warning") as warning:
      result = run(program_cache.jit(sgd_step, name="step", key="sgd"))
  finally:
    program_cache.enable(None)
  assert_bitwise_equal(result, run(jax.jit(sgd_step)))
  assert "not stored" in warning.call_args[0][0]


def test_unexportable_program_runs_as_jax_jit(store):
  def with_callback(x):
    return jax.pure_callback(np.sin, jax.ShapeDtypeStruct(x.shape, x.dtype), x) + 1.0

  f = program_cache.jit(with_callback, name="cb", key="k")
  with absltest.mock.patch.object(program_cache.logging, "warning") as warning:
    np.testing.assert_allclose(f(jnp.arange(3.0)), np.sin(np.arange(3.0)) + 1.0, rtol=1e-6)
  assert "not exported" in warning.call_args[0][0] and os.listdir(store) == []


def test_inside_a_trace_and_without_a_directory_it_is_jax_jit(store):
  f = program_cache.jit(sgd_step, name="step", key="sgd")
  shapes = jax.eval_shape(f, fresh_state(), BATCH)
  assert shapes[1]["loss"].shape == () and os.listdir(store) == []
  program_cache.enable(None)
  assert hasattr(program_cache.jit(sgd_step, name="step", key="sgd"), "lower")  # a jax.jit
  assert hasattr(program_cache.jit(sgd_step, name="step", key=None), "lower")
  with pytest.raises(ValueError, match="name must be letters"):
    program_cache.jit(sgd_step, name="a/b", key="sgd")


def test_shard_map_step_on_eight_devices_matches_jax_jit(store):
  """The data-parallel step (parallel.make_parallel_step) through the program cache."""

  def body(state, batch, *, axis_name):
    def loss_fn(params):
      pred = jnp.tanh(batch["x"] @ params["w"]) @ params["v"]
      return jnp.mean((pred - batch["y"]) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    grads = jax.lax.pmean(grads, axis_name)
    updates, opt_state = OPTIMIZER.update(grads, state.opt_state, state.params)
    new = State(optax.apply_updates(state.params, updates), opt_state, state.step + 1)
    return new, {"loss": jax.lax.pmean(loss, axis_name)}

  assert jax.device_count() >= 8
  results = []
  for jit_fn in (jax.jit, functools.partial(program_cache.jit, name="sm", key="body")):
    for _ in range(2):  # the second program_cache step loads what the first stored
      pstep = parallel.make_parallel_step(body, mode="shard_map", jit_fn=jit_fn)
      state = pstep.put_state(fresh_state())
      for _ in range(2):
        state, metrics = pstep(state, pstep.shard_batch(BATCH))
      results.append(jax.tree.leaves(state) + [metrics["loss"]])
  for r in results[1:]:
    assert_bitwise_equal(r, results[0])
  assert len(os.listdir(store)) == 1
