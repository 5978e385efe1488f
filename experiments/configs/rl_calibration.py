r"""RL against gold vs best-of-n on gold: is the study's RL arm a competent optimiser?

Returns an :class:`experiments.rl_calibration.CalibrationConfig`. Default (the study's RL
settings: PPO, lr 1e-5, batch 64, 300 steps, 2 epochs x 2 minibatches, no KL penalty)::

  python experiments/rl_calibration.py --workdir=runs/rl_calibration

Variant ``quick`` (a smoke run: tiny settings, every output, none of the statistics),
also selected by ``--quick``::

  python experiments/rl_calibration.py --config=experiments/configs/rl_calibration.py:quick \
      --workdir=/tmp/rl_calibration_quick

Variant ``competent``: the calibrated recipe (see BUILD_NOTES.md, "RL calibration").
Any field can be overridden, e.g. ``--config.algo=rloo --config.learning_rate=1e-3``.
"""

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from experiments.rl_calibration_lib import CalibrationConfig  # noqa: E402


def get_config(variant: str = "") -> CalibrationConfig:
  """The default calibration run; ``variant``: ``'quick'`` (smoke run) or ``'competent'``."""
  config = CalibrationConfig()
  if variant == "quick":
    config.smoke = True
    config.world = dataclasses.replace(config.world, num_calibration=1024, gold_width=32)
    config.steps = 4
    config.eval_every = 2
    config.batch_size = 8
    config.eval_prompts = 32
    config.bon_prompts = 4
    config.bon_samples = 64
    config.bon_max_n = 32
    config.learning_rate = 3e-3
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of rl_calibration.py; known: 'quick'")
  return config
