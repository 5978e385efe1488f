r"""RL against gold vs best-of-n on gold: is the study's RL arm a competent optimiser?

Returns an :class:`experiments.rl_calibration.CalibrationConfig`. Default (the study's RL
settings: PPO, lr 1e-5, batch 64, 300 steps, 2 epochs x 2 minibatches, no KL penalty)::

  python experiments/rl_calibration.py --workdir=runs/rl_calibration

Variant ``quick`` (a smoke run: tiny settings, every output, none of the statistics),
also selected by ``--quick``::

  python experiments/rl_calibration.py --config=experiments/configs/rl_calibration.py:quick \
      --workdir=/tmp/rl_calibration_quick

Variant ``best``: the best setting found (RLOO, 4 samples per prompt, 64 prompts per step,
Adam 1e-3, KL penalty 0.3, 300 steps; measured oracle fraction 0.39 at KL*, below the 0.7
mark; BUILD_NOTES.md, "RL calibration")::

  python experiments/rl_calibration.py --config=experiments/configs/rl_calibration.py:best \
      --workdir=runs/rl_calibration_best

Any field can be overridden, e.g. ``--config.algo=rloo --config.learning_rate=1e-3``.
"""

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from experiments.rl_calibration_lib import CalibrationConfig  # noqa: E402


def get_config(variant: str = "") -> CalibrationConfig:
  """The default calibration run; ``variant``: ``'quick'`` (smoke run) or ``'best'``."""
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
  elif variant == "best":
    config.algo = "rloo"
    config.rl = dataclasses.replace(config.rl, num_samples=4)
    config.learning_rate = 1e-3
    config.kl_coef = 0.3
    config.batch_size = 64
    config.steps = 300
    config.eval_every = 30
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of rl_calibration.py; known: 'quick', 'best'")
  return config
