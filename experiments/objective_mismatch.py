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

Smoke run (about 1-2 min, labelled as a smoke run in every output)::

  python experiments/objective_mismatch.py --workdir=/tmp/mismatch_quick --quick
"""

from __future__ import annotations

import os
import sys
import time

from absl import flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import cli  # noqa: E402
from experiments import objective_mismatch_analysis as analysis  # noqa: E402
from experiments import objective_mismatch_lib as lib  # noqa: E402
from experiments import objective_mismatch_outcomes as outcomes  # noqa: E402
from jaxrm.io import rundir  # noqa: E402

QUICK = f"--config={os.path.join(cli.CONFIG_DIR, 'objective_mismatch.py')}:quick"

_CONFIG = cli.define_config("objective_mismatch", aliases={"--quick": QUICK})
_WORKDIR = flags.DEFINE_string("workdir", "runs/mismatch", "Where results and caches go.")
flags.DEFINE_bool("quick", False, f"Tiny settings for a smoke run: the same as {QUICK}.")


def main(argv):
  cli.no_arguments(argv)
  cfg = _CONFIG.value
  start = time.perf_counter()
  with cli.one_line_errors():
    lib.validate(cfg)
    workdir = rundir.prepare(_WORKDIR.value)
    rundir.write_config(workdir, cfg)
    results = outcomes.run_study(cfg, workdir)
  results = analysis.analyse(results, workdir)
  if results["smoke_run"]:
    print("SMOKE RUN (--quick): tiny settings; the checks below are not evidence.")
  for c in results["checks"]:
    print(f"{'PASS' if c['passed'] else 'FAIL'}  {c['name']}: {c['detail']}")
  logging.info("study finished in %.0fs; results in %s", time.perf_counter() - start, workdir)


if __name__ == "__main__":
  cli.run(main, aliases={"--quick": QUICK})
