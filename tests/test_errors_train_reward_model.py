"""User mistakes and failures of ``experiments/train_reward_model.py``: one line, no loss.

Each case runs the script's ``main`` in-process with absl flags (:mod:`tests.script_runner`),
generates its bad input here (tmp_path), and checks the exit status (2: usage error, 1: a run
that stopped), that stderr holds one ``error:`` line naming the cause and no traceback, and
that nothing was lost (the last good checkpoint restores; the corrected command runs).
The SIGKILL and damaged-checkpoint cases are in tests/test_train_reward_model.py.
"""

import errno
import gzip
import json
import logging
import os
import pathlib
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxrm.data import pairs, synthetic
from jaxrm.io import rundir
from jaxrm.train import rm_eval
from tests.script_runner import error_line, run_script

TINY_WORLD = {
  "policy_layers": 1,
  "policy_width": 16,
  "gold_layers": 1,
  "gold_width": 32,
  "num_calibration": 256,
}
PAIRS = 128
BASE = [
  f"--config.data.synthetic.pairs={PAIRS}",
  *[f"--config.data.synthetic.world.{k}={v}" for k, v in TINY_WORLD.items()],
  "--config.data.test_fraction=0.25",
  "--config.batch_size=16",
  "--config.steps=4",
  "--config.optimizer.warmup_steps=0",
  "--config.eval.every=2",
  "--config.log.log_every=1",
  "--config.log.checkpoint_every=2",
  "--config.parallel=jit",
  "--config.eval.report=False",
  "--config.log.plots=False",
]
# A byte-level run on a JSONL file (built into a TFDS dataset under <workdir>/data).
FILE_RUN = [
  "--config.batch_size=4",
  "--config.steps=2",
  "--config.data.max_len=64",
  "--config.eval.every=2",
  "--config.log.checkpoint_every=2",
  "--config.parallel=jit",
  "--config.eval.report=False",
  "--config.log.plots=False",
]


@pytest.fixture(scope="module")
def synthetic_npz(tmp_path_factory):
  """The tiny world's comparisons, made once and copied into each run's data directory."""
  workdir = tmp_path_factory.mktemp("synthetic_cache")
  config = pairs.SyntheticConfig(world=synthetic.WorldConfig(**TINY_WORLD), pairs=PAIRS)
  pairs.synthetic_comparisons(config, workdir)
  return workdir / rundir.DATA_DIR / pairs.SYNTHETIC_FILE


def _workdir(path, synthetic_npz):
  os.makedirs(path / rundir.DATA_DIR, exist_ok=True)
  shutil.copy(synthetic_npz, path / rundir.DATA_DIR)
  return path


def _train(workdir, capfd, *extra):
  return run_script("train_reward_model", [f"--workdir={workdir}", *BASE, *extra], capfd)


def _saved_steps(workdir):
  directory = os.path.join(workdir, rundir.CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _all_finite(tree):
  return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tree))


def _jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


def _records(n):
  return [
    {"prompt": f"Q{i}?", "chosen": f" yes {i} " * 3, "rejected": f" no {i}" * (1 + i % 3)}
    for i in range(n)
  ]


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
  "arg, message",
  [
    ("--config.optimizer.learning_rate=inf", "--config.optimizer.learning_rate=inf: must be"),
    ("--config.optimizer.learning_rate=-1", "--config.optimizer.learning_rate=-1.0: must be > 0"),
    ("--config.loss.center_coef=nan", "--config.loss.center_coef=nan: must be a finite number"),
    ("--config.loss.label_smoothing=1e400", "--config.loss.label_smoothing=inf"),
    ("--config.data.max_len=1000000000", "--config.data.max_len=1000000000: must be an int in"),
    ("--config.data.max_len=4", "--config.data.max_len=4: must be an int in [8,"),
    ("--config.max_consecutive_skips=-1", "--config.max_consecutive_skips=-1: must be"),
    ("--config.model.attention_query_block=0", "--config.model.attention_query_block=0: must"),
    ("--workdir=", "--workdir=: must name a directory"),
  ],
)
def test_bad_setting_is_a_usage_error_naming_the_field(tmp_path, capfd, arg, message):
  result = run_script("train_reward_model", [f"--workdir={tmp_path}/w", *BASE, arg], capfd)
  assert result.code == 2
  assert message in error_line(result)
  assert not os.path.exists(tmp_path / "w" / rundir.CHECKPOINT_DIR)


