r"""Reward-model ensembles against over-optimisation (Coste, Anwar, Kirk & Krueger 2023).

In each synthetic world (``--config.world_seeds``; the over-optimisation study's worlds) and
for each label-noise rate (``--config.label_noises``) trains ``num_ensembles`` ensembles of
``ensemble_size`` proxy reward models (seeds differ in initialisation and data order), then
optimises by best-of-n and by RL (PPO) against a single member, the ensemble mean, the
worst case (WCO) and the uncertainty-weighted objective (UWO, lambda swept), members put on
one scale by fixed ``pi_init`` statistics; the gold oracle is the reference. Prints Coste et
al.'s hypotheses as PASS/FAIL checks (per world and pooled, bootstrap intervals) and writes
under ``--workdir``: ``config.json``, ``results.json``, ``figure.png``, ``summary.md``,
``metrics.jsonl`` (one line per stage) and the stage caches (an interrupted run resumes from
its finished stages; a changed setting recomputes only what depends on it).

Settings: ``experiments/configs/ensembles.py`` (any field overridable as
``--config.<field>=<value>``)::

  python experiments/ensembles.py --workdir=runs/ensembles

Smoke run (labelled as a smoke run in every output; 107 s on the idle 2-core CPU from a cold
compilation cache, less with a warm one; BUILD_NOTES.md)::

  python experiments/ensembles.py --workdir=/tmp/ensembles_quick --quick
"""

from __future__ import annotations

import os
import sys
import time

from absl import logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import cli  # noqa: E402
from experiments import ensembles_analysis as analysis  # noqa: E402
from experiments import ensembles_lib as lib  # noqa: E402
from jaxrm.io import rundir  # noqa: E402

_FLAGS = cli.study_flags("ensembles", "runs/ensembles")


def main(argv):
  cli.no_arguments(argv)
  cfg = _FLAGS.config.value
  start = time.perf_counter()
  with cli.one_line_errors():
    lib.validate(cfg)
    workdir = rundir.prepare(_FLAGS.workdir.value)
    rundir.write_config(workdir, cfg)
    results = lib.run_study(cfg, workdir)
    results = analysis.analyse(results, workdir)
  cli.print_checks(results)
  for unit, fr in results["oracle_fraction"].items():
    if fr:
      print(f"REPORTED  RL oracle fraction ({unit}): {fr['detail']}")
  logging.info("study finished in %.0fs; results in %s", time.perf_counter() - start, workdir)


if __name__ == "__main__":
  cli.run(main, aliases=_FLAGS.aliases)
