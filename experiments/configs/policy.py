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

Any field can be overridden, e.g. ``--config.algo=grpo``, ``--config.rl.target_kl=4``,
``--config.reward.rm_dirs="('runs/rm1','runs/rm2')"`` (an ensemble) with
``--config.reward.ensemble_objective=worst_case``.
"""

from jaxrm.data import tokenizer
from jaxrm.steps.rl import RLConfig
from jaxrm.train.policy import PolicyTrainConfig
from jaxrm.train.sources import PromptConfig, RewardConfig


def get_config(variant: str = "") -> PolicyTrainConfig:
  """PPO on gold in the synthetic world; ``variant='byte'``: RLOO with a byte-level policy."""
  config = PolicyTrainConfig()
  if variant == "byte":
    config.algo = "rloo"
    config.policy = "tiny"
    config.prompts = PromptConfig(source="bos")
    config.reward = RewardConfig(source="token_frequency", token_id=104)
    config.rl = RLConfig(max_new_tokens=64, eos_id=tokenizer.EOS_ID, target_kl=4.0)
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of policy.py; known: 'byte'")
  return config
