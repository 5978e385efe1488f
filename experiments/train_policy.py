r"""Optimises a policy against a reward with PPO, REINFORCE, RLOO or GRPO (:mod:`jaxrm.steps.rl`).

A thin main: it loads the config (``experiments/configs/policy.py``, a
:class:`jaxrm.train.policy.PolicyTrainConfig`; any field overridable as
``--config.<field>=<value>``) and calls :func:`jaxrm.train.policy.train_and_evaluate`, which
writes under ``--workdir`` the config, per-step metrics (``metrics.jsonl`` and learning
curves) and checkpoints. Re-running the same command resumes from the last checkpoint and
ends with the parameters of an uninterrupted run. A bad setting stops the script with one
line naming it.

PPO on the synthetic world's gold reward::

  python experiments/train_policy.py --workdir=runs/ppo_gold

PPO against a proxy reward model of the synthetic world::

  python experiments/train_reward_model.py --workdir=runs/rm_synthetic
  python experiments/train_policy.py --workdir=runs/ppo_synthetic \
      --config.reward.source=rm --config.reward.rm_dirs=runs/rm_synthetic --config.steps=200

PPO of an SFT run (or a local Hugging Face checkpoint) against a text reward model with the same
tokenizer; decoded samples go to ``samples.jsonl`` and the log::

  python experiments/train_policy.py --config=experiments/configs/policy.py:hf \
      --workdir=runs/ppo_hf --config.policy=runs/sft_hf --config.reward.rm_dirs=runs/rm_hf

RLOO with a byte-level policy on a rule-based reward, adaptive KL::

  python experiments/train_policy.py --config=experiments/configs/policy.py:byte \
      --workdir=runs/rloo_tf
"""

import json
import os
import sys

from absl import flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import cli  # noqa: E402
from jaxrm.io import rundir  # noqa: E402
from jaxrm.train import policy  # noqa: E402

_CONFIG = cli.define_config("policy")
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Run directory (config, metrics, checkpoints).", required=True
)


def main(argv: list[str]) -> None:
  cli.no_arguments(argv)
  rundir.quiet_orbax_logging()
  with cli.one_line_errors():
    summary = policy.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  logging.info("Done: %s", json.dumps(summary["final"]))
  if summary["skipped_updates"]:
    logging.warning(
      "%d of %d updates were skipped (non-finite loss, gradient or update); see num_skipped in "
      "metrics.jsonl",
      summary["skipped_updates"],
      summary["steps"],
    )


if __name__ == "__main__":
  cli.run(main)
