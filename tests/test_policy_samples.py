"""Decoded samples of the policy loop (jaxrm.train.samples, jaxrm.train.policy_text)."""

import json
import os
import shutil

import numpy as np
import pytest

from jaxrm.data import synthetic
from jaxrm.io import rundir
from jaxrm.steps.rl import RLConfig
from jaxrm.train import policy as tp
from jaxrm.train import samples as samples_lib
from jaxrm.train.sources import RewardConfig

WORLD = {"num_calibration": 256, "policy_layers": 1, "gold_layers": 1, "gold_width": 32}


def gold_config(**kw):
  config = tp.PolicyTrainConfig(
    algo="reinforce",
    reward=RewardConfig(source="synthetic_gold"),
    world=synthetic.WorldConfig(**WORLD),
    rl=RLConfig(max_new_tokens=12, eos_id=None),
    steps=3,
    batch_size=4,
    parallel="jit",
    samples=samples_lib.SamplesConfig(every=2, num=3, log=1),
    log=rundir.LogConfig(log_every=1, checkpoint_every=2, plots=False),
  )
  for k, v in kw.items():
    setattr(config, k, v)
  return config


def _rows(workdir):
  with open(os.path.join(workdir, samples_lib.SAMPLES_FILE)) as f:
    return [json.loads(line) for line in f]


def test_synthetic_samples_carry_gold_and_are_written_at_intervals_and_the_end(tmp_path):
  workdir = str(tmp_path / "run")
  tp.train_and_evaluate(gold_config(), workdir)
  rows = _rows(workdir)
  assert [r["step"] for r in rows] == [2, 2, 2, 3, 3, 3]  # every 2 steps and the last step
  world = synthetic.WorldConfig(**WORLD)
  for r in rows:
    # Optimising gold: the reward is the gold reward, from two compilations of one transformer
    # forward at different batch shapes. Gold has unit variance, so atol=1e-5 is the suite's
    # tolerance for one function in two programs (rtol=1e-6 alone failed at XLA's default
    # level: 1.0e-6 apart on 0.645).
    np.testing.assert_allclose(r["reward"], r["gold"], rtol=1e-6, atol=1e-5)
    assert len(r["prompt"].split()) == world.prompt_len
    assert len(r["response"].split()) == r["response_tokens"] == 12
  # A crash after step 2: the resumed run rewrites step 3's samples, once (the samples
  # section may change on resume: here only how many are logged).
  shutil.rmtree(os.path.join(workdir, rundir.CHECKPOINT_DIR, "3"))
  resumed = gold_config()
  resumed.samples.log = 0
  tp.train_and_evaluate(resumed, workdir)
  again = _rows(workdir)
  assert [r["step"] for r in again] == [2, 2, 2, 3, 3, 3]
  assert again == rows  # the same samples: their key stream depends only on seed and step


def test_decode_samples_splits_prompt_and_response_by_the_masks():
  tokens = np.array([[0, 5, 6, 7, 8, 0], [9, 10, 11, 12, 0, 0]])
  mask = np.array([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]], bool)
  response = np.array([[0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 0, 0]], bool)
  rows = samples_lib.decode_samples(tokens, mask, response, samples_lib.synthetic_decode)
  assert rows == [
    {"prompt": "5 6", "response": "7 8", "response_tokens": 2},
    {"prompt": "9 10", "response": "11 12", "response_tokens": 2},
  ]


@pytest.mark.parametrize("field, value", [("every", -1), ("num", 0), ("log", 1.5)])
def test_bad_samples_settings_are_config_errors(field, value):
  config = gold_config()
  setattr(config.samples, field, value)
  with pytest.raises(rundir.ConfigError, match=f"samples.{field}"):
    tp.validate_config(config)
