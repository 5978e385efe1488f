"""User mistakes and failures of ``experiments/train_policy.py``: one line, no loss.

Each case runs the script's ``main`` in-process with absl flags (:mod:`tests.script_runner`),
generates its bad input here (tmp_path), and checks the exit status (2: usage error, 1: a run
that stopped), one ``error:`` line naming the cause with no traceback, that no NaN/inf reaches
a saved parameter, and that nothing was lost (the last checkpoint restores; the same command
resumes). Resume exactness is tested in tests/test_train_policy.py.
"""

import errno
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxrm.io import rundir
from jaxrm.io.checkpoint import CheckpointManager
from tests.script_runner import error_line, run_script

WORLD = {"num_calibration": 256, "policy_layers": 1, "gold_layers": 1, "gold_width": 32}
BASE = [
  *[f"--config.world.{k}={v}" for k, v in WORLD.items()],
  "--config.reward.source=token_frequency",
  "--config.reward.token_id=3",
  "--config.rl.num_epochs=1",
  "--config.rl.num_minibatches=2",
  "--config.steps=2",
  "--config.batch_size=4",
  "--config.parallel=jit",
  "--config.log.log_every=1",
  "--config.log.checkpoint_every=1",
  "--config.log.plots=False",
]


def _train(workdir, capfd, *extra):
  return run_script("train_policy", [f"--workdir={workdir}", *BASE, *extra], capfd)


