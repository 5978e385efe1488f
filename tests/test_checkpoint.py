"""Tests for jaxrm.io.checkpoint (orbax CheckpointManager wrapper)."""

import json
import logging
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrm.io import checkpoint, rundir
from jaxrm.steps import train_state as ts


def make_state(seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  params = {"embed": jax.random.normal(k1, (7, 3)), "w": jax.random.normal(k2, (3,))}
  optimizer = optax.adamw(1e-2)
  state = ts.create_train_state(params, optimizer, jax.random.key(seed + 100))
  grads = jax.tree.map(jnp.ones_like, params)
  state, _ = ts.apply_if_finite(state, grads, jnp.float32(1.0), optimizer)  # non-trivial
  return state._replace(step=jnp.int32(seed), num_skipped=jnp.int32(seed % 3))


def host(tree):
  def leaf(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(x)

  return jax.tree.map(leaf, tree)


def assert_bitwise_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(host(a)), jax.tree.leaves(host(b))):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x, y)


def test_save_restore_round_trip_is_bitwise(tmp_path):
  state = make_state(5)
  extra = {
    "data": {"epoch": 1, "position": 37, "seed": 3},
    "config": {"lr": 1e-2},
    "loss": np.float32(0.25),
    "hist": np.arange(3),
  }
  with checkpoint.CheckpointManager(tmp_path / "ckpt") as ckpt:
    assert ckpt.save(5, state, extra)
  with checkpoint.CheckpointManager(tmp_path / "ckpt") as ckpt:  # a fresh process
    restored, got_extra, step = ckpt.restore_latest(template=make_state(0))
  assert step == 5
  assert isinstance(restored, ts.TrainState)
  assert_bitwise_equal(restored, state)
  assert jnp.issubdtype(restored.key.dtype, jax.dtypes.prng_key)
  assert jax.random.key_impl(restored.key) == jax.random.key_impl(state.key)
  np.testing.assert_array_equal(
    jax.random.normal(restored.key, (4,)), jax.random.normal(state.key, (4,))
  )
  assert got_extra == {
    "data": {"epoch": 1, "position": 37, "seed": 3},
    "config": {"lr": 1e-2},
    "loss": 0.25,
    "hist": [0, 1, 2],
  }


def test_restore_latest_on_empty_directory_returns_none(tmp_path):
  with checkpoint.CheckpointManager(tmp_path / "empty") as ckpt:
    assert ckpt.restore_latest(template=make_state()) is None
    assert ckpt.latest_step() is None


def test_restore_accepts_shape_dtype_struct_template_and_plain_pytrees(tmp_path):
  tree = {
    "a": jnp.arange(4, dtype=jnp.int32),
    "b": {"c": jnp.ones((2, 2), jnp.bfloat16)},
    "key": jax.random.key(3, impl="rbg"),
  }
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
  with checkpoint.CheckpointManager(tmp_path) as ckpt:
    ckpt.save(0, tree)
    restored, extra = ckpt.restore(0, template)
  assert_bitwise_equal(restored, tree)
  assert extra == {}


def test_keeps_last_n_checkpoints(tmp_path):
  state = make_state()
  with checkpoint.CheckpointManager(tmp_path, max_to_keep=2) as ckpt:
    for step in range(0, 50, 10):
      ckpt.save(step, state, {"step": step})
    assert ckpt.all_steps() == [30, 40]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["30", "40"]


def test_best_checkpoint_is_kept_besides_the_last_n(tmp_path):
  state = make_state()
  accuracy = {1: 0.6, 2: 0.9, 3: 0.7, 4: float("nan"), 5: 0.8, 6: 0.75}
  with checkpoint.CheckpointManager(tmp_path, max_to_keep=2, best_metric="acc") as ckpt:
    for step, acc in accuracy.items():
      ckpt.save(step, state, metrics={"acc": acc, "loss": 1.0 - acc})
    assert ckpt.all_steps() == [2, 5, 6]
    assert ckpt.best_step() == 2
  with checkpoint.CheckpointManager(
    tmp_path, max_to_keep=2, best_metric="loss", best_mode="min"
  ) as ckpt:  # reopened: metrics persist
    assert ckpt.best_step() == 2
    with pytest.raises(ValueError, match="must contain best_metric 'loss'"):
      ckpt.save(7, state, metrics={"acc": 0.1})


