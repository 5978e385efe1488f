r"""Best-of-n against a reward-model run (returns a :class:`jaxrm.train.best_of_n.BestOfNConfig`).

Default: the ``tiny`` byte-level preset, prompts of the HH-RLHF sample::

  python experiments/best_of_n.py --workdir=runs/bon --config.reward.rm_dirs=runs/rm_hh

Variant ``hf`` (the committed tiny Llama checkpoint and its tokenizer; use an SFT run or any
local checkpoint as ``policy``)::

  python experiments/best_of_n.py --config=experiments/configs/best_of_n.py:hf \
      --workdir=runs/bon_hf --config.policy=runs/sft_hf --config.reward.rm_dirs=runs/rm_hf

Any field can be overridden, e.g. ``--config.n=64``, ``--config.num_prompts=32``,
``--config.reward.rm_dirs="('runs/rm1','runs/rm2')"`` with
``--config.reward.ensemble_objective=worst_case``. On a multi-core CPU,
``--config.thread_groups=2`` samples each call's batch in two host threads (the same samples).
"""

import os

from jaxrm.train.best_of_n import BestOfNConfig
from jaxrm.train.sources import PromptConfig, RewardConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HH_SAMPLE = os.path.join(ROOT, "tests", "data", "hh_rlhf_sample.jsonl.gz")
FIXTURES = os.path.join(ROOT, "tests", "data", "hf")


def get_config(variant: str = "") -> BestOfNConfig:
  """The byte-level preset; ``variant='hf'``: the tiny Llama checkpoint and its tokenizer."""
  config = BestOfNConfig(
    policy="tiny",
    prompts=PromptConfig(source="jsonl", files=(HH_SAMPLE,), prompt_len=64),
    reward=RewardConfig(source="rm"),
    num_prompts=8,
    n=16,
    max_new_tokens=32,
  )
  if variant == "hf":
    config.policy = os.path.join(FIXTURES, "llama")
    config.tokenizer = os.path.join(FIXTURES, "tokenizer")
    config.prompts.prompt_len = 32
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of best_of_n.py; known: 'hf'")
  return config