def test_workdir_that_is_a_file_or_not_writable_is_a_usage_error(tmp_path, capfd):
  a_file = tmp_path / "a_file"
  a_file.write_text("not a directory")
  result = _train(a_file, capfd)
  assert result.code == 2 and f"--workdir={a_file}: is a file" in error_line(result)
  assert a_file.read_text() == "not a directory"
  below_file = a_file / "run"
  result = _train(below_file, capfd)
  assert result.code == 2 and f"--workdir={below_file}: cannot be created" in error_line(result)
  # Not writable: a read-only directory (root ignores mode bits, so use /proc, read-only).
  read_only = tmp_path / "read_only"
  read_only.mkdir()
  read_only.chmod(0o555)
  target = "/proc/self" if os.geteuid() == 0 else read_only
  result = _train(target, capfd)
  assert result.code == 2 and f"--workdir={target}: is not writable" in error_line(result)


# ----------------------------------------------------------------------------- data


def test_bad_data_files_name_the_file_and_exit_2(tmp_path, capfd):
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  blank = tmp_path / "blank.jsonl"
  blank.write_text("\n  \n\n")
  not_gzip = tmp_path / "fake.jsonl.gz"
  not_gzip.write_bytes(b"this is not gzip data\n")
  empty_gz = tmp_path / "empty.jsonl.gz"
  with gzip.open(empty_gz, "wb"):
    pass
  huge = _jsonl(tmp_path / "huge.jsonl", [*_records(6), {**_records(1)[0], "weight": 1e300}])
  deep = tmp_path / "deep.jsonl"
  deep.write_text("[" * 100_000 + "]" * 100_000 + "\n")
  cases = [
    (empty, f"{empty}"),
    (blank, f"{blank}"),
    (not_gzip, f"{not_gzip}"),
    (empty_gz, f"{empty_gz}"),
    (huge, f"{huge}:7: field 'weight'"),
    (deep, f"{deep}:1"),
    (tmp_path, "is a directory, not a data file"),
    (pathlib.Path("/dev/null"), "is not a regular file"),
  ]
  for path, message in cases:
    workdir = tmp_path / f"w_{path.name or 'dir'}"
    result = run_script(
      "train_reward_model",
      [f"--workdir={workdir}", *FILE_RUN, f"--config.data.files=('{path}',)"],
      capfd,
    )
    line = error_line(result)
    assert result.code == 2 and message in line, (path, line)
    assert "skip_malformed" not in line or path in (huge, deep), (path, line)
    assert not _saved_steps(workdir)


def test_a_refused_run_leaves_the_workdir_usable_for_the_corrected_command(tmp_path, capfd):
  one = _jsonl(tmp_path / "one.jsonl", _records(1))
  eight = _jsonl(tmp_path / "eight.jsonl", _records(8))
  workdir = tmp_path / "w"
  args = [f"--workdir={workdir}", *FILE_RUN]
  too_few = run_script(
    "train_reward_model",
    [*args, f"--config.data.files=('{one}',)", "--config.data.test_fraction=0.5"],
    capfd,
  )
  assert too_few.code == 2 and "got no preference pairs" in error_line(too_few)
  assert "skip_malformed" not in error_line(too_few)
  # Built, then refused: the batch is larger than the training split.
  too_big = run_script(
    "train_reward_model",
    [*args, f"--config.data.files=('{eight}',)", "--config.batch_size=16"],
    capfd,
  )
  assert too_big.code == 2 and "--config.batch_size=16: exceeds" in error_line(too_big)
  # The corrected command is not refused for what the failed ones left in data/.
  fixed = run_script(
    "train_reward_model",
    [*args, f"--config.data.files=('{eight}',)", "--config.data.test_fraction=0"],
    capfd,
  )
  assert fixed.code == 0, fixed.stderr[-3000:]
  assert _saved_steps(workdir) == [2]
  # Once a checkpoint depends on the dataset, other data is refused, naming the field.
  other = run_script(
    "train_reward_model",
    [*args, f"--config.data.files=('{one}',)", "--config.data.test_fraction=0"],
    capfd,
  )
  assert other.code == 2 and "--config.data.files=" in error_line(other)
  assert rm_eval.restore_run(workdir).step == 2


