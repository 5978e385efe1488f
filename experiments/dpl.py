r"""Distributional preference learning (Siththaranjan, Laidlaw & Hadfield-Menell 2023) with
hidden context in jaxrm's synthetic RLHF world.

Two annotator groups label the comparisons (``jaxrm.data.hidden_context``): group 1 by the
world's gold, group 2 by a gold that weighs the planted feature differently; which group
labelled a pair is hidden. In each world (``--config.world_seeds``) the script trains
Bradley-Terry, mean-variance and categorical DPL reward models (``jaxrm.models
.distributional_rm``, several seeds each) on those labels, and the DPL heads also on control
labels (the same pairs, group 1 only); measures the paper's diagnostics on held-out responses
(the predicted std where the groups disagree, the explained variance r^2); runs best-of-n on
each model's mean and on its lower ``alpha``-quantile (the risk-averse objective), recording
both groups' gold against KL; and prints the paper's hypotheses as PASS/FAIL checks with
bootstrap intervals per world and pooled (``experiments/dpl_analysis.py``, pre-registered).

Outputs under ``--workdir``: ``config.json``, ``results.json``, ``dpl_bon.png``,
``dpl_variance.png``, ``summary.md`` and the stage caches (``world{seed}/``); an interrupted
run resumes from its finished stages.

Default run::

  python experiments/dpl.py --workdir=runs/dpl

Smoke run (``--quick``; tiny settings, labelled as such in the outputs)::

  python experiments/dpl.py --workdir=/tmp/dpl_quick --quick
"""

from __future__ import annotations

import os
import sys
import time

from absl import logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import (  # noqa: E402
  cli,  # noqa: E402
  dpl_analysis,
  dpl_lib,
  dpl_report,
)
from jaxrm.io import rundir  # noqa: E402

_FLAGS = cli.study_flags("dpl", "runs/dpl")


def main(argv):
  cli.no_arguments(argv)
  cfg = _FLAGS.config.value
  start = time.perf_counter()
  with cli.one_line_errors():
    dpl_lib.validate(cfg)
    workdir = rundir.prepare(_FLAGS.workdir.value)
    rundir.write_config(workdir, cfg)
    raw = dpl_lib.run_study(cfg, workdir)
    results = dpl_analysis.analyse(cfg, raw)
    results["timing_this_invocation"]["total"] = time.perf_counter() - start
    rundir.write_json(os.path.join(workdir, "results.json"), dpl_analysis.to_json(results))
    dpl_report.write_outputs(cfg, dpl_analysis.to_json(results), raw["worlds"], workdir)
  cli.print_checks(results)
  logging.info("study finished in %.0fs; results in %s", time.perf_counter() - start, workdir)


if __name__ == "__main__":
  cli.run(main, aliases=_FLAGS.aliases)
