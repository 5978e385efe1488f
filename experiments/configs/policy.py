r"""Policy optimisation (PPO by default) in the synthetic world against its gold reward.

Returns a :class:`jaxrm.train.policy.PolicyTrainConfig`. Run::

  python experiments/train_policy.py --workdir=runs/ppo_gold

PPO against a proxy reward model of the synthetic world (train it first)::

  python experiments/train_reward_model.py --workdir=runs/rm_synthetic
  python experiments/train_policy.py --workdir=runs/ppo_synthetic \
      --config.reward.source=rm --config.reward.rm_dirs=runs/rm_synthetic \
      --config.kl_coef=0.05 --config.steps=200

Variant ``byte`` (a randomly initialised byte-level ``tiny`` policy with BOS-only prompts;
RLOO on a rule-based reward with an adaptive KL coefficient)::

  python experiments/train_policy.py --config=experiments/configs/policy.py:byte \
      --workdir=runs/rloo_tf5 --config.reward.token_id=104

Variant ``hf`` (PPO of a text policy, by default the committed tiny Llama checkpoint with
the fixture tokenizer, against a reward-model run; decoded samples in ``samples.jsonl``; set
``rl.eos_id`` to your tokenizer's EOS id)::

  python experiments/train_policy.py --config=experiments/configs/policy.py:hf \
      --workdir=runs/ppo_hf --config.policy=runs/sft_hf --config.reward.rm_dirs=runs/rm_hf

Any field can be overridden, e.g. ``--config.algo=grpo``, ``--config.rl.target_kl=4``,
``--config.reward.rm_dirs="('runs/rm1','runs/rm2')"`` (an ensemble) with
``--config.reward.ensemble_objective=worst_case``.
"""

import os

from jaxrm.data import tokenizer
from jaxrm.data.hf_tokenizer import HFTokenizer
from jaxrm.steps.rl import RLConfig
from jaxrm.train.policy import PolicyTrainConfig
from jaxrm.train.sources import PromptConfig, RewardConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HH_SAMPLE = os.path.join(ROOT, "tests", "data", "hh_rlhf_sample.jsonl.gz")
FIXTURES = os.path.join(ROOT, "tests", "data", "hf")


def get_config(variant: str = "") -> PolicyTrainConfig:
  """PPO on gold in the synthetic world; ``variant='byte'``: RLOO with a byte-level policy;
  ``variant='hf'``: PPO of a text policy against a reward-model run."""
  config = PolicyTrainConfig()
  if variant == "byte":
    config.algo = "rloo"
    config.policy = "tiny"
    config.prompts = PromptConfig(source="bos")
    config.reward = RewardConfig(source="token_frequency", token_id=104)
    config.rl = RLConfig(max_new_tokens=64, eos_id=tokenizer.EOS_ID, target_kl=4.0)
  elif variant == "hf":
    config.policy = os.path.join(FIXTURES, "llama")
    config.tokenizer = os.path.join(FIXTURES, "tokenizer")
    config.prompts = PromptConfig(source="jsonl", files=(HH_SAMPLE,), prompt_len=32)
    config.reward = RewardConfig(source="rm")
    eos_id = HFTokenizer.from_pretrained(config.tokenizer).eos_id  # the responses' end token
    config.rl = RLConfig(max_new_tokens=32, eos_id=eos_id, num_minibatches=2)
    config.batch_size = 8
    config.steps = 20
    config.samples.every = 5
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of policy.py; known: 'byte', 'hf'")
  return config
