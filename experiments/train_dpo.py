r"""Trains a policy with a DPO-family loss (DPO, cDPO, IPO, SimPO, KTO) on preference pairs.

A thin main: it loads the config (``experiments/configs/dpo.py``, a
:class:`jaxrm.train.dpo.DPOTrainConfig`; any field overridable as ``--config.<field>=<value>``)
and calls :func:`jaxrm.train.dpo.train_and_evaluate`, which writes under ``--workdir`` the
config, metrics (``metrics.jsonl``, learning curves), checkpoints, the report of the implicit
reward model ``beta * log pi / pi_ref`` (``rm_report.json``, ``rm_report.md``, ...) and
``results.json`` (held-out implicit-reward metrics; on the synthetic world best-of-n against
the implicit reward scored by gold). Re-running the same command resumes from the last
checkpoint. A bad setting stops the script with one line naming it.

Synthetic world::

  python experiments/train_dpo.py --workdir=runs/dpo_synthetic

IPO instead of DPO::

  python experiments/train_dpo.py --workdir=runs/ipo_synthetic --config.loss.name=ipo
"""

from __future__ import annotations

import os
import sys

from absl import flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import cli  # noqa: E402
from jaxrm.io import rundir  # noqa: E402
from jaxrm.train import dpo  # noqa: E402

_CONFIG = cli.define_config("dpo")
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Run directory (config, metrics, checkpoints, data, report).", required=True
)


def main(argv: list[str]) -> None:
  cli.no_arguments(argv)
  rundir.quiet_orbax_logging()
  with cli.one_line_errors():  # a bad data line: file:line, and the skip hint where it helps
    summary = dpo.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if summary["report"]:
    logging.info("Report: %s", summary["report"]["markdown"])
  if summary["best_of_n"]:
    logging.info("Best-of-n results: %s", os.path.join(summary["workdir"], dpo.RESULTS_FILE))


if __name__ == "__main__":
  cli.run(main)