def _saved_steps(workdir):
  directory = os.path.join(workdir, rundir.CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _saved_params(workdir, step):
  """The parameter arrays of checkpoint ``step``, read without a template."""
  path = os.path.join(workdir, rundir.CHECKPOINT_DIR, str(step), "state")
  return ocp.StandardCheckpointer().restore(path)["params"]


def _all_finite(tree):
  return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize(
  "arg, message",
  [
    ("--config.optimizer.learning_rate=inf", "--config.optimizer.learning_rate=inf: must be a"),
    ("--config.rl.entropy_coef=inf", "--config.rl.entropy_coef=inf: must be a finite number"),
    ("--config.kl_coef=nan", "--config.kl_coef=nan: must be a finite number"),
    ("--config.rl.target_kl=-inf", "--config.rl.target_kl=-inf: must be a finite number"),
    ("--config.max_consecutive_skips=-2", "--config.max_consecutive_skips=-2: must be an int"),
    ("--workdir=", "--workdir=: must name a directory"),
  ],
)
def test_bad_setting_is_a_usage_error_naming_the_field(tmp_path, capfd, arg, message):
  result = run_script("train_policy", [f"--workdir={tmp_path}/w", *BASE, arg], capfd)
  assert result.code == 2
  assert message in error_line(result)
  assert not _saved_steps(tmp_path / "w")


def test_eos_id_outside_the_byte_policys_vocabulary_is_a_usage_error(tmp_path, capfd):
  args = ["--config=experiments/configs/policy.py:byte", "--config.steps=1"]
  args += ["--config.batch_size=8", "--config.rl.max_new_tokens=8", "--config.rl.eos_id=300"]
  result = run_script("train_policy", [f"--workdir={tmp_path}/w", *args], capfd)
  assert result.code == 2
  assert "--config.rl.eos_id=300: is outside the policy's vocabulary [0, 259)" in error_line(result)
  assert not _saved_steps(tmp_path / "w")


def test_workdir_that_is_a_file_is_a_usage_error(tmp_path, capfd):
  a_file = tmp_path / "a_file"
  a_file.write_text("keep me")
  result = _train(a_file, capfd)
  assert result.code == 2 and f"--workdir={a_file}: is a file" in error_line(result)
  assert a_file.read_text() == "keep me"


def test_reward_model_run_without_a_checkpoint_is_a_usage_error(tmp_path, capfd):
  no_run = tmp_path / "no_run"
  no_run.mkdir()
  empty_run = tmp_path / "empty_run"
  (empty_run / rundir.CHECKPOINT_DIR).mkdir(parents=True)
  for rm_dir, message in [
    (no_run, "is not a reward-model run directory"),
    (empty_run, "holds no saved checkpoint yet"),
  ]:
    result = _train(
      tmp_path / "w", capfd, "--config.reward.source=rm", f"--config.reward.rm_dirs=('{rm_dir}',)"
    )
    line = error_line(result)
    assert result.code == 2 and "--config.reward.rm_dirs=" in line and message in line


def test_resume_with_another_algorithm_is_refused_before_any_restore(tmp_path, capfd):
  workdir = tmp_path / "w"
  first = _train(workdir, capfd, "--config.steps=1")
  assert first.code == 0, first.stderr[-3000:]
  result = _train(workdir, capfd, "--config.steps=1", "--config.algo=rloo")
  line = error_line(result)
  assert result.code == 2 and "--config.algo=rloo: differs from the checkpointed run" in line
  assert "partial_restore" not in result.stderr
  assert _saved_steps(workdir) == [1] and _all_finite(_saved_params(workdir, 1))


def test_diverging_run_stops_naming_the_last_good_checkpoint_and_saves_no_nan(tmp_path, capfd):
  # learning_rate=1e30: every update is non-finite and skipped; the parameters stay finite.
  workdir = tmp_path / "w"
  result = _train(
    workdir,
    capfd,
    "--config.optimizer.learning_rate=1e30",
    "--config.steps=6",
    "--config.max_consecutive_skips=2",
  )
  line = error_line(result)
  assert result.code == 1 and "updates were skipped" in line, result.stderr[-3000:]
  saved = _saved_steps(workdir)
  assert saved and f"last good checkpoint: step {saved[-1]} in {workdir}" in line
  assert "num_skipped" in result.stderr  # the progress line counts the skipped updates
  for step in saved:
    assert _all_finite(_saved_params(workdir, step)), step


def test_raise_mode_stops_with_one_line_at_the_first_nonfinite_update(tmp_path, capfd):
  workdir = tmp_path / "w"
  result = _train(
    workdir,
    capfd,
    "--config.optimizer.learning_rate=1e30",
    "--config.steps=6",
    "--config.rl.nonfinite=raise",
  )
  line = error_line(result)
  # With learning_rate=1e30 the very first update is already non-finite.
  assert result.code == 1 and "non-finite update at step 1" in line
  assert "--config.rl.nonfinite=raise" in line
  assert "last good checkpoint: none (no checkpoint was saved)" in line
  assert _saved_steps(workdir) == []


def test_full_disk_at_a_checkpoint_keeps_the_last_one_and_the_rerun_resumes(
  tmp_path, capfd, monkeypatch
):
  workdir = tmp_path / "w"
  real_save = ocp.CheckpointManager.save

  def save(self, step, *args, **kwargs):
    if step == 2:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.directory))
    return real_save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", save)
  result = _train(workdir, capfd)
  line = error_line(result)
  assert result.code == 1 and "could not write the checkpoint at step 2" in line
  assert f"the last complete checkpoint is step 1 in {workdir}/{rundir.CHECKPOINT_DIR}" in line
  monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
  rerun = _train(workdir, capfd)
  assert rerun.code == 0, rerun.stderr[-3000:]
  assert "Resuming from the checkpoint at step 1" in rerun.stderr
  assert _saved_steps(workdir) == [1, 2]
  with CheckpointManager(os.path.join(workdir, rundir.CHECKPOINT_DIR)) as ckpt:
    assert ckpt.latest_step() == 2


def test_out_of_memory_is_one_line_naming_it_not_a_full_disk(tmp_path, capfd, monkeypatch):
  # XLA reports an out-of-memory allocation as RESOURCE_EXHAUSTED, as it does a full disk
  def save(self, step, *args, **kwargs):
    raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 1024 bytes.")

  monkeypatch.setattr(ocp.CheckpointManager, "save", save)
  result = _train(tmp_path / "w", capfd)
  line = error_line(result)
  assert result.code == 1 and "out of memory: RESOURCE_EXHAUSTED: Out of memory allocating" in line
  assert "no space" not in line and "lower what a step holds" in line
