r"""Exports a trained run to Hugging Face format (safetensors + config.json + tokenizer).

A reward-model run (``train_reward_model.py``) becomes ``*ForSequenceClassification``
(``num_labels=1``), a policy run (``train_sft.py``) ``*ForCausalLM``; the family is the one the
run was imported from (``--model_type`` for runs that started from a preset)::

  python experiments/export_hf.py --workdir=runs/rm_hf --out=export/rm
  python experiments/export_hf.py --workdir=runs/sft_hf --out=export/sft

``transformers``' ``AutoModelForSequenceClassification`` / ``AutoModelForCausalLM`` and
``AutoTokenizer`` then load ``--out`` (TRL, vLLM, RewardBench).
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import cli  # noqa: E402
from jaxrm.io import rundir  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "The run directory to export.", required=True)
_OUT = flags.DEFINE_string("out", None, "Output folder.", required=True)
_WHICH = flags.DEFINE_enum("which", "latest", ["latest", "best"], "Reward models: checkpoint.")
_MODEL_TYPE = flags.DEFINE_string("model_type", None, "Family for runs started from a preset.")


def main(argv: list[str]) -> None:
  cli.no_arguments(argv)
  rundir.quiet_orbax_logging()
  from jaxrm.io import hf_runs  # noqa: PLC0415

  workdir = _WORKDIR.value
  cli.check_output_dir("out", _OUT.value)
  cli.check_model_type(_MODEL_TYPE.value)
  config = os.path.join(workdir, rundir.CONFIG_FILE)
  if not os.path.isfile(config):
    cli.die(f"--workdir={workdir}: not a run directory (no {rundir.CONFIG_FILE})")
  with open(config) as f:
    try:
      saved = json.load(f)
    except json.JSONDecodeError as e:
      cli.die(f"--workdir={workdir}: {rundir.CONFIG_FILE} is not valid JSON ({e})")
  kind = saved.get("kind", "reward_model") if isinstance(saved, dict) else None
  if kind is None:
    cli.die(f"--workdir={workdir}: {rundir.CONFIG_FILE} does not hold a run's config object")
  try:
    if kind == "policy":
      out = hf_runs.export_policy_run(workdir, _OUT.value, model_type=_MODEL_TYPE.value)
    else:
      out = hf_runs.export_reward_model_run(
        workdir, _OUT.value, which=_WHICH.value, model_type=_MODEL_TYPE.value
      )
  except (ValueError, FileNotFoundError, RuntimeError) as e:
    cli.die(f"--workdir={workdir}: {e}")
  print(out)


if __name__ == "__main__":
  cli.run(main)
