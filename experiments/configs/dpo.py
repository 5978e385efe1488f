r"""DPO on the synthetic world's gold-labelled comparisons (pi_init is the initial policy and
the reference).

Returns a :class:`jaxrm.train.dpo.DPOTrainConfig`. Run::

  python experiments/train_dpo.py --workdir=runs/dpo_synthetic

Other losses: ``--config.loss.name=ipo`` (``cdpo`` with ``--config.loss.label_smoothing=0.1``,
``simpo``, ``kto``); ``--config.loss.beta=0.3``.

Variant ``hh`` (HH-RLHF harmless-base JSONL through the TFDS builder and the byte tokenizer,
a randomly initialised ``tiny`` byte-level policy as the start and the reference; only the
implicit reward model's report is meaningful there, there is no gold)::

  python experiments/train_dpo.py --config=experiments/configs/dpo.py:hh --workdir=runs/dpo_hh

Any field can be overridden, e.g. ``--config.optimizer.learning_rate=3e-4``,
``--config.data.synthetic.pairs=8192``, ``--config.eval.bon_samples=256``;
``--config.matmul_dtype=bfloat16`` for mixed precision (float32 parameters, bfloat16 matmul
operands summed in float32).
"""

import os

from jaxrm.data.pairs import DataConfig
from jaxrm.train.dpo import DPOEvalConfig, DPOLossConfig, DPOTrainConfig
from jaxrm.train.rm_config import OptimizerConfig

HH_FILE = os.environ.get("JAXRM_HH_FILE", "/work/shared/data/hh-rlhf/harmless-base-test.jsonl.gz")


def get_config(variant: str = "") -> DPOTrainConfig:
  """DPO in the synthetic world; ``variant='hh'``: DPO of a byte-level policy on HH-RLHF."""
  config = DPOTrainConfig(
    loss=DPOLossConfig(name="dpo", beta=0.1),
    optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=20),
    eval=DPOEvalConfig(every=50, bon_prompts=32, bon_samples=128),
    steps=300,
    batch_size=64,
  )
  if variant == "hh":
    config.data = DataConfig(files=(HH_FILE,), test_fraction=0.1, max_len=256)
    config.policy = "tiny"
    config.batch_size = 16
    config.steps = 200
    config.log.log_every = 25
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of dpo.py; known: 'hh'")
  return config
