"""User mistakes of ``experiments/dpl.py``: one line naming the field, exit 2, no traceback.

The study's settings are checked before any stage runs, so every case stops at once and
writes nothing into ``--workdir``.
"""

import os

import pytest

from jaxrm.io import rundir
from tests.script_runner import error_line, run_script


def _study(workdir, capfd, *extra):
  return run_script("dpl", [f"--workdir={workdir}", "--quick", *extra], capfd)


@pytest.mark.parametrize(
  "arg, message",
  [
    ("--config.rm_learning_rate=inf", "--config.rm_learning_rate=inf: must be a finite number"),
    ("--config.rm_learning_rate=0", "--config.rm_learning_rate=0.0: must be a number > 0"),
    ("--config.num_seeds=0", "--config.num_seeds=0: must be an int >= 1"),
    ("--config.num_atoms=1", "--config.num_atoms=1: must be >= 2"),
    ("--config.atom_low=2.0", "--config.atom_low=2.0: must be < atom_high=1.0"),
    ("--config.alpha=0.7", "--config.alpha=0.7: must lie in (0, 0.5)"),
    ("--config.entropy_coef=-1", "--config.entropy_coef=-1.0: must be >= 0"),
    ("--config.proxy_size=2x30x4", "--config.proxy_size=2x30x4: needs positive sizes"),
    ("--config.proxy_size=big", "--config.proxy_size=big: is not LAYERSxWIDTHxHEADS"),
    ("--config.world_seeds=(0,0)", "--config.world_seeds=0,0: must be distinct"),
    ("--config.bon_samples=8", "--config.bon_samples=8: must be >= bon_max_n=32"),
    ("--config.bon_bootstrap=1", "--config.bon_bootstrap=1: must be >= 2"),
    ("--config.num_comparisons=10", "--config.num_comparisons=10: must be >= rm_batch_size=64"),
    ("--config.hidden.group2_prob=1.5", "--config.hidden.group2_prob=1.5: HiddenContextConfig"),
    ("--config.hidden.group2_prob=0.0", "--config.hidden.group2_prob=0.0: must lie in (0, 1)"),
    ("--config.hidden.labels=vote", "--config.hidden.labels=vote: HiddenContextConfig.labels"),
    (
      "--config.hidden.group2_feature_weight=nan",
      "--config.hidden.group2_feature_weight=nan: must be a finite number",
    ),
    ("--config.world.vocab_size=0", "WorldConfig.vocab_size must be >= 1"),
  ],
)
def test_bad_setting_is_a_usage_error_naming_the_field(tmp_path, capfd, arg, message):
  result = _study(tmp_path / "w", capfd, arg)
  assert result.code == 2
  assert message in error_line(result)
  assert not os.path.exists(tmp_path / "w" / rundir.CONFIG_FILE)


def test_unknown_field_and_unusable_workdir_are_usage_errors(tmp_path, capfd):
  result = _study(tmp_path / "w", capfd, "--config.hidden.group3_prob=0.1")
  assert result.code == 2 and "--config.hidden.group3_prob: no field 'group3_prob'" in error_line(
    result
  )
  a_file = tmp_path / "a_file"
  a_file.write_text("keep me")
  result = _study(a_file, capfd)
  assert result.code == 2 and f"--workdir={a_file}: is a file" in error_line(result)
  assert a_file.read_text() == "keep me"
