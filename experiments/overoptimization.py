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
``--config.<field>=<value>``). Default run (about 15 min on a 2-core CPU)::

  python experiments/overoptimization.py --workdir=runs/overopt

Smoke run (about 1-2 min; ``--quick`` selects the config's ``quick`` variant)::

  python experiments/overoptimization.py --workdir=/tmp/overopt_quick --quick
"""

from __future__ import annotations

import os
import sys
import time

from absl import flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import cli  # noqa: E402
from experiments import overoptimization_analysis as analysis  # noqa: E402
from experiments import overoptimization_lib as lib  # noqa: E402
from jaxrm.io import rundir  # noqa: E402

QUICK = f"--config={os.path.join(cli.CONFIG_DIR, 'overoptimization.py')}:quick"
ALIASES = {"--quick": QUICK}

_CONFIG = cli.define_config("overoptimization", aliases=ALIASES)
_WORKDIR = flags.DEFINE_string("workdir", "runs/overopt", "Where results and caches go.")
flags.DEFINE_bool("quick", False, f"Tiny settings for a smoke run: the same as {QUICK}.")


def main(argv):
  cli.no_arguments(argv)
  cfg = _CONFIG.value
  start = time.perf_counter()
  with cli.one_line_errors():
    lib.validate(cfg)
    workdir = rundir.prepare(_WORKDIR.value)
    rundir.write_config(workdir, cfg)
    results = lib.run_study(cfg, workdir)
  results = analysis.analyse(results, workdir)
  if results["smoke_run"]:
    print("SMOKE RUN (quick config): tiny settings, the checks below mean nothing")
  for c in results["checks"]:
    per = " ".join(f"{k}:{'PASS' if v else 'FAIL'}" for k, v in c["per_world"].items())
    print(f"{'PASS' if c['passed'] else 'FAIL'}  {c['name']} (pooled; {per}): {c['detail']}")
  logging.info("study finished in %.0fs; results in %s", time.perf_counter() - start, workdir)


if __name__ == "__main__":
  cli.run(main, aliases=ALIASES)
