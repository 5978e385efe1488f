r"""Trains a reward model on preference pairs: local JSONL files or the synthetic world.

A thin main: it parses the flags into a :class:`jaxrm.train.reward_model.TrainConfig` and calls
:func:`jaxrm.train.reward_model.train_and_evaluate`, which writes under ``--workdir`` the metrics
(``metrics.jsonl``), checkpoints (``checkpoints/``), the tokenised dataset (``data/``) and
the report (``rm_report.json``, ``rm_report.md``, ``reliability.png``,
``reward_histogram.png``). Re-running the same command resumes from the last checkpoint.
A bad flag value stops the script with one line naming the flag.

Synthetic world (gold-labelled comparisons; about a minute on a 2-core CPU)::

  python experiments/train_reward_model.py --data=synthetic --workdir=runs/rm_synthetic \
      --steps=300 --batch_size=64 --learning_rate=1e-3 --eval_every=50

HH-RLHF harmless-base, 10% held out (about 6 min on a shared 2-core CPU; see BUILD_NOTES.md
for the measured accuracy)::

  python experiments/train_reward_model.py \
      --data=/work/shared/data/hh-rlhf/harmless-base-test.jsonl.gz --test_fraction=0.1 \
      --max_len=256 --model=tiny --batch_size=32 --steps=300 --learning_rate=1e-3 \
      --warmup_steps=30 --eval_every=50 --checkpoint_every=100 --log_every=25 \
      --workdir=runs/rm_hh

Report of any saved checkpoint: ``python experiments/rm_report.py --workdir=<run>``.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
import tensorflow_datasets as tfds

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import cli  # noqa: E402
from jaxrm import data as data_lib  # noqa: E402
from jaxrm.math import preference  # noqa: E402
from jaxrm.models import presets  # noqa: E402
from jaxrm.train import reward_model as rm_train  # noqa: E402

_DEFAULTS = rm_train.TrainConfig()


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the script's flags on ``flag_values`` (tests pass a fresh ``FlagValues``)."""
  fv = {"flag_values": flag_values}
  d = _DEFAULTS
  flags.DEFINE_string(
    "workdir", None, "Run directory (metrics, checkpoints, data, report).", required=True, **fv
  )
  flags.DEFINE_list(
    "data",
    list(d.data),
    "Comma-separated JSONL(.gz) preference files, or "
    "'synthetic' for the synthetic world's gold-labelled comparisons.",
    **fv,
  )
  flags.DEFINE_list(
    "test_data",
    list(d.test_data),
    "Held-out JSONL files (optional; --test_fraction is then ignored).",
    **fv,
  )
  flags.DEFINE_float(
    "test_fraction", d.test_fraction, "Share of the pairs held out for evaluation, in [0, 1).", **fv
  )
  flags.DEFINE_integer("split_seed", d.split_seed, "Seed of the held-out hash split.", **fv)
  flags.DEFINE_integer(
    "max_len",
    d.max_len,
    "Tokens per sequence (files; the synthetic world fixes its own length).",
    **fv,
  )
  flags.DEFINE_bool(
    "skip_malformed",
    d.skip_malformed,
    "Skip and count malformed JSONL lines instead of failing.",
    **fv,
  )
  flags.DEFINE_bool("bucket", d.bucket, "Length bucketing (power-of-two batch lengths).", **fv)
  flags.DEFINE_integer("synthetic_pairs", d.synthetic_pairs, "Synthetic comparisons.", **fv)
  flags.DEFINE_integer("synthetic_seed", d.synthetic_seed, "Seed of the synthetic world.", **fv)
  flags.DEFINE_enum(
    "synthetic_labels",
    d.synthetic_labels,
    list(rm_train.SYNTHETIC_LABELS),
    "How gold labels the comparisons.",
    **fv,
  )
  flags.DEFINE_float(
    "synthetic_label_noise",
    d.synthetic_label_noise,
    "Rate of flipped synthetic labels, in [0, 0.5].",
    **fv,
  )
  flags.DEFINE_string(
    "synthetic_world",
    "",
    "WorldConfig overrides, e.g. 'policy_layers=1,gold_width=32,num_calibration=2048'.",
    **fv,
  )
  flags.DEFINE_enum("model", d.model, list(presets.PRESETS), "Model-size preset.", **fv)
  flags.DEFINE_enum(
    "pooling",
    d.pooling,
    list(rm_train.POOLINGS),
    "Reward read-out: last real token or mean over tokens.",
    **fv,
  )
  flags.DEFINE_enum("loss", d.loss, list(preference.LOSS_NAMES), "Pairwise loss.", **fv)
  flags.DEFINE_float(
    "margin", d.margin, "Loss margin (default: the loss's own, 0; 1 for hinge).", **fv
  )
  flags.DEFINE_float("label_smoothing", d.label_smoothing, "Label smoothing in [0, 1].", **fv)
  flags.DEFINE_float("center_coef", d.center_coef, "Reward-centring penalty coefficient.", **fv)
  flags.DEFINE_integer("batch_size", d.batch_size, "Pairs per step (global).", **fv)
  flags.DEFINE_integer("steps", d.steps, "Optimizer steps.", **fv)
  flags.DEFINE_float("learning_rate", d.learning_rate, "Peak AdamW learning rate.", **fv)
  flags.DEFINE_integer("warmup_steps", d.warmup_steps, "Linear warm-up steps.", **fv)
  flags.DEFINE_float("weight_decay", d.weight_decay, "AdamW weight decay (matrices).", **fv)
  flags.DEFINE_float("grad_clip", d.grad_clip, "Global-norm gradient clipping (0: none).", **fv)
  flags.DEFINE_integer("eval_every", d.eval_every, "Held-out evaluation period (steps).", **fv)
  flags.DEFINE_integer("log_every", d.log_every, "Training-metrics period (steps).", **fv)
  flags.DEFINE_integer("checkpoint_every", d.checkpoint_every, "Checkpoint period (steps).", **fv)
  flags.DEFINE_integer(
    "keep_checkpoints", d.keep_checkpoints, "Most recent checkpoints kept (plus the best).", **fv
  )
  flags.DEFINE_integer("seed", d.seed, "Seed of initialisation, step keys and data order.", **fv)
  flags.DEFINE_enum(
    "parallel",
    d.parallel,
    list(rm_train.PARALLEL_MODES),
    "Execution mode (auto: shard_map with several devices, else jit).",
    **fv,
  )
  flags.DEFINE_enum(
    "nonfinite",
    d.nonfinite,
    ["skip", "raise"],
    "On a non-finite loss or gradient: skip the update, or stop.",
    **fv,
  )
  flags.DEFINE_bool("report", d.report, "Write the report at the end.", **fv)


def config_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> rm_train.TrainConfig:
  """The :class:`jaxrm.train.reward_model.TrainConfig` of the parsed flags.

  Raises:
    jaxrm.train.reward_model.ConfigError: for a malformed ``--synthetic_world``.
  """
  f = flag_values
  names = [
    n
    for n in rm_train.TrainConfig.__dataclass_fields__
    if n not in ("data", "test_data", "synthetic_world")
  ]
  return rm_train.TrainConfig(
    data=tuple(f.data),
    test_data=tuple(f.test_data),
    synthetic_world=rm_train.parse_world_overrides(f.synthetic_world),
    **{n: f[n].value for n in names},
  )


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    cli.die(f"unexpected arguments {argv[1:]}")
  rm_train.quiet_orbax_logging()
  tfds.disable_progress_bar()
  try:
    config = config_from_flags()
    rm_train.validate_config(config)
    summary = rm_train.train_and_evaluate(config, flags.FLAGS.workdir)
  except rm_train.ConfigError as e:
    cli.die(e.flag_message())
  except data_lib.PreferenceDataError as e:
    cli.die(f"malformed data (pass --skip_malformed to skip such lines): {e}")
  if summary["report"]:
    logging.info("Report: %s", summary["report"]["markdown"])


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
