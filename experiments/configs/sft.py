r"""Supervised fine-tuning of a policy (returns a :class:`jaxrm.train.sft.SFTConfig`).

Default: a byte-level ``tiny`` preset on the chosen side of the HH-RLHF sample::

  python experiments/train_sft.py --workdir=runs/sft_tiny

Variant ``hf`` (the committed tiny Llama checkpoint with the fixture BPE tokenizer; point
``policy``/``tokenizer`` at any local GPT-2/Llama/Mistral/Qwen2 checkpoint folder)::

  python experiments/train_sft.py --config=experiments/configs/sft.py:hf --workdir=runs/sft_hf \
      --config.policy=/path/to/checkpoint --config.tokenizer=''

Any field can be overridden, e.g. ``--config.data.files="('demos.jsonl',)"``,
``--config.optimizer.learning_rate=1e-5``, ``--config.steps=1000``;
``--config.matmul_dtype=bfloat16`` for mixed precision (float32 parameters, bfloat16 matmul
operands).
"""

import os

from jaxrm.io.rundir import LogConfig
from jaxrm.train.rm_config import OptimizerConfig
from jaxrm.train.sft import SFTConfig, SFTDataConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HH_SAMPLE = os.path.join(ROOT, "tests", "data", "hh_rlhf_sample.jsonl.gz")
FIXTURES = os.path.join(ROOT, "tests", "data", "hf")


def get_config(variant: str = "") -> SFTConfig:
  """The byte-level preset run; ``variant='hf'``: the tiny Llama checkpoint and its tokenizer."""
  config = SFTConfig(
    policy="tiny",
    data=SFTDataConfig(files=(HH_SAMPLE,), test_fraction=0.1, max_len=256),
    optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=10),
    steps=100,
    batch_size=8,
    eval_every=25,
    log=LogConfig(log_every=10, checkpoint_every=50),
  )
  if variant == "hf":
    config.policy = os.path.join(FIXTURES, "llama")
    config.tokenizer = os.path.join(FIXTURES, "tokenizer")
    config.data.max_len = 64
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of sft.py; known: 'hf'")
  return config
