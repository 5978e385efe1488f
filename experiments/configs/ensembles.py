r"""The reward-model ensembles study (Coste et al. 2023) in the synthetic world.

Returns an :class:`experiments.ensembles_lib.EnsembleConfig`. Default run (2 worlds, label
noise 0 and 0.25, 3 ensembles of 5 members, best-of-n up to n=512 and PPO against every
objective)::

  python experiments/ensembles.py --workdir=runs/ensembles

Variant ``quick`` (a smoke run: every stage and output on tiny settings, labelled as such; the
statistics mean nothing), also selected by ``--quick``::

  python experiments/ensembles.py \
      --config=experiments/configs/ensembles.py:quick --workdir=/tmp/ensembles_quick

Any field can be overridden, e.g. ``--config.uwo_coefs="(0.5,2.0)"``,
``--config.world_seeds="(0,1,2)"``, ``--config.rl_steps=0`` (best-of-n only).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from experiments.ensembles_lib import EnsembleConfig  # noqa: E402
from jaxrm.data.synthetic import WorldConfig  # noqa: E402


def get_config(variant: str = "") -> EnsembleConfig:
  """The default study; ``variant='quick'``: the smoke-run settings."""
  config = EnsembleConfig()
  if variant == "quick":
    config.world = WorldConfig(num_calibration=2048, gold_width=32)
    config.world_seeds = (0, 1)
    config.num_comparisons = 256
    config.num_heldout = 256
    config.ensemble_size = 2
    config.num_ensembles = 2
    config.rm_epochs = 1
    config.uwo_coefs = (0.5, 1.0, 2.0)
    config.uwo_check_coef = 1.0
    config.bon_prompts = 8
    config.bon_samples = 64
    config.bon_max_n = 32
    config.bon_bootstrap = 8
    config.rl_steps = 4
    config.rl_batch_size = 16
    config.rl_log_every = 2
    config.rl_eval_prompts = 16
    # Compiling is the smoke run's main cost: every program at LLVM -O0 compiles about twice
    # as fast (and runs the few steps here slower; BUILD_NOTES.md, benchmarks/rl_chunk_compile.py).
    config.fast_compiles = True
    config.smoke = True
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of ensembles.py; known: 'quick'")
  return config
