r"""The reward over-optimisation study (Gao et al. 2022) in the synthetic world.

Returns an :class:`experiments.overoptimization_lib.StudyConfig`. Default run (27.5 min
on the idle 2-core development CPU, README "Cost")::

  python experiments/overoptimization.py --workdir=runs/overopt

Variant ``quick`` (tiny settings, two worlds: every stage and output, none of the statistics;
labelled a smoke run in its outputs), also selected by ``--quick``::

  python experiments/overoptimization.py \
      --config=experiments/configs/overoptimization.py:quick --workdir=/tmp/overopt_quick

Any field can be overridden, e.g. ``--config.num_seeds=3``, ``--config.ppo.num_epochs=4``,
``--config.world.feature_quantile=0.95``, ``--config.data_sizes="(1000,5000)"``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from experiments.overoptimization_lib import StudyConfig  # noqa: E402
from jaxrm.data.synthetic import WorldConfig  # noqa: E402


def get_config(variant: str = "") -> StudyConfig:
  """The default study; ``variant='quick'``: the smoke-run settings."""
  config = StudyConfig()
  if variant == "quick":
    config.world = WorldConfig(num_calibration=2048, gold_width=32)
    config.num_comparisons = 512
    config.num_heldout = 512  # = num_comparisons: both sets share one compiled sampler
    config.num_seeds = 2
    config.rm_epochs = 1
    # Two proxy sizes: each reward architecture compiles its own RL program (the smoke run's
    # main cost), and two sizes are the fewest a trend check can be computed on.
    config.proxy_sizes = ("1x8x2", "1x16x2")
    config.smoke = True
    config.world_seeds = (0, 1)
    config.bon_prompts = 8
    config.bon_samples = 128
    config.bon_max_n = 64
    config.bon_bootstrap = 8
    config.rl_steps = 6
    config.rl_batch_size = 16
    config.rl_log_every = 2
    config.rl_eval_prompts = 32
    # Compiling is the smoke run's main cost: every program at LLVM -O0 compiles about twice
    # as fast (and runs the few steps here slower; BUILD_NOTES.md, benchmarks/rl_chunk_compile.py).
    config.fast_compiles = True
    config.kl_sweep = (0.1, 1.0)
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of overoptimization.py; known: 'quick'")
  return config