# ----------------------------------------------------------------------------- non-finite


def test_consecutive_skipped_updates_stop_the_run_naming_the_last_good_checkpoint(
  tmp_path, capfd, caplog, synthetic_npz
):
  caplog.set_level(logging.INFO)
  workdir = _workdir(tmp_path / "w", synthetic_npz)
  # center_coef=1e38 makes every loss infinite: every update is skipped.
  result = _train(
    workdir,
    capfd,
    "--config.loss.center_coef=1e38",
    "--config.max_consecutive_skips=2",
    "--config.log.checkpoint_every=1",
  )
  line = error_line(result)
  assert result.code == 1
  assert "stopped at step 2: the last 2 updates were skipped" in line
  assert f"last good checkpoint: step 1 in {workdir}/{rundir.CHECKPOINT_DIR}" in line
  # The progress line of step 1 counts the skipped update.
  assert any("step 1/4 |" in m and "skipped 1 |" in m for m in caplog.messages), caplog.messages
  assert _saved_steps(workdir) == [1]
  run = rm_eval.restore_run(workdir)
  assert run.step == 1 and int(run.state.num_skipped) == 1 and _all_finite(run.state.params)


def test_a_run_whose_every_update_is_skipped_fails_instead_of_reporting(
  tmp_path, capfd, synthetic_npz
):
  workdir = _workdir(tmp_path / "w", synthetic_npz)
  result = _train(workdir, capfd, "--config.loss.center_coef=1e38")  # default limit 20 > 4 steps
  line = error_line(result)
  assert result.code == 1 and "the last 4 updates were skipped" in line
  assert f"last good checkpoint: step 2 in {workdir}" in line
  assert _saved_steps(workdir) == [2]
  assert _all_finite(rm_eval.restore_run(workdir).state.params)


@pytest.mark.parametrize("mode", ["skip", "raise"])
def test_huge_learning_rate_stops_with_one_line_and_saves_no_diverged_model(
  tmp_path, capfd, synthetic_npz, mode
):
  workdir = _workdir(tmp_path / "w", synthetic_npz)
  result = _train(
    workdir, capfd, "--config.optimizer.learning_rate=1e30", f"--config.nonfinite={mode}"
  )
  line = error_line(result)
  assert result.code == 1
  assert "last good checkpoint: none (no checkpoint was saved)" in line
  if mode == "raise":
    assert "non-finite" in line and "--config.nonfinite=raise" in line
  else:
    assert "held-out rewards are not finite" in line or "updates were skipped" in line
  assert _saved_steps(workdir) == []


def test_raise_mode_names_the_step_and_keeps_the_checkpoint(tmp_path, capfd, synthetic_npz):
  workdir = _workdir(tmp_path / "w", synthetic_npz)
  ok = _train(workdir, capfd, "--config.steps=2")
  assert ok.code == 0, ok.stderr[-3000:]
  before = rm_eval.restore_run(workdir)
  # A finished run does not resume; a new run in another workdir raises at its first step.
  bad = _train(tmp_path / "w2", capfd, "--config.nonfinite=raise", "--config.loss.center_coef=1e38")
  line = error_line(bad)
  assert bad.code == 1 and "at step 0" in line and "--config.nonfinite=raise" in line
  assert rm_eval.restore_run(workdir).step == before.step == 2


# ----------------------------------------------------------------------------- resume


