"""Tests of the run directory (jaxrm.io.rundir): resume rule, metrics truncation, atomic
writes, caches, progress/ETA, learning curves and the optional TensorBoard writer."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrm.io import metrics_file, rundir


@dataclasses.dataclass
class _Opt:
  learning_rate: float = 1e-3
  betas: tuple[float, ...] = (0.9, 0.99)


@dataclasses.dataclass
class _Cfg:
  steps: int = 10
  optimizer: _Opt = dataclasses.field(default_factory=_Opt)
  log: rundir.LogConfig = dataclasses.field(default_factory=rundir.LogConfig)


def test_resume_rule_allows_declared_fields_and_names_the_first_other_difference():
  saved = rundir.config_to_json(_Cfg())
  changed = _Cfg(steps=20, log=rundir.LogConfig(log_every=1, plots=False))
  rundir.check_resumable(
    saved, rundir.config_to_json(changed), changeable=("steps", "log"), workdir="/w"
  )
  bad = _Cfg(optimizer=_Opt(learning_rate=2e-3), steps=20)
  with pytest.raises(rundir.ConfigError) as e:
    rundir.check_resumable(saved, rundir.config_to_json(bad), changeable=("steps",), workdir="/w")
  assert e.value.field == "optimizer.learning_rate"
  assert e.value.flag_message().startswith("--config.optimizer.learning_rate=0.002: differs")
  assert "/w" in e.value.message and "0.001" in e.value.message
  # A field that is only on one side is a difference too (a config from another version).
  with pytest.raises(rundir.ConfigError, match="absent"):
    rundir.check_resumable({**saved, "extra": 1}, saved, changeable=(), workdir="/w")
  # Tuples and lists compare equal after the JSON round trip.
  rundir.check_resumable(json.loads(json.dumps(saved)), saved, changeable=(), workdir="/w")


def test_a_field_added_after_the_run_resumes_only_at_its_declared_value():
  current = rundir.config_to_json(_Cfg())
  saved = {k: v for k, v in current.items() if k != "steps"}  # a run from before ``steps``
  saved["optimizer"] = {"betas": [0.9, 0.99]}  # and from before ``optimizer.learning_rate``
  added = {"steps": 10, "optimizer.learning_rate": 1e-3}
  rundir.check_resumable(saved, current, changeable=(), added=added, workdir="/w")
  with pytest.raises(rundir.ConfigError, match="<absent>") as e:
    rundir.check_resumable(saved, current, changeable=(), added={"steps": 10}, workdir="/w")
  assert e.value.field == "optimizer.learning_rate"
  other = rundir.config_to_json(_Cfg(steps=11))
  with pytest.raises(rundir.ConfigError) as e:
    rundir.check_resumable(saved, other, changeable=(), added=added, workdir="/w")
  assert e.value.field == "steps" and "<absent>" in e.value.message
  # A saved value is compared as before, whatever ``added`` says.
  with pytest.raises(rundir.ConfigError, match="steps"):
    rundir.check_resumable(
      {**current, "steps": 12}, current, changeable=(), added=added, workdir="/w"
    )


def test_truncate_metrics_drops_rows_after_the_restored_step_and_torn_lines(tmp_path):
  path = tmp_path / rundir.METRICS_FILE
  with rundir.MetricsWriter(tmp_path, log=rundir.LogConfig(plots=False)) as w:
    for step in (1, 2, 3, 4):
      w.write({"step": step, "loss": 1.0 / step})
  with open(path, "a") as f:
    f.write('{"step": 5, "lo')  # torn by a kill
  assert rundir.truncate_metrics(path, max_step=2) == 3
  assert [r["step"] for r in rundir.read_metrics(path)] == [1, 2]
  assert rundir.truncate_metrics(path, max_step=2) == 0


def test_metrics_rows_are_strict_json_with_nonfinite_as_null(tmp_path):
  with rundir.MetricsWriter(tmp_path, log=rundir.LogConfig(plots=False)) as w:
    w.write({"step": 1, "loss": float("nan"), "score": np.float32(2.5), "n": np.int32(3)})
  line = (tmp_path / rundir.METRICS_FILE).read_text().strip()
  assert json.loads(line) == {"step": 1, "loss": None, "score": 2.5, "n": 3}
  assert "NaN" not in line


def test_atomic_write_leaves_no_temporary_file_and_replaces_the_old_content(tmp_path):
  path = tmp_path / "sub" / "x.json"
  rundir.write_json(path, {"a": (1, 2), "b": float("inf")})
  rundir.write_json(path, {"a": [3]})
  assert json.loads(path.read_text()) == {"a": [3]}
  rundir.write_npz(tmp_path / "a.npz", x=np.arange(3))
  with np.load(tmp_path / "a.npz") as f:
    np.testing.assert_array_equal(f["x"], [0, 1, 2])
  assert sorted(os.listdir(tmp_path)) == ["a.npz", "sub"]
  assert os.listdir(tmp_path / "sub") == ["x.json"]


def test_tree_cache_is_reused_only_for_the_same_fingerprint(tmp_path):
  tree = {"a": jnp.arange(3.0), "b": (jnp.ones((2, 2), jnp.int32),)}
  path = tmp_path / "c.npz"
  fp = rundir.fingerprint({"seed": 0})
  rundir.save_tree(path, tree, {"fingerprint": fp, "note": "x"})
  loaded, meta = rundir.load_tree(path, jax.eval_shape(lambda: tree), fp)
  jax.tree.map(np.testing.assert_array_equal, loaded, tree)
  assert meta["note"] == "x"
  assert rundir.load_tree(path, tree, rundir.fingerprint({"seed": 1})) is None
  path.write_bytes(b"torn")
  assert rundir.load_tree(path, tree, fp) is None


class _Clock:
  def __init__(self):
    self.t = 0.0

  def __call__(self):
    return self.t


def test_progress_eta_excludes_the_first_step_and_excluded_time():
  clock = _Clock()
  progress = rundir.Progress(101, items_per_step=8, clock=clock)
  clock.t = 30.0  # the first step compiles for 30 s
  progress.start(1)
  assert progress.eta(1) is None and "ETA -" in progress.line(1)
  clock.t = 40.0  # 10 more steps in 10 s, of which 5 s were an evaluation
  progress.exclude(5.0)
  assert progress.steps_per_sec(11) == pytest.approx(2.0)
  assert progress.items_per_sec(11) == pytest.approx(16.0)
  assert progress.eta(11) == pytest.approx(45.0)
  line = progress.line(11, {"loss": 0.5, "skipped": 0}, unit="pairs")
  assert line == "step 11/101 | loss 0.5 | skipped 0 | 16.0 pairs/s | ETA 0:00:45"
  assert rundir.format_duration(3725) == "1:02:05" and rundir.format_duration(None) == "-"


def test_learning_curves_are_written_beside_the_metrics_one_png_per_split(tmp_path):
  with rundir.MetricsWriter(tmp_path) as w:
    for step in (1, 2, 3):
      w.write({"step": step, "split": "train", "loss": 1.0 / step, "ok": True})
    w.write({"step": 3, "split": "eval", "accuracy": 0.6})
  for split in ("train", "eval"):
    data = (tmp_path / f"curves_{split}.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"


def test_curve_panels_group_quantiles_and_caption_the_columns_that_never_change():
  rows = [
    {"step": s, "split": "eval", "loss": 1.0 / s, "skipped": 0, "pairs": 230, "ok": True,
     "margin_q10": -s, "margin_q50": 0.5 * s, "margin_q90": s, "reward_q50": 2.0 * s,
     "gap_q10": 0.1, "gap_q90": 0.1 * s, "nan_at_2": None if s == 2 else 1.0}
    for s in (1, 2, 3)
  ]  # fmt: skip
  panels, constants = metrics_file.curve_panels(rows)
  assert panels == [
    ("loss", ["loss"]),
    ("margin quantiles", ["margin_q10", "margin_q50", "margin_q90"]),
    ("reward_q50", ["reward_q50"]),  # a quantile alone keeps its name
    ("gap_q90", ["gap_q90"]),  # its sibling gap_q10 never changes
    ("nan_at_2", ["nan_at_2"]),  # not constant: non-finite (None) in one row
  ]
  assert constants == {"skipped": 0, "pairs": 230, "gap_q10": 0.1}
  # One row: every column gets its panel (nothing to call constant); a column missing from a
  # row is not constant either.
  assert metrics_file.curve_panels(rows[:1])[1] == {}
  assert "skipped" in dict(metrics_file.curve_panels([rows[0], {"step": 4}])[0])


def test_curves_of_a_split_whose_columns_never_change_are_the_caption(tmp_path):
  with rundir.MetricsWriter(tmp_path) as w:
    for step in (1, 2):
      w.write({"step": step, "split": "eval", "num_pairs": 230, "accuracy": 0.5})
  data = (tmp_path / "curves_eval.png").read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n"


def test_tensorboard_events_are_written_when_asked(tmp_path):
  pytest.importorskip("tensorboardX")
  log = rundir.LogConfig(tensorboard=True, plots=False)
  with rundir.MetricsWriter(tmp_path, log=log) as w:
    w.write({"step": 1, "loss": 0.5})
  events = os.listdir(tmp_path / rundir.TENSORBOARD_DIR)
  assert events and events[0].startswith("events.out.tfevents")


def test_bad_log_config_names_the_field():
  with pytest.raises(rundir.ConfigError, match="must be an int >= 1") as e:
    rundir.validate_log_config(rundir.LogConfig(log_every=0))
  assert e.value.flag_message().startswith("--config.log.log_every=0:")


def test_finite_check_names_the_first_nonfinite_float_of_a_nested_config():
  @dataclasses.dataclass
  class Inner:
    coef: float = 1.0
    sizes: tuple[float, ...] = (1.0, 2.0)

  @dataclasses.dataclass
  class Outer:
    inner: Inner = dataclasses.field(default_factory=Inner)
    steps: int = 3
    name: str = "inf"  # a string that reads as inf is no float

  rundir.check_finite_fields(Outer())
  for inner, field in [
    (Inner(coef=float("inf")), "inner.coef"),
    (Inner(coef=np.float32("nan")), "inner.coef"),
    (Inner(sizes=(1.0, -np.inf)), "inner.sizes"),
  ]:
    with pytest.raises(rundir.ConfigError, match="must be a finite number") as e:
      rundir.check_finite_fields(Outer(inner=inner))
    assert e.value.field == field


def test_skip_monitor_counts_and_stops_after_the_configured_streak():
  monitor = rundir.SkipMonitor(3, total_steps=100, skipped=5)
  for step, bad in enumerate([True, True, False, True, True], start=1):
    monitor.update(step, bad, last_checkpoint="step 4 in /x")
  assert monitor.total == 9 and monitor.streak == 2
  with pytest.raises(rundir.RunStopped, match=r"stopped at step 6: the last 3 updates") as e:
    monitor.update(6, True, last_checkpoint="step 4 in /x")
  assert str(e.value).endswith("last good checkpoint: step 4 in /x")
  # A run shorter than the limit stops when every one of its updates was skipped.
  short = rundir.SkipMonitor(20, total_steps=2)
  short.update(1, True, last_checkpoint="none")
  with pytest.raises(rundir.RunStopped, match="the last 2 updates"):
    short.update(2, True, last_checkpoint="none")
  never = rundir.SkipMonitor(0, total_steps=5)
  for step in range(1, 6):
    never.update(step, True, last_checkpoint="none")
  assert never.total == 5


def test_prepare_refuses_an_empty_path_a_file_and_a_path_below_a_file(tmp_path):
  assert rundir.prepare(tmp_path / "new" / "run") == str(tmp_path / "new" / "run")
  a_file = tmp_path / "f"
  a_file.write_text("x")
  for path, message in [
    ("", "must name a directory"),
    (a_file, "is a file"),
    (a_file / "r", "cannot be created"),
  ]:
    with pytest.raises(rundir.ConfigError, match=message) as e:
      rundir.prepare(path)
    assert e.value.field == "workdir"
  assert a_file.read_text() == "x"


def test_write_failure_finds_the_cause_in_wrapped_errors():
  enospc = OSError(28, "No space left on device")
  assert rundir.write_failure(enospc) == "no space left on device"
  try:
    try:
      raise enospc
    except OSError as inner:
      raise RuntimeError("Event loop is closed") from inner
  except RuntimeError as outer:
    assert rundir.write_failure(outer) == "no space left on device"
  assert (
    rundir.write_failure(ValueError("RESOURCE_EXHAUSTED: writing")) == "no space left on device"
  )
  assert rundir.write_failure(ValueError("a bug")) is None
  # XLA's out-of-memory error is RESOURCE_EXHAUSTED too, and is no full disk
  oom = RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 8986644048296 bytes.\nmore")
  assert rundir.write_failure(oom) is None
  assert (
    rundir.out_of_memory(oom) == "RESOURCE_EXHAUSTED: Out of memory allocating 8986644048296 bytes."
  )
  try:
    try:
      raise MemoryError()
    except MemoryError as inner:
      raise ValueError("while building the batch") from inner
  except ValueError as outer:
    assert rundir.out_of_memory(outer) == "MemoryError" and rundir.write_failure(outer) is None
  assert rundir.out_of_memory(OSError(28, "No space left on device")) is None
  assert rundir.write_failure(FileNotFoundError(2, "missing")) is None  # a bug, or a read
