r"""Objective mismatch (Lambert & Calandra 2023; Wen et al. 2024): does an RM's score predict
what optimising it buys?

In each synthetic world (``--config.world_seeds``) trains a population of proxy reward models
that differ in size, comparisons, label noise, training length, loss and seed; evaluates each
(:mod:`jaxrm.math.rm_evals`: pairwise accuracy, accuracy by gold gap, log-loss, ECE,
best-of-K, one-vs-many, rank correlation on the top quantile, accuracy on optimised-policy
pairs); measures what optimising it buys (best-of-n gold for every proxy, PPO gold for a
stratified subset, regret against the same optimisation of gold); and correlates the two with
bootstrap intervals. Writes under ``--workdir``: ``config.json``, ``results.json``,
``scatter.png``, ``correlations.png``, ``within_run.png``, ``summary.md`` and the stage caches
(an interrupted run resumes from its finished stages).

Settings: ``experiments/configs/objective_mismatch.py`` (any field overridable as
``--config.<field>=<value>``)::

  python experiments/objective_mismatch.py --workdir=runs/mismatch

Smoke run (labelled as a smoke run in every output; 80 s on the idle 2-core CPU from a cold
compilation cache, less with a warm one; BUILD_NOTES.md)::

  python experiments/objective_mismatch.py --workdir=/tmp/mismatch_quick --quick
"""

from __future__ import annotations

import os
import sys
import time

from absl import logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import cli  # noqa: E402
from experiments import objective_mismatch_analysis as analysis  # noqa: E402
from experiments import objective_mismatch_lib as lib  # noqa: E402
from experiments import objective_mismatch_outcomes as outcomes  # noqa: E402
from jaxrm.io import rundir  # noqa: E402

_FLAGS = cli.study_flags("objective_mismatch", "runs/mismatch")


def main(argv):
  cli.no_arguments(argv)
  cfg = _FLAGS.config.value
  start = time.perf_counter()
  with cli.one_line_errors():
    lib.validate(cfg)
    workdir = rundir.prepare(_FLAGS.workdir.value)
    rundir.write_config(workdir, cfg)
    results = outcomes.run_study(cfg, workdir)
  results = analysis.analyse(results, workdir)
  cli.print_checks(results)
  logging.info("study finished in %.0fs; results in %s", time.perf_counter() - start, workdir)


if __name__ == "__main__":
  cli.run(main, aliases=_FLAGS.aliases)
