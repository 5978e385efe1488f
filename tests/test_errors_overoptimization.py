"""User mistakes and failures of ``experiments/overoptimization.py``: one line, no traceback.

The study's settings are checked before any stage runs, so every case here stops in well under
a second: bad values (non-finite, out of range, malformed proxy sizes) are usage errors with
the same ``<script>: error: --config.<field>=<value>: <why>`` line and exit status 2 as the
training scripts; an unusable ``--workdir`` too; a full disk is one line with status 1.
The study's own runs (resume from stage caches) are tested in tests/test_overoptimization.py.
"""

import errno
import os

import pytest

from jaxrm.io import files, rundir
from tests.script_runner import error_line, run_script


def _study(workdir, capfd, *extra):
  return run_script("overoptimization", [f"--workdir={workdir}", "--quick", *extra], capfd)


@pytest.mark.parametrize(
  "arg, message",
  [
    ("--config.rl_learning_rate=inf", "--config.rl_learning_rate=inf: must be a finite number"),
    ("--config.rl_learning_rate=-1", "--config.rl_learning_rate=-1.0: must be a number > 0"),
    ("--config.rm_learning_rate=0", "--config.rm_learning_rate=0.0: must be a number > 0"),
    ("--config.kl_coef=nan", "--config.kl_coef=nan: must be a finite number"),
    ("--config.ppo.entropy_coef=inf", "--config.ppo.entropy_coef=inf: must be a finite number"),
    ("--config.proxy_sizes=('0x8x2',)", "--config.proxy_sizes=0x8x2: needs positive sizes"),
    ("--config.proxy_sizes=('1x8x3',)", "--config.proxy_sizes=1x8x3: needs positive sizes"),
    ("--config.proxy_sizes=('big',)", "--config.proxy_sizes=big: is not LAYERSxWIDTHxHEADS"),
    ("--config.num_seeds=0", "--config.num_seeds=0: must be >= 1"),
    ("--config.num_heldout=0", "--config.num_heldout=0: must be >= 1"),
    (
      "--config.proxy_sizes=('1x8x2','1x8x4')",
      "--config.proxy_sizes=1x8x2,1x8x4: must have distinct layers x width",
    ),
    ("--config.rl_batch_size=0", "--config.rl_batch_size=0: must be an int >= 1"),
    ("--config.label_noise=0.9", "--config.label_noise=0.9: must lie in [0, 0.5]"),
    ("--config.world_seeds=(0,0)", "--config.world_seeds=0,0: must be distinct"),
    ("--config.world_seeds=()", "--config.world_seeds=: must name >= 1 seed"),
    ("--config.world_seeds=(-1,)", "--config.world_seeds=-1: must be ints >= 0"),
    ("--config.bon_bootstrap=1", "--config.bon_bootstrap=1: must be >= 2"),
    ("--config.tilted_betas=(0.5,-1.0)", "--config.tilted_betas=0.5,-1.0: must be a non-empty"),
    # RL settings are checked with the others, before the first stage (not when RL starts).
    ("--config.rl_algorithm=ppo2", "--config.rl_algorithm=ppo2: must be one of"),
    ("--config.kl_sweep_reward=L9W9", "--config.kl_sweep_reward=L9W9: must name a proxy size"),
    ("--config.rl_eval_prompts=0", "--config.rl_eval_prompts=0: must be an int >= 1"),
  ],
)
def test_bad_setting_is_a_usage_error_naming_the_field(tmp_path, capfd, arg, message):
  result = _study(tmp_path / "w", capfd, arg)
  assert result.code == 2
  assert message in error_line(result)
  assert not os.path.exists(tmp_path / "w" / rundir.CONFIG_FILE)


def test_a_bare_proxy_size_is_a_usage_error(tmp_path, capfd):
  # Not a tuple: either parsed as one size or refused in one line, never a deep ValueError.
  result = _study(tmp_path / "w", capfd, "--config.proxy_sizes=0x8x2")
  assert result.code == 2 and "--config.proxy_sizes" in error_line(result)


def test_unusable_workdir_is_a_usage_error(tmp_path, capfd):
  a_file = tmp_path / "a_file"
  a_file.write_text("keep me")
  result = _study(a_file, capfd)
  assert result.code == 2 and f"--workdir={a_file}: is a file" in error_line(result)
  assert a_file.read_text() == "keep me"
  result = _study("", capfd)
  assert result.code == 2 and "--workdir=: must name a directory" in error_line(result)


def test_full_disk_is_one_line_with_status_1(tmp_path, capfd, monkeypatch):
  def atomic_write(path, data):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))

  monkeypatch.setattr(files, "atomic_write", atomic_write)
  workdir = tmp_path / "w"
  result = _study(workdir, capfd)
  line = error_line(result)
  assert result.code == 1
  assert f"could not write {workdir}/{rundir.CONFIG_FILE}: no space left on device" in line
