"""Export of trained runs to Hugging Face format, tokenizer included.

* :func:`export_reward_model_run`: a reward-model run -> ``*ForSequenceClassification``
  (``num_labels=1``; :func:`jaxrm.io.hf.export_reward_model`);
* :func:`export_policy_run`: an SFT run (or any run whose checkpoints hold ``PolicyModel``
  parameters with ``kind='policy'``) -> ``*ForCausalLM`` (:func:`jaxrm.io.hf.export_policy`).

The family is the one the run was imported from (the checkpoint extra's ``hf.model_type``,
whose ``config.json`` is the base of the exported one, so token ids and other fields are
kept), or ``model_type`` for a run that started from a preset. The run's tokenizer is written
beside the weights (``tokenizer.json``, ``tokenizer_config.json`` with the chat template), and
``bos_token_id``/``eos_token_id``/``pad_token_id`` are set to its ids, so
``AutoTokenizer``/``AutoModel*.from_pretrained(out_dir)`` load the pair. Exporting never
modifies the run.

Example::

  export_reward_model_run("runs/rm_hh", "export/rm")
  export_policy_run("runs/sft_hh", "export/sft")
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp

from jaxrm.data.run_tokenizer import RunTokenizer
from jaxrm.io import hf, rm_io
from jaxrm.models.policy import PolicyModel


def _family(extra: dict[str, Any], model_type: str | None, run_dir: str) -> tuple[str, dict]:
  info = extra.get("hf") or {}
  chosen = model_type or info.get("model_type")
  if chosen is None:
    raise ValueError(
      f"{run_dir} did not start from a Hugging Face checkpoint; pass model_type "
      f"(one of {sorted(hf.FAMILIES)}) to choose the exported family"
    )
  base = dict(info.get("config") or {}) if chosen == info.get("model_type") else {}
  return chosen, base


def _with_tokenizer(base: dict[str, Any], tok: RunTokenizer | None) -> dict[str, Any]:
  if tok is None:
    return base
  ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
  return {**base, **{k: v for k, v in ids.items() if v is not None}}


def _load_tokenizer(run_dir: str) -> RunTokenizer | None:
  try:
    return RunTokenizer.load(run_dir)
  except FileNotFoundError:
    return None


def _save_tokenizer(tok: RunTokenizer | None, out_dir: str) -> None:
  if tok is not None and tok.kind == "hf":
    tok.tok.save(out_dir)


def export_reward_model_run(
  run_dir: str | os.PathLike,
  out_dir: str | os.PathLike,
  *,
  which: str = "latest",
  model_type: str | None = None,
) -> str:
  """Writes a reward-model run as ``*ForSequenceClassification`` (with its tokenizer).

  Args:
    run_dir: the reward-model run directory.
    out_dir: the output folder (created).
    which: ``'latest'`` or ``'best'`` checkpoint.
    model_type: the family for a run that did not start from a checkpoint.

  Returns:
    ``out_dir``.

  Raises:
    ValueError: no family known, or a model the family cannot express.
  """
  run_dir, out_dir = os.fspath(run_dir), os.fspath(out_dir)
  _, params, extra = rm_io.load_reward_model(run_dir, which=which)
  if extra.get("pooling") != "last":
    raise ValueError(
      f"{run_dir} pools by {extra.get('pooling')!r}; *ForSequenceClassification reads the "
      "last token, so only pooling='last' reward models can be exported"
    )
  chosen, base = _family(extra, model_type, run_dir)
  tok = _load_tokenizer(run_dir)
  cfg = rm_io.config_from_json(extra["model_config"])
  hf.export_reward_model(
    out_dir, cfg, params, model_type=chosen, base_config=_with_tokenizer(base, tok)
  )
  _save_tokenizer(tok, out_dir)
  return out_dir


def load_policy_params(run_dir: str | os.PathLike) -> tuple[Any, Any, dict[str, Any]]:
  """``(config, variables, extra)`` of the latest checkpoint of a policy (SFT) run."""
  run_dir = os.fspath(run_dir)

  def template(extra):
    if extra.get("kind") != "policy" or "model_config" not in extra:
      raise ValueError(f"{run_dir} is not a policy run (no kind='policy'/model_config)")
    cfg = rm_io.config_from_json(extra["model_config"])
    dummy = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(PolicyModel(cfg).init, jax.random.key(0), dummy, jnp.ones((1, 1), bool))

  variables, extra = rm_io.load_params(run_dir, template)
  return rm_io.config_from_json(extra["model_config"]), variables, extra


def export_policy_run(
  run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, model_type: str | None = None
) -> str:
  """Writes the latest policy of an SFT run as ``*ForCausalLM`` (with its tokenizer).

  Arguments and errors as in :func:`export_reward_model_run`.
  """
  run_dir, out_dir = os.fspath(run_dir), os.fspath(out_dir)
  cfg, variables, extra = load_policy_params(run_dir)
  chosen, base = _family(extra, model_type, run_dir)
  tok = _load_tokenizer(run_dir)
  hf.export_policy(
    out_dir, cfg, variables, model_type=chosen, base_config=_with_tokenizer(base, tok)
  )
  _save_tokenizer(tok, out_dir)
  return out_dir
