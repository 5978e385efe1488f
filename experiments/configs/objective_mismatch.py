r"""The objective-mismatch study (Lambert & Calandra 2023; Wen et al. 2024) in the synthetic world.

Returns an :class:`experiments.objective_mismatch_lib.MismatchConfig`. Default run (2 worlds,
96 proxies each, PPO on 6 proxies of one size per world,
stratified by accuracy, and on gold)::

  python experiments/objective_mismatch.py --workdir=runs/mismatch

Variant ``quick`` (a smoke run: every stage and output on tiny settings, labelled as such; the
statistics mean nothing), also selected by ``--quick``::

  python experiments/objective_mismatch.py \
      --config=experiments/configs/objective_mismatch.py:quick --workdir=/tmp/mismatch_quick

Any field can be overridden, e.g. ``--config.world_seeds="(0,1,2)"``,
``--config.rl_per_size=4``, ``--config.label_noises="(0.0,0.1,0.3)"``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from experiments.objective_mismatch_lib import MismatchConfig  # noqa: E402
from jaxrm.data.synthetic import WorldConfig  # noqa: E402


def get_config(variant: str = "") -> MismatchConfig:
  """The default study; ``variant='quick'``: the smoke-run settings."""
  config = MismatchConfig()
  if variant == "quick":
    config.world = WorldConfig(num_calibration=2048, gold_width=32)
    config.num_heldout = 256
    config.proxy_sizes = ("1x4x1", "1x8x2")
    config.data_sizes = (128, 256)
    config.label_noises = (0.0, 0.25)
    config.losses = ("bt", "bt_center")
    config.bt_replicates = 1
    config.train_steps = (4, 12)
    config.eval_prompts = 16
    config.eval_k = 8
    config.offdist_pairs = 32
    config.offdist_n = 4
    config.bon_prompts = 8
    config.bon_samples = 64
    config.bon_outcome_ns = (8, 32)
    config.primary_outcome = "bon_gold_n32"
    config.world_seeds = (0,)
    config.rl_sizes = ("1x4x1",)
    config.rl_per_size = 2
    config.rl_steps = 4
    config.rl_batch_size = 16
    config.rl_log_every = 2
    config.rl_kl_budgets = (0.01,)
    # Compiling is the smoke run's main cost: every program at LLVM -O0 compiles about twice
    # as fast (and runs the few steps here slower; BUILD_NOTES.md, benchmarks/rl_chunk_compile.py).
    config.fast_compiles = True
    config.bootstrap_resamples = 50
    config.smoke = True
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of objective_mismatch.py; known: 'quick'")
  return config
