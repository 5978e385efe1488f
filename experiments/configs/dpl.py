r"""Distributional preference learning (DPL) in the hidden-context synthetic world.

Returns an :class:`experiments.dpl_lib.DPLConfig`. Default run (2 worlds, 3 seeds of each of
the Bradley-Terry, mean-variance and categorical reward models on hidden-context labels, the
two DPL heads also on the control labels; best-of-n up to 256 over 32 prompts x 512 samples)::

  python experiments/dpl.py --workdir=runs/dpl

Variant ``quick`` (a smoke run: tiny settings, every output, none of the statistics; labelled
a smoke run in its outputs), also selected by ``--quick``::

  python experiments/dpl.py --config=experiments/configs/dpl.py:quick --workdir=/tmp/dpl_quick

Any field can be overridden, e.g. ``--config.hidden.group2_prob=0.3``,
``--config.hidden.group2_feature_weight=0``, ``--config.alpha=0.1``,
``--config.world_seeds="(0,1,2)"``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from experiments.dpl_lib import DPLConfig  # noqa: E402
from jaxrm.data.synthetic import WorldConfig  # noqa: E402


def get_config(variant: str = "") -> DPLConfig:
  """The default study; ``variant='quick'``: the smoke-run settings."""
  config = DPLConfig()
  if variant == "quick":
    config.smoke = True
    config.world = WorldConfig(num_calibration=2048, gold_width=32)
    config.world_seeds = (0, 1)
    config.num_comparisons = 256
    config.num_heldout = 128
    config.proxy_size = "1x8x2"
    config.num_seeds = 2
    config.rm_epochs = 1
    config.num_atoms = 5
    config.bon_prompts = 4
    config.bon_samples = 64
    config.bon_max_n = 32
    config.bon_bootstrap = 8
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of dpl.py; known: 'quick'")
  return config