def test_saving_an_existing_step_is_a_no_op(tmp_path):
  with checkpoint.CheckpointManager(tmp_path) as ckpt:
    assert ckpt.save(3, make_state(1), {"v": 1})
    assert not ckpt.save(3, make_state(2), {"v": 2})
    restored, extra = ckpt.restore(3, make_state())
  assert extra == {"v": 1}
  assert_bitwise_equal(restored, make_state(1))


def _truncate_files(step_dir: pathlib.Path, subdir: str):
  files = [p for p in (step_dir / subdir).rglob("*") if p.is_file()]
  assert files
  for p in files:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _delete_array_data(step_dir: pathlib.Path, subdir: str):
  files = [p for p in (step_dir / subdir).rglob("*") if p.is_file() and p.parent.name == "d"]
  assert files
  for p in files:
    p.unlink()


@pytest.mark.parametrize(
  "damage, subdir",
  [
    (_truncate_files, "state"),
    (_delete_array_data, "state"),
    (_truncate_files, "extra"),
    (_truncate_files, "metrics"),
  ],
)
def test_damaged_latest_checkpoint_falls_back_to_previous_with_warning(
  tmp_path, caplog, damage, subdir
):
  with checkpoint.CheckpointManager(tmp_path, max_to_keep=3, best_metric="acc") as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, make_state(step), {"step": step}, metrics={"acc": step / 10})
  damage(tmp_path / "3", subdir)
  with caplog.at_level(logging.WARNING):
    with checkpoint.CheckpointManager(tmp_path, max_to_keep=3, best_metric="acc") as ckpt:
      restored, extra, step = ckpt.restore_latest(template=make_state())
      assert step == 2 and extra == {"step": 2}
      assert_bitwise_equal(restored, make_state(2))
      assert ckpt.all_steps() == [1, 2]
      # The resumed run can save step 3 again.
      assert ckpt.save(3, make_state(7), {"step": 3}, metrics={"acc": 0.3})
      assert_bitwise_equal(ckpt.restore_latest(make_state())[0], make_state(7))
  messages = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
  assert "step 3" in messages
  assert (tmp_path / "3.corrupt").is_dir()  # kept for inspection, not deleted


def test_template_mismatch_raises_instead_of_discarding_checkpoints(tmp_path):
  with checkpoint.CheckpointManager(tmp_path) as ckpt:
    ckpt.save(1, {"w": jnp.zeros((3,))})
    ckpt.save(2, {"w": jnp.zeros((3,))})
    with pytest.raises(
      rundir.RunStopped, match="no checkpoint in .* could be restored: step 2"
    ) as e:
      ckpt.restore_latest(template={"w": jnp.zeros((4,))})
    assert "\n" not in str(e.value) and "use another --workdir" in str(e.value)  # one line
    assert ckpt.all_steps() == [1, 2]


@pytest.mark.parametrize(
  "tmp_name", ["2.orbax-checkpoint-tmp", "2.orbax-checkpoint-tmp-1234567890"]
)
def test_tmp_directory_of_an_interrupted_save_is_ignored_and_cleaned(tmp_path, tmp_name):
  with checkpoint.CheckpointManager(tmp_path) as ckpt:
    ckpt.save(1, make_state(1), {"step": 1})
  # What a save killed before its final rename leaves behind (the first name is what a
  # SIGKILL during orbax 0.12.8's save of step 2 was observed to leave).
  shutil.copytree(tmp_path / "1", tmp_path / tmp_name)
  with checkpoint.CheckpointManager(tmp_path) as ckpt:
    assert ckpt.all_steps() == [1]
    restored, extra, step = ckpt.restore_latest(template=make_state())
    assert step == 1 and extra == {"step": 1}
    assert_bitwise_equal(restored, make_state(1))
    ckpt.save(2, make_state(2))  # the background clean-up has finished before a save
    assert not (tmp_path / tmp_name).exists()
    assert ckpt.all_steps() == [1, 2]


def test_async_save_is_complete_after_close(tmp_path):
  with checkpoint.CheckpointManager(tmp_path, async_save=True, max_to_keep=1) as ckpt:
    ckpt.save(1, make_state(1))
    ckpt.save(2, make_state(2), {"step": 2})
  with checkpoint.CheckpointManager(tmp_path) as ckpt:
    restored, extra, step = ckpt.restore_latest(make_state())
  assert step == 2 and extra == {"step": 2}
  assert_bitwise_equal(restored, make_state(2))