def test_resume_with_another_model_is_refused_before_any_restore(tmp_path, capfd, synthetic_npz):
  workdir = _workdir(tmp_path / "w", synthetic_npz)
  first = _train(workdir, capfd, "--config.steps=2")
  assert first.code == 0, first.stderr[-3000:]
  for arg, field in [
    ("--config.model.preset=small", "--config.model.preset=small"),
    ("--config.model.pooling=mean", "--config.model.pooling=mean"),
    ("--config.loss.name=hinge", "--config.loss.name=hinge"),
  ]:
    result = _train(workdir, capfd, "--config.steps=2", arg)
    line = error_line(result)
    assert result.code == 2 and field in line and "differs from the checkpointed run" in line
    assert "partial_restore" not in result.stderr
  run = rm_eval.restore_run(workdir)
  assert run.step == 2 and run.config.model.preset == "tiny"


# ----------------------------------------------------------------------------- full disk


def test_full_disk_at_a_checkpoint_keeps_the_last_one_and_the_rerun_resumes(
  tmp_path, capfd, synthetic_npz, monkeypatch
):
  workdir = _workdir(tmp_path / "w", synthetic_npz)
  real_save = ocp.CheckpointManager.save

  def save(self, step, *args, **kwargs):
    if step == 4:  # a partial write, then the disk is full (as tensorstore reports it)
      os.makedirs(os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp-0"), exist_ok=True)
      raise ValueError(
        "RESOURCE_EXHAUSTED: Error writing local file: [OS error: No space left on device]"
      ) from OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", save)
  result = _train(workdir, capfd)
  line = error_line(result)
  assert result.code == 1
  assert "could not write the checkpoint at step 4" in line and "no space left on device" in line
  assert f"the last complete checkpoint is step 2 in {workdir}/{rundir.CHECKPOINT_DIR}" in line
  assert "Event loop is closed" not in result.stderr
  assert _saved_steps(workdir) == [2]
  monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
  rerun = _train(workdir, capfd)
  assert rerun.code == 0, rerun.stderr[-3000:]
  assert "Resuming from the checkpoint at step 2" in rerun.stderr
  assert _saved_steps(workdir) == [2, 4]
  rows = [(r["split"], r["step"]) for r in rundir.read_metrics(workdir / rundir.METRICS_FILE)]
  assert sorted(rows) == sorted(set(rows)) and ("train", 4) in rows and ("eval", 4) in rows


def test_full_disk_on_the_metrics_file_is_one_line(tmp_path, capfd, synthetic_npz, monkeypatch):
  workdir = _workdir(tmp_path / "w", synthetic_npz)
  real_write = rundir.MetricsWriter.write

  def write(self, row):
    if row["step"] >= 3:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)
    real_write(self, row)

  monkeypatch.setattr(rundir.MetricsWriter, "write", write)
  result = _train(workdir, capfd)
  line = error_line(result)
  assert result.code == 1
  assert f"could not write {workdir}/{rundir.METRICS_FILE}: no space left on device" in line
  assert _saved_steps(workdir) == [2]


# ----------------------------------------------------------------------------- evaluation


def test_a_tiny_held_out_split_is_flagged_not_reported_as_a_plain_accuracy(
  tmp_path, capfd, synthetic_npz
):
  workdir = _workdir(tmp_path / "w", synthetic_npz)
  result = _train(
    workdir,
    capfd,
    "--config.data.test_fraction=0.03",
    "--config.eval.report=True",
    "--config.log.log_every=3",  # rows at 3 and 4; checkpoints (with a skip check) at 2 and 4
  )
  assert result.code == 0, result.stderr[-3000:]
  train_rows = [
    r for r in rundir.read_metrics(workdir / rundir.METRICS_FILE) if r["split"] == "train"
  ]
  assert [(r["step"], r["steps_in_row"]) for r in train_rows] == [(3, 3), (4, 1)]
  assert "UNRELIABLE: only 4 held-out pair(s)" in result.stderr
  evals = [r for r in rundir.read_metrics(workdir / rundir.METRICS_FILE) if r["split"] == "eval"]
  assert evals and all("only 4 held-out pair(s)" in r["unreliable"] for r in evals)
  report = (workdir / "rm_report.md").read_text()
  assert "**Warning:** the test accuracy below is unreliable: only 4 held-out pair(s)" in report
