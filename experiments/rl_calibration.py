r"""Is the RL arm a competent optimiser? RL against gold itself vs best-of-n selected by gold.

For one synthetic world (``jaxrm.data.synthetic``) this script measures

* the **best-of-n-on-gold** curve: ``bon_samples`` ``pi_init`` responses to each of
  ``bon_prompts`` held-out prompts, gold used both to select and to score (unbiased estimator
  :func:`jaxrm.math.best_of_n.batched_best_of_n_expected_reward`), gold vs
  ``KL_bon(n) = log n - (n - 1) / n`` for ``n = 1, 2, 4, ..., bon_max_n``;
* **RL against gold** (``reward_fn`` = the world's gold) with ``algo`` (PPO, RLOO, GRPO,
  REINFORCE; :func:`jaxrm.steps.rl.get_step`), all ``num_seeds`` seeds vmapped, evaluated
  every ``eval_every`` steps on a fixed batch of ``eval_prompts`` held-out prompts with a
  fixed sampling key (:func:`jaxrm.steps.rl_diagnostics.evaluate`): mean gold, the exact
  sequence KL (full next-token distributions summed over the response) and the k1 estimate;
* the **oracle fraction** at every eval point: RL gold / best-of-n gold at the same KL (the
  best-of-n curve interpolated linearly in KL at the point's exact KL), and at
  ``KL*``, the KL where best-of-n-on-gold reaches half its maximum over the measured ``n``:
  the RL curve's gold interpolated at ``KL*`` (first crossing) divided by that half-maximum.
  It prints ``PASS/FAIL oracle_fraction >= threshold at KL*`` with the number.

Outputs under ``--workdir``: ``metrics.jsonl`` (one row per eval step and seed),
``results.json`` (config, both curves, ``KL*``, fractions, cost), ``rl_calibration.png``.

Default (the study's RL settings, the audit's failing recipe)::

  python experiments/rl_calibration.py --workdir=runs/rl_calibration

Smoke run (``--quick``; tiny settings, labelled as such in ``results.json``)::

  python experiments/rl_calibration.py --workdir=/tmp/rl_calibration_quick --quick

Any field can be overridden: ``--config.algo=rloo --config.learning_rate=1e-3
--config.rl.num_samples=4 --config.world.policy_logit_scale=2``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import cli  # noqa: E402
from experiments.rl_calibration_lib import run_calibration  # noqa: E402

_FLAGS = cli.study_flags(
  "rl_calibration", None, "Output directory (results.json, metrics.jsonl, PNG)."
)


def main(argv: list[str]) -> None:
  cli.no_arguments(argv)
  with cli.one_line_errors():
    run_calibration(_FLAGS.config.value, _FLAGS.workdir.value)


if __name__ == "__main__":
  cli.run(main, aliases=_FLAGS.aliases)
