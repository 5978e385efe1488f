"""User mistakes of ``experiments/ensembles.py``: one line naming the field, exit status 2.

Every setting is checked before any stage runs, so each case stops in well under a second.
The study's own runs are tested in tests/test_ensembles.py.
"""

import os

import pytest

from jaxrm.io import rundir
from tests.script_runner import error_line, run_script


def _study(workdir, capfd, *extra):
  return run_script("ensembles", [f"--workdir={workdir}", "--quick", *extra], capfd)


@pytest.mark.parametrize(
  "arg, message",
  [
    ("--config.ensemble_size=1", "--config.ensemble_size=1: must be >= 2"),
    ("--config.num_ensembles=1", "--config.num_ensembles=1: must be >= 2"),
    ("--config.label_noises=(0.0,0.7)", "--config.label_noises=0.0,0.7: must lie in [0, 0.5]"),
    ("--config.label_noises=(0.25,0.25)", "--config.label_noises=0.25,0.25: must be distinct"),
    ("--config.label_noises=()", "--config.label_noises=: must be a non-empty tuple"),
    ("--config.uwo_coefs=(1.0,-2.0)", "--config.uwo_coefs=1.0,-2.0: must be a non-empty tuple"),
    ("--config.uwo_coefs=(1.0,1.0)", "--config.uwo_coefs=1.0,1.0: must be distinct"),
    ("--config.uwo_check_coef=3.0", "--config.uwo_check_coef=3.0: must be one of uwo_coefs"),
    ("--config.proxy_size=1x8x3", "--config.proxy_size=1x8x3: needs positive sizes"),
    ("--config.proxy_size=big", "--config.proxy_size=big: is not LAYERSxWIDTHxHEADS"),
    ("--config.world_seeds=(0,0)", "--config.world_seeds=0,0: must be distinct"),
    ("--config.world_seeds=(-1,)", "--config.world_seeds=-1: must be ints >= 0"),
    ("--config.bon_bootstrap=1", "--config.bon_bootstrap=1: must be >= 2"),
    ("--config.bon_max_n=100", "--config.bon_samples=64: must be >= bon_max_n=100"),
    ("--config.rl_learning_rate=nan", "--config.rl_learning_rate=nan: must be a finite number"),
    ("--config.rl_log_every=9", "--config.rl_log_every=9: must lie in [1, rl_steps=4]"),
    ("--config.rl_algorithm=ppo2", "--config.rl_algorithm=ppo2: must be one of"),
    ("--config.rl_eval_prompts=0", "--config.rl_eval_prompts=0: must be an int >= 1"),
    ("--config.num_comparisons=8", "--config.num_comparisons=8: size 8 is below rm_batch_size"),
  ],
)
def test_bad_setting_is_a_usage_error_naming_the_field(tmp_path, capfd, arg, message):
  result = _study(tmp_path / "w", capfd, arg)
  assert result.code == 2
  assert message in error_line(result)
  assert not os.path.exists(tmp_path / "w" / rundir.CONFIG_FILE)


def test_unknown_field_and_unusable_workdir_are_usage_errors(tmp_path, capfd):
  result = _study(tmp_path / "w", capfd, "--config.ensemble_count=3")
  assert result.code == 2 and "ensemble_count" in error_line(result)
  a_file = tmp_path / "a_file"
  a_file.write_text("keep me")
  result = _study(a_file, capfd)
  assert result.code == 2 and f"--workdir={a_file}: is a file" in error_line(result)
  assert a_file.read_text() == "keep me"
