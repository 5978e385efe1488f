r"""How sensitive is proxy training to a float-level perturbation? (diagnostic of the study)

Trains the over-optimisation study's proxies (same config, world and seeds) twice: once as
configured and once with the learning rate scaled by ``1 + --relative_perturbation`` (default
1e-6, about 8 float32 ulps: the size of the differences that a changed reduction order, XLA
version or CPU produces). A proxy size whose held-out accuracy moves by much more than that is
chaotic: its results are reproducible only bit-for-bit (same code, same jax, same CPU), and
differences of that size between machines or code versions are not evidence of a bug.

Writes ``sensitivity.json`` under ``--workdir`` and prints a table::

  python experiments/proxy_sensitivity.py --workdir=/tmp/sensitivity \
      --config.proxy_sizes="('1x4x1','1x8x2','1x16x2')"
"""

from __future__ import annotations

import copy
import os
import sys

from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import cli  # noqa: E402
from experiments import overoptimization_lib as lib  # noqa: E402
from jaxrm.io import files, rundir  # noqa: E402

_CONFIG = cli.define_config("overoptimization")
_WORKDIR = flags.DEFINE_string("workdir", "runs/proxy_sensitivity", "Where results go.")
_EPS = flags.DEFINE_float(
  "relative_perturbation", 1e-6, "Relative change of the learning rate in the second run."
)


def main(argv):
  cli.no_arguments(argv)
  cfg = _CONFIG.value
  with cli.one_line_errors():
    lib.validate(cfg)
    if not 0 < abs(_EPS.value) < 1:
      cli.die(f"--relative_perturbation={_EPS.value}: must be in (-1, 1) and non-zero")
    workdir = rundir.prepare(_WORKDIR.value)
  cfg = cfg.for_world(cfg.world_seeds[0])  # one world: the sensitivity of its proxies
  perturbed = copy.deepcopy(cfg)
  perturbed.rm_learning_rate = cfg.rm_learning_rate * (1 + _EPS.value)
  data = lib.build_world(cfg, workdir)
  runs = [lib.train_proxies(c, data, workdir) for c in (cfg, perturbed)]
  rows = []
  print("size  | params | max |d held-out acc| | max |d train loss| | held-out acc (as configured)")
  for a, b in zip(*runs):
    acc_a, acc_b = np.asarray(a["heldout_accuracy"]), np.asarray(b["heldout_accuracy"])
    loss_a, loss_b = np.asarray(a["train_loss"]), np.asarray(b["train_loss"])
    row = {
      "size": a["size"].name,
      "num_params": a["num_params"],
      "heldout_accuracy": acc_a.tolist(),
      "heldout_accuracy_perturbed": acc_b.tolist(),
      "max_abs_accuracy_change": float(np.max(np.abs(acc_a - acc_b))),
      "max_abs_train_loss_change": float(np.max(np.abs(loss_a - loss_b))),
    }
    rows.append(row)
    print(
      f"{row['size']:5s} | {row['num_params']:6d} | {row['max_abs_accuracy_change']:21.4f} | "
      f"{row['max_abs_train_loss_change']:19.2e} | {np.round(acc_a, 3).tolist()}"
    )
  files.write_json(
    os.path.join(workdir, "sensitivity.json"),
    {"relative_perturbation": _EPS.value, "rm_learning_rate": cfg.rm_learning_rate, "sizes": rows},
  )


if __name__ == "__main__":
  cli.run(main)
