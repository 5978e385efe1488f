r"""Reward over-optimisation (Gao, Schulman & Hilton 2022) in jaxrm's synthetic RLHF world.

In each of several worlds (``--config.world_seeds``; pi_init, gold, gold-labelled comparisons)
trains proxy reward models of several sizes (all seeds of a size at once), optimises against
each proxy by best-of-n (over many prompts, with the oracle best-of-n selected by gold and the
KL-regularised optimum pi_beta as references) and by RL, fits Gao et al.'s functional forms,
evaluates every check per world and pooled with bootstrap intervals (proxy seeds, prompts,
samples), and writes under ``--workdir``: ``config.json``, ``results.json``, ``figure1.png``,
``coefficients.png``, ``decomposition.png``, ``summary.md`` and the stage caches
(``world{seed}/``).
An interrupted run resumes from its finished stages; a stage whose settings changed is
recomputed (each stage's cache is keyed by every field it reads).

The settings are ``experiments/configs/overoptimization.py`` (any field overridable as
``--config.<field>=<value>``). Default run (three worlds; 18 min on the idle 2-core CPU at session
45, RL three quarters of it; README "Cost")::

  python experiments/overoptimization.py --workdir=runs/overopt

``--config.world_threads=3`` runs the three worlds at once, each in its own thread: the same
numbers, 14% less wall time and 3 GB more memory on that CPU (README "Cost").

Smoke run (``--quick`` selects the config's ``quick`` variant; 63–69 s on the idle 2-core CPU
from a cold compilation cache at session 45, 22 s with a warm one; README "Cost")::

  python experiments/overoptimization.py --workdir=/tmp/overopt_quick --quick
"""

from __future__ import annotations

import os
import sys
import time

from absl import logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import cli  # noqa: E402
from experiments import overoptimization_analysis as analysis  # noqa: E402
from experiments import overoptimization_lib as lib  # noqa: E402
from jaxrm.io import rundir  # noqa: E402

_FLAGS = cli.study_flags("overoptimization", "runs/overopt")


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
  logging.info("study finished in %.0fs; results in %s", time.perf_counter() - start, workdir)


if __name__ == "__main__":
  cli.run(main, aliases=_FLAGS.aliases)
