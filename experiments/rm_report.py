r"""Writes the reward-model report of a saved checkpoint of a training run.

Restores checkpoint ``--step`` (default: the latest) of a run of
``experiments/train_reward_model.py``, scores its held-out pairs (the training pairs if the
run has no held-out split) and writes ``rm_report.json``, ``rm_report.md``,
``reliability.png`` and ``reward_histogram.png`` (see :mod:`jaxrm.io.report`) into
``--out_dir`` (default: the run directory for the latest step, else
``<workdir>/reports/step_<step>``)::

  python experiments/rm_report.py --workdir=runs/rm_hh
  python experiments/rm_report.py --workdir=runs/rm_hh --step=200
"""

from __future__ import annotations

import os
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import cli  # noqa: E402
from jaxrm.io import rundir  # noqa: E402
from jaxrm.train import rm_eval  # noqa: E402

_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Run directory of train_reward_model.py.", required=True
)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", lower_bound=0)
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Output directory (see the docstring).")


def main(argv: list[str]) -> None:
  cli.no_arguments(argv)
  rundir.quiet_orbax_logging()
  cli.check_output_dir("out_dir", _OUT_DIR.value)
  try:
    paths = rm_eval.write_run_report(_WORKDIR.value, step=_STEP.value, out_dir=_OUT_DIR.value)
  except FileNotFoundError as e:
    cli.die(str(e))
  for path in paths.values():
    print(path)


if __name__ == "__main__":
  cli.run(main)