def test_invalid_arguments_raise_value_error(tmp_path):
  with pytest.raises(ValueError, match="best_mode"):
    checkpoint.CheckpointManager(tmp_path, best_mode="largest")
  with checkpoint.CheckpointManager(tmp_path) as ckpt:
    with pytest.raises(ValueError, match="JSON-serialisable"):
      ckpt.save(0, make_state(), {"obj": object()})
    with pytest.raises(ValueError, match="non-negative"):
      ckpt.save(-1, make_state())


def test_round_trip_of_replicated_and_fsdp_sharded_state_keeps_shardings(tmp_path):
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from jaxrm.steps import parallel

  mesh = parallel.make_data_mesh()

  def big_state(seed):
    params = {"embed": jax.random.normal(jax.random.key(seed), (16, 3)), "w": jnp.ones((3,))}
    return ts.create_train_state(params, optax.adam(1e-3), jax.random.key(seed))

  state = big_state(1)
  placed = {
    "fsdp": parallel.shard_params(state, mesh, min_size=16),
    "replicated": jax.device_put(state, NamedSharding(mesh, P())),
  }
  template = {
    "fsdp": parallel.shard_params(big_state(0), mesh, min_size=16),
    "replicated": jax.device_put(big_state(0), NamedSharding(mesh, P())),
  }
  with checkpoint.CheckpointManager(tmp_path) as ckpt:
    ckpt.save(1, placed)
    restored, _, _ = ckpt.restore_latest(template)
  assert restored["fsdp"].params["embed"].sharding.spec == P("data")
  assert restored["fsdp"].opt_state[0].mu["embed"].sharding.spec == P("data")
  assert restored["replicated"].params["embed"].sharding.spec == P()
  assert_bitwise_equal(restored["fsdp"], state)
  assert_bitwise_equal(restored["replicated"], state)


# ------------------------------------------------------------------------------ integrity
def _largest_state_data_file(step_dir: pathlib.Path) -> pathlib.Path:
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  return max(files, key=lambda p: p.stat().st_size)


def _big_state(seed):
  """A state whose largest data file is mostly raw array bytes (64x64 float32)."""
  params = {"w": jax.random.normal(jax.random.key(seed), (64, 64)), "b": jnp.ones((3,))}
  return ts.create_train_state(params, optax.sgd(0.1), jax.random.key(seed))


def _save_three(directory, make=_big_state):
  with checkpoint.CheckpointManager(directory, max_to_keep=3) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, make(step), {"step": step, "data": {"position": 10 * step}})


def _warnings(caplog):
  return " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_a_flipped_byte_in_the_largest_state_file_is_detected_and_the_previous_step_used(
  tmp_path, caplog
):
  _save_three(tmp_path)
  path = _largest_state_data_file(tmp_path / "3")
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x01  # one bit, in the middle of the array bytes
  path.write_bytes(bytes(data))
  with caplog.at_level(logging.WARNING):
    with checkpoint.CheckpointManager(tmp_path, max_to_keep=3) as ckpt:
      restored, extra, step = ckpt.restore_latest(template=_big_state(0))
  assert step == 2 and extra == {"step": 2, "data": {"position": 20}}
  assert_bitwise_equal(restored, _big_state(2))
  messages = _warnings(caplog)
  assert "step 3" in messages and "does not match its sha256 digest" in messages
  assert (tmp_path / "3.corrupt").is_dir()


def test_restore_of_a_damaged_step_raises_integrity_error_naming_step_and_array(tmp_path):
  _save_three(tmp_path)
  path = _largest_state_data_file(tmp_path / "3")
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x80
  path.write_bytes(bytes(data))
  with checkpoint.CheckpointManager(tmp_path) as ckpt:
    with pytest.raises(checkpoint.CheckpointIntegrityError, match=r"step 3: array .*\['w'\]"):
      ckpt.restore(3, _big_state(0))


def test_an_edited_value_in_the_json_dict_is_detected(tmp_path, caplog):
  _save_three(tmp_path)
  path = tmp_path / "3" / "extra" / "metadata"
  text = path.read_text()
  assert '"position": 30' in text
  path.write_text(text.replace('"position": 30', '"position": 31'))  # still valid JSON
  with caplog.at_level(logging.WARNING):
    with checkpoint.CheckpointManager(tmp_path) as ckpt:
      _, extra, step = ckpt.restore_latest(template=_big_state(0))
  assert step == 2 and extra["data"] == {"position": 20}
  assert "JSON dict does not match its sha256 digest" in _warnings(caplog)


