r"""Reward over-optimisation (Gao, Schulman & Hilton 2022) in jaxrm's synthetic RLHF world.

Builds a world (pi_init, gold, gold-labelled comparisons), trains proxy reward models of
several sizes (all seeds of a size at once), optimises against each proxy by best-of-n and by
PPO, fits Gao et al.'s functional forms and writes under ``--workdir``:
``results.json``, ``figure1.png``, ``coefficients.png``, ``summary.md`` and the stage caches;
an interrupted run resumes from its finished stages.

Default run (about 15 min on a 2-core CPU)::

  python experiments/overoptimization.py --workdir=runs/overopt

Smoke run (about 1-2 min)::

  python experiments/overoptimization.py --workdir=/tmp/overopt_quick --quick
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import cli  # noqa: E402
from experiments import overoptimization_analysis as analysis  # noqa: E402
from experiments import overoptimization_lib as lib  # noqa: E402
from jaxrm.data import synthetic  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "runs/overopt", "Where results and caches go.")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny settings for a smoke run (about a minute).")
_SEEDS = flags.DEFINE_integer("seeds", None, "Proxy/RL seeds per size (default 3).")
_NUM_COMPARISONS = flags.DEFINE_integer(
  "num_comparisons", None, "Gold-labelled comparisons for the proxies."
)
_DATA_SIZES = flags.DEFINE_list(
  "data_sizes",
  [],
  "Extra comparison-data sizes: also train every proxy size on "
  "each and report best-of-n gold against data size.",
)
_LABELS = flags.DEFINE_enum(
  "labels", None, ["deterministic", "bradley_terry"], "How gold labels the comparisons."
)
_LABEL_NOISE = flags.DEFINE_float("label_noise", None, "Rate of flipped labels, in [0, 0.5].")
_PROXY_SIZES = flags.DEFINE_list(
  "proxy_sizes", None, "Proxy architectures as LAYERSxWIDTHxHEADS, e.g. 1x8x2,2x96x4."
)
_BON_MAX_N = flags.DEFINE_integer("bon_max_n", None, "Largest n of best-of-n.")
_BON_SAMPLES = flags.DEFINE_integer("bon_samples", None, "Samples per prompt (N >= max n).")
_RL_STEPS = flags.DEFINE_integer("rl_steps", None, "PPO steps per proxy (0 skips RL).")
_KL_COEF = flags.DEFINE_float("kl_coef", None, "KL penalty coefficient of PPO.")
_RL_LEARNING_RATE = flags.DEFINE_float("rl_learning_rate", None, "Adam learning rate of PPO.")
_WORLD_SEED = flags.DEFINE_integer("world_seed", None, "Seed of the world.")
_WORLD = flags.DEFINE_string(
  "world",
  "",
  "WorldConfig overrides, e.g. 'feature_quantile=0.9,gold_width=32' (see jaxrm.data.synthetic).",
)


def _parse_sizes(values: list[str]) -> tuple[lib.ProxySize, ...]:
  sizes = []
  for v in values:
    try:
      layers, width, heads = (int(x) for x in v.lower().split("x"))
      sizes.append(lib.ProxySize(layers, width, heads))
    except ValueError:
      raise app.UsageError(f"--proxy_sizes: {v!r} is not LAYERSxWIDTHxHEADS") from None
    if width % heads:
      raise app.UsageError(f"--proxy_sizes: width {width} not divisible by heads {heads}")
  return tuple(sizes)


def quick_config() -> lib.StudyConfig:
  """Tiny settings: every stage and output, none of the statistics."""
  return lib.StudyConfig(
    world=synthetic.WorldConfig(num_calibration=2048, gold_width=32),
    num_comparisons=512,
    num_heldout=256,
    num_seeds=2,
    rm_epochs=1,
    proxy_sizes=(lib.ProxySize(1, 8, 2), lib.ProxySize(1, 16, 2), lib.ProxySize(1, 32, 2)),
    bon_prompts=2,
    bon_samples=512,
    bon_max_n=256,
    rl_steps=6,
    rl_batch_size=16,
    rl_log_every=2,
  )


def config_from_flags() -> lib.StudyConfig:
  cfg = quick_config() if _QUICK.value else lib.StudyConfig()
  overrides = {
    "num_seeds": _SEEDS.value,
    "num_comparisons": _NUM_COMPARISONS.value,
    "labels": _LABELS.value,
    "label_noise": _LABEL_NOISE.value,
    "bon_max_n": _BON_MAX_N.value,
    "bon_samples": _BON_SAMPLES.value,
    "rl_steps": _RL_STEPS.value,
    "kl_coef": _KL_COEF.value,
    "rl_learning_rate": _RL_LEARNING_RATE.value,
    "world_seed": _WORLD_SEED.value,
  }
  overrides = {k: v for k, v in overrides.items() if v is not None}
  if _WORLD.value:
    try:
      overrides["world"] = dataclasses.replace(
        cfg.world, **synthetic.parse_world_overrides(_WORLD.value)
      )
    except ValueError as e:
      raise app.UsageError(f"--world: {e}") from None
  if _PROXY_SIZES.value is not None:
    overrides["proxy_sizes"] = _parse_sizes(_PROXY_SIZES.value)
  if _DATA_SIZES.value:
    try:
      overrides["data_sizes"] = tuple(int(x) for x in _DATA_SIZES.value)
    except ValueError:
      raise app.UsageError(f"--data_sizes: {_DATA_SIZES.value} are not integers") from None
  cfg = dataclasses.replace(cfg, **overrides)
  try:
    lib.validate(cfg)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  return cfg


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cfg = config_from_flags()
  os.makedirs(_WORKDIR.value, exist_ok=True)
  start = time.perf_counter()
  results = lib.run_study(cfg, _WORKDIR.value)
  results = analysis.analyse(results, _WORKDIR.value)
  for c in results["checks"]:
    print(f"{'PASS' if c['passed'] else 'FAIL'}  {c['name']}: {c['detail']}")
  logging.info(
    "study finished in %.0fs; results in %s", time.perf_counter() - start, _WORKDIR.value
  )


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
