r"""Supervised fine-tuning: a starting policy for RL and best-of-n on real text.

A thin main: it loads the config (``experiments/configs/sft.py``, a
:class:`jaxrm.train.sft.SFTConfig`; any field overridable as ``--config.<field>=<value>``) and
calls :func:`jaxrm.train.sft.train_and_evaluate`, which writes under ``--workdir`` the config,
the run tokenizer (``tokenizer/``), metrics (``metrics.jsonl`` and learning curves) and
checkpoints. Re-running the same command resumes from the last checkpoint. With
``--export_dir`` the final policy is also written as a Hugging Face ``*ForCausalLM`` checkpoint
(with its tokenizer). A bad setting stops the script with one line naming it.

From a local Hugging Face checkpoint, on the chosen side of HH-format preference data::

  python experiments/train_sft.py --config=experiments/configs/sft.py:hf \
      --workdir=runs/sft_hf --export_dir=runs/sft_hf/hf

The result is a policy source: ``--config.policy=runs/sft_hf`` of ``train_policy.py`` and
``best_of_n.py``.
"""

from __future__ import annotations

import os
import sys

from absl import flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import cli  # noqa: E402
from jaxrm.io import rundir  # noqa: E402
from jaxrm.train import sft  # noqa: E402

_CONFIG = cli.define_config("sft")
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Run directory (config, tokenizer, metrics, checkpoints).", required=True
)
_EXPORT_DIR = flags.DEFINE_string(
  "export_dir", None, "Also export the final policy here as a Hugging Face *ForCausalLM."
)
_MODEL_TYPE = flags.DEFINE_string(
  "model_type", None, "Exported family for a policy that did not start from a checkpoint."
)


def main(argv: list[str]) -> None:
  cli.no_arguments(argv)
  rundir.quiet_orbax_logging()
  from jaxrm.data import preferences  # noqa: PLC0415  (TFDS: imported on use)
  from jaxrm.io import hf_runs  # noqa: PLC0415

  cli.check_output_dir("export_dir", _EXPORT_DIR.value)  # before training, not after it
  cli.check_model_type(_MODEL_TYPE.value)
  with cli.one_line_errors():
    try:
      summary = sft.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except preferences.PreferenceDataError as e:
      cli.die(f"malformed data: {e}")
  if _EXPORT_DIR.value:
    try:
      out = hf_runs.export_policy_run(
        summary["workdir"], _EXPORT_DIR.value, model_type=_MODEL_TYPE.value
      )
    except ValueError as e:
      cli.die(f"--export_dir={_EXPORT_DIR.value}: {e}")
    logging.info("Exported the policy to %s", out)


if __name__ == "__main__":
  cli.run(main)
