r"""Trains a reward model on preference pairs: local JSONL files or the synthetic world.

A thin main: it loads the config (``experiments/configs/reward_model.py``, a
:class:`jaxrm.train.reward_model.TrainConfig`; any field overridable as
``--config.<field>=<value>``) and calls :func:`jaxrm.train.reward_model.train_and_evaluate`,
which writes under ``--workdir`` the config, metrics (``metrics.jsonl`` and learning curves),
checkpoints (``checkpoints/``), the tokenised dataset (``data/``) and the report
(``rm_report.json``, ``rm_report.md``, ``reliability.png``, ``reward_histogram.png``).
Re-running the same command resumes from the last checkpoint. A bad setting stops the
script with one line naming it.

Synthetic world (gold-labelled comparisons; about a minute on a 2-core CPU)::

  python experiments/train_reward_model.py --workdir=runs/rm_synthetic

HH-RLHF harmless-base, 10% held out::

  python experiments/train_reward_model.py \
      --config=experiments/configs/reward_model.py:hh --workdir=runs/rm_hh

Report of any saved checkpoint: ``python experiments/rm_report.py --workdir=<run>``.
"""

from __future__ import annotations

import os
import sys

from absl import flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import cli  # noqa: E402
from jaxrm.io import rundir  # noqa: E402
from jaxrm.train import reward_model  # noqa: E402

_CONFIG = cli.define_config("reward_model")
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Run directory (config, metrics, checkpoints, data, report).", required=True
)


def main(argv: list[str]) -> None:
  cli.no_arguments(argv)
  rundir.quiet_orbax_logging()
  with cli.one_line_errors():  # bad data, settings, workdirs; stopped runs; full disks
    summary = reward_model.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if summary["report"]:
    logging.info("Report: %s", summary["report"]["markdown"])


if __name__ == "__main__":
  cli.run(main)