def test_a_step_directory_replaced_by_a_plain_file_falls_back_with_a_log_line(tmp_path, caplog):
  _save_three(tmp_path)
  shutil.rmtree(tmp_path / "3")
  (tmp_path / "3").write_text("not a checkpoint")
  with caplog.at_level(logging.WARNING):
    with checkpoint.CheckpointManager(tmp_path, max_to_keep=3) as ckpt:
      restored, extra, step = ckpt.restore_latest(template=_big_state(0))
      assert step == 2
      assert_bitwise_equal(restored, _big_state(2))
      assert ckpt.save(3, _big_state(7), {"step": 3})  # the step can be saved again
      assert ckpt.restore_latest(_big_state(0))[2] == 3
  messages = _warnings(caplog)
  assert "step 3" in messages and "not a directory" in messages
  assert (tmp_path / "3.corrupt").read_text() == "not a checkpoint"  # kept, not deleted


def test_a_checkpoint_without_digests_restores_unchecked(tmp_path):
  _save_three(tmp_path)
  path = tmp_path / "3" / "extra" / "metadata"
  extra = json.loads(path.read_text())
  assert set(extra[checkpoint.INTEGRITY_KEY]["arrays"]) >= {".params['w']", ".params['b']"}
  del extra[checkpoint.INTEGRITY_KEY]  # as written before digests existed
  path.write_text(json.dumps(extra))
  with checkpoint.CheckpointManager(tmp_path) as ckpt:
    restored, got, step = ckpt.restore_latest(template=_big_state(0))
  assert step == 3 and got == {"step": 3, "data": {"position": 30}}
  assert_bitwise_equal(restored, _big_state(3))


def test_the_integrity_key_is_reserved(tmp_path):
  with checkpoint.CheckpointManager(tmp_path) as ckpt:
    with pytest.raises(ValueError, match="reserved key '__integrity__'"):
      ckpt.save(1, make_state(), {checkpoint.INTEGRITY_KEY: 1})


def test_latest_extra_reads_the_json_of_the_newest_checkpoint_without_a_template(tmp_path):
  with checkpoint.CheckpointManager(tmp_path / "ckpt") as mgr:
    assert mgr.latest_extra() is None
    mgr.save(1, make_state(1), {"config": {"model": "tiny"}})
    mgr.save(2, make_state(2), {"config": {"model": "tiny"}, "n": 2})
    extra, step = mgr.latest_extra()
  assert step == 2 and extra == {"config": {"model": "tiny"}, "n": 2}


def test_a_failed_write_raises_one_line_naming_the_last_complete_checkpoint(tmp_path, monkeypatch):
  import orbax.checkpoint as ocp  # noqa: PLC0415

  real_save = ocp.CheckpointManager.save

  def save(self, step, *args, **kwargs):
    if step == 2:
      raise ValueError("RESOURCE_EXHAUSTED: Error writing local file") from OSError(28, "full")
    return real_save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", save)
  directory = tmp_path / "ckpt"
  with pytest.raises(checkpoint.CheckpointWriteError) as e:
    with checkpoint.CheckpointManager(directory) as mgr:
      mgr.save(1, make_state(1), {})
      mgr.save(2, make_state(2), {})
  message = str(e.value)
  assert "\n" not in message and "at step 2" in message and "no space left on device" in message
  assert f"the last complete checkpoint is step 1 in {directory}" in message
  monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
  with checkpoint.CheckpointManager(directory) as mgr:
    state, _, step = mgr.restore_latest(make_state(0))
  assert step == 1
  assert_bitwise_equal(state, make_state(1))


def test_a_bug_in_a_save_is_not_disguised_as_a_write_failure(tmp_path, monkeypatch):
  import orbax.checkpoint as ocp  # noqa: PLC0415

  def save(self, step, *args, **kwargs):
    raise ValueError("some bug")

  monkeypatch.setattr(ocp.CheckpointManager, "save", save)
  with pytest.raises(ValueError, match="some bug"):
    with checkpoint.CheckpointManager(tmp_path / "ckpt") as mgr:
      mgr.save(1, make_state(1), {})
