r"""Best-of-n: samples n responses per prompt from a policy, keeps the one a reward model prefers.

A thin main: it loads the config (``experiments/configs/best_of_n.py``, a
:class:`jaxrm.train.best_of_n.BestOfNConfig`; any field overridable as
``--config.<field>=<value>``) and calls :func:`jaxrm.train.best_of_n.run_best_of_n`, which
writes under ``--workdir`` the chosen responses (``best_of_n.jsonl``), every decoded sample
with its reward (``samples.jsonl``), ``summary.json`` and the run tokenizer. A bad setting
stops the script with one line naming it.

The policy is a preset, a local Hugging Face checkpoint folder or an SFT run
(``train_sft.py``); the reward a reward-model run (``train_reward_model.py``) with the same
tokenizer::

  python experiments/best_of_n.py --config=experiments/configs/best_of_n.py:hf \
      --workdir=runs/bon_hf --config.policy=runs/sft_hf --config.reward.rm_dirs=runs/rm_hf
"""

from __future__ import annotations

import os
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import cli  # noqa: E402
from jaxrm.io import rundir  # noqa: E402
from jaxrm.train import best_of_n  # noqa: E402

_CONFIG = cli.define_config("best_of_n")
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Output directory (best_of_n.jsonl, samples.jsonl, summary.json).", required=True
)


def main(argv: list[str]) -> None:
  cli.no_arguments(argv)
  rundir.quiet_orbax_logging()
  with cli.one_line_errors():
    best_of_n.run_best_of_n(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
