"""Starting policies for SFT, RL and best-of-n: a preset, a Hugging Face checkpoint or an SFT run.

:func:`load_policy` resolves one string, the ``policy`` field of the SFT, policy and best-of-n
configs, to a :class:`LoadedPolicy` (backbone config, ``PolicyModel`` variables, the run
tokenizer and, for export, the Hugging Face family):

* a preset name (:data:`jaxrm.models.presets.PRESETS`): a randomly initialised policy over the
  byte tokenizer (or over ``tokenizer``'s vocabulary);
* a local Hugging Face checkpoint folder (``config.json`` + safetensors,
  :func:`jaxrm.io.hf.import_policy`); its tokenizer is ``tokenizer`` or, if empty, the
  folder's own ``tokenizer.json``;
* an SFT run directory (``checkpoints/`` of :mod:`jaxrm.train.sft`): the latest checkpoint's
  parameters, with the tokenizer stored with that run (``tokenizer`` must then be empty or
  name the same tokenizer).

Example::

  policy = load_policy("runs/sft_hh", max_len=192)
  logits, _ = PolicyModel(policy.config).apply(policy.variables, tokens, mask)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxrm.data.run_tokenizer import RunTokenizer, has_tokenizer_json
from jaxrm.io import hf, hf_runs, rm_io
from jaxrm.models import presets
from jaxrm.models.policy import PolicyModel
from jaxrm.models.transformer import TransformerConfig


class LoadedPolicy(NamedTuple):
  """A starting policy.

  Attributes:
    config: the backbone configuration (``PolicyModel(config)``).
    variables: ``{'params': ...}`` of ``PolicyModel(config)`` (no value head).
    tok: the tokenizer and convention its text is encoded with.
    hf: ``{'model_type': ..., 'config': <config.json>}`` when it descends from a Hugging Face
      checkpoint (what export writes back), else None.
    kind: ``'preset'``, ``'hf'`` or ``'run'``.
  """

  config: TransformerConfig
  variables: dict[str, Any]
  tok: RunTokenizer
  hf: dict[str, Any] | None
  kind: str


def policy_kind(source: str) -> str:
  """``'preset'``, ``'hf'`` or ``'run'`` for a valid policy source, else ``''``."""
  if source in presets.PRESETS:
    return "preset"
  if os.path.isfile(os.path.join(source, "config.json")) and not os.path.isdir(
    os.path.join(source, rm_io.CHECKPOINT_DIR)
  ):
    return "hf"
  if os.path.isdir(os.path.join(source, rm_io.CHECKPOINT_DIR)):
    return "run"
  return ""


def _with_max_len(cfg: TransformerConfig, max_len: int, where: str) -> TransformerConfig:
  if cfg.position == "learned" and max_len > cfg.max_len:
    raise ValueError(f"{where}: max_len={max_len} exceeds its {cfg.max_len} learned positions")
  return cfg if cfg.position == "learned" else dataclasses.replace(cfg, max_len=max_len)


def load_policy(
  source: str,
  *,
  max_len: int,
  tokenizer: str = "",
  key: jax.Array | None = None,
  dtype: Any = jnp.float32,
  remat: bool = False,
  matmul_dtype: Any = None,
) -> LoadedPolicy:
  """Resolves a policy source (see the module docstring).

  Args:
    source: a preset name, a Hugging Face checkpoint folder or an SFT run directory.
    max_len: the longest sequence (prompt + response) it must accept.
    tokenizer: a folder with ``tokenizer.json`` ('' : see the module docstring).
    key: PRNG key of a preset's initialisation (default ``key(0)``).
    dtype: parameter and compute dtype of a preset or checkpoint (``jnp.bfloat16`` on
      GPU/TPU); an SFT run keeps its own.
    remat: rematerialise block activations (preset or checkpoint).
    matmul_dtype: None (the matmuls in the config's ``dtype``) or the dtype the backbone
      computes in, whatever its parameters' (any source, an SFT run's too): ``jnp.bfloat16``
      with float32 parameters is mixed precision, the projections on bfloat16 operands with
      float32 sums (:mod:`jaxrm.models.precision`).

  Raises:
    ValueError: an unknown source, a checkpoint without a tokenizer, a sequence longer than
      learned positions allow, or a vocabulary smaller than the tokenizer's (naming them).
  """
  kind = policy_kind(source)
  if kind == "preset":
    tok = RunTokenizer.from_source(tokenizer)
    cfg = presets.preset(
      source,
      vocab_size=tok.vocab_size,
      max_len=max_len,
      dtype=dtype,
      param_dtype=dtype,
      remat=remat,
    )
    dummy = jnp.zeros((1, min(max_len, 8)), jnp.int32)
    key = jax.random.key(0) if key is None else key
    variables = jax.jit(PolicyModel(cfg).init)(key, dummy, jnp.ones(dummy.shape, bool))
    out = LoadedPolicy(cfg, variables, tok, None, kind)
  elif kind == "hf":
    if not tokenizer and not has_tokenizer_json(source):
      raise ValueError(f"the checkpoint {source!r} has no tokenizer.json; name a tokenizer folder")
    tok = RunTokenizer.from_source(tokenizer or source)
    model = hf.import_policy(source, max_len=max_len, dtype=dtype, param_dtype=dtype, remat=remat)
    cfg = model.config
    if cfg.max_len < max_len:
      raise ValueError(f"checkpoint {source!r}: max_len={max_len} exceeds its {cfg.max_len}")
    info = {"model_type": model.model_type, "config": model.hf_config}
    out = LoadedPolicy(cfg, model.variables, tok, info, kind)
  elif kind == "run":
    tok = RunTokenizer.load(source)
    if tokenizer and RunTokenizer.from_source(tokenizer).name != tok.name:
      raise ValueError(f"{source} was trained with another tokenizer than {tokenizer}")

    saved_cfg, variables, extra = hf_runs.load_policy_params(source)
    cfg = _with_max_len(saved_cfg, max_len, source)
    out = LoadedPolicy(cfg, variables, tok, extra.get("hf"), kind)
  else:
    raise ValueError(
      f"{source!r} is neither a preset {sorted(presets.PRESETS)}, a Hugging Face checkpoint "
      "folder (config.json) nor an SFT run directory (checkpoints/)"
    )
  if tok.vocab_size > out.config.vocab_size:
    raise ValueError(
      f"{source}: its vocabulary ({out.config.vocab_size}) is smaller than the tokenizer's "
      f"({tok.vocab_size})"
    )
  if matmul_dtype is not None:
    out = out._replace(config=dataclasses.replace(out.config, dtype=matmul_dtype))
  return out
