r"""Reward model on the synthetic world's gold-labelled comparisons (about a minute on 2 CPUs).

Returns a :class:`jaxrm.train.reward_model.TrainConfig`. Run::

  python experiments/train_reward_model.py --workdir=runs/rm_synthetic

Variant ``hh`` (HH-RLHF harmless-base, 10% held out; 46 s for the whole process on the idle
2-core CPU in session 54, from an empty compilation cache; see BUILD_NOTES.md for the measured
accuracy)::

  python experiments/train_reward_model.py \
      --config=experiments/configs/reward_model.py:hh --workdir=runs/rm_hh

Variant ``hf`` (a local Hugging Face checkpoint and its tokenizer on HH-format data; by
default the committed tiny Llama checkpoint, the fixture tokenizer and the HH sample)::

  python experiments/train_reward_model.py --config=experiments/configs/reward_model.py:hf \
      --workdir=runs/rm_hf --config.model.hf_checkpoint=/path/to/checkpoint \
      --config.data.tokenizer='' --config.data.files="('hh.jsonl.gz',)"

Any field can be overridden, e.g. ``--config.optimizer.learning_rate=3e-4``,
``--config.data.synthetic.world.gold_width=32``,
``--config.data.files="('a.jsonl','b.jsonl.gz')"``.
"""

import os

from jaxrm.data.pairs import DataConfig
from jaxrm.train.reward_model import EvalConfig, OptimizerConfig, TrainConfig

HH_FILE = os.environ.get("JAXRM_HH_FILE", "/work/shared/data/hh-rlhf/harmless-base-test.jsonl.gz")


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HH_SAMPLE = os.path.join(ROOT, "tests", "data", "hh_rlhf_sample.jsonl.gz")
FIXTURES = os.path.join(ROOT, "tests", "data", "hf")


def get_config(variant: str = "") -> TrainConfig:
  """The synthetic run; ``variant='hh'``: the HH-RLHF run; ``variant='hf'``: a Hugging Face
  checkpoint with its tokenizer on HH-format data."""
  config = TrainConfig(
    steps=300,
    batch_size=64,
    optimizer=OptimizerConfig(learning_rate=1e-3),
    eval=EvalConfig(every=50),
  )
  if variant == "hh":
    config.data = DataConfig(files=(HH_FILE,), test_fraction=0.1, max_len=256)
    config.batch_size = 32
    # Causal query blocks of 64 tokens: the same attention, 35% off the step at 256 tokens
    # (BUILD_NOTES.md, "Where the hh step's time goes").
    config.model.attention_query_block = 64
    # Forward and backward over 4 pairs at a time (the same update): on a CPU their
    # activations can stay in cache, the step 1.13x as fast (BUILD_NOTES.md, session 54). On an
    # accelerator --config.microbatch_size=0 runs the whole batch at once.
    config.microbatch_size = 4
    config.optimizer.warmup_steps = 30
    config.log.checkpoint_every = 100
    config.log.log_every = 25
  elif variant == "hf":
    config.data = DataConfig(
      files=(HH_SAMPLE,),
      test_fraction=0.2,
      max_len=64,
      tokenizer=os.path.join(FIXTURES, "tokenizer"),
    )
    config.model.hf_checkpoint = os.path.join(FIXTURES, "llama")
    config.steps = 20
    config.batch_size = 8
    config.optimizer.warmup_steps = 2
    config.eval.every = 10
    config.log.log_every = 5
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of reward_model.py; known: 'hh', 'hf'")
  return config
