"""Hugging Face checkpoints in and out: ``config.json`` + ``*.safetensors`` <-> jaxrm models.

Import reads a local checkpoint folder (no network): ``config.json`` and either
``model.safetensors`` or the shards listed in ``model.safetensors.index.json``. It returns a
:class:`jaxrm.models.transformer.TransformerConfig` and the flax variables of a
:class:`jaxrm.models.policy.PolicyModel` (:func:`import_policy`) or a
:class:`jaxrm.models.reward_model.RewardModel` (:func:`import_reward_model`). The config carries
everything the model needs (norm, MLP, attention layout, RoPE, biases, tied embeddings), so
``PolicyModel(config)`` / ``RewardModel(config)`` is the model to apply.

Export writes the inverse: :func:`export_policy` as ``*ForCausalLM`` and
:func:`export_reward_model` as ``*ForSequenceClassification`` (``num_labels=1``), so tools
that read Hugging Face checkpoints (transformers, TRL, vLLM, RewardBench) load what jaxrm
trained. Export -> import is exact.

Supported families (``config.json`` ``model_type``):

* ``gpt2``: LayerNorm, learned positions, tanh-GELU MLP, fused QKV with biases, tied LM head.
* ``llama``, ``mistral``, ``qwen2``: RMSNorm, SwiGLU, grouped-query attention, RoPE with
  ``rope_theta`` and ``rope_scaling``/``rope_parameters`` (``default``, ``linear``,
  ``llama3``), optional attention/MLP biases (Qwen2: q/k/v biases), tied or untied LM head.

The config and per-tensor mapping live in :mod:`jaxrm.io.hf_mapping` (re-exported here);
BUILD_NOTES.md lists it per family. Hugging Face
``nn.Linear`` weights are ``[out, in]`` and are transposed (and split into heads); GPT-2's
``Conv1D`` weights are already ``[in, out]``. A ``*ForSequenceClassification`` score head
(``score.weight [1, width]``, no bias) becomes the reward head; the reward is read at the
last real token, as Hugging Face does with right padding. A checkpoint without a score head
(``*ForCausalLM``) gives a reward model whose head is zero (every reward 0 until trained).
A value head (``import_policy(value_head=True)``) starts at zero.

Errors name the checkpoint folder, the tensor or config field and the expected value, e.g.
``checkpoint 'ckpt/': tensor 'model.layers.1.self_attn.k_proj.weight' is missing (expected
shape (256, 2048))``.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxrm.io.hf_mapping import (
  FAMILIES,
  Array,
  Entry,
  checkpoint_error,
  hf_config_for,
  model_type_of,
  tensor_map,
  transformer_config,
)
from jaxrm.models.transformer import TransformerConfig

__all__ = [
  "FAMILIES",
  "HFModel",
  "export_policy",
  "export_reward_model",
  "hf_config_for",
  "import_policy",
  "import_reward_model",
  "load_tensors",
  "read_hf_config",
  "tensor_map",
  "transformer_config",
]


class HFModel(NamedTuple):
  """An imported checkpoint.

  Attributes:
    config: the backbone configuration (build ``PolicyModel(config)`` or
      ``RewardModel(config)`` from it).
    variables: flax variables ``{'params': ...}`` of that model.
    model_type: the checkpoint's ``model_type`` (``'gpt2'``, ``'llama'``, ``'mistral'``,
      ``'qwen2'``); export writes the same type back.
    hf_config: the checkpoint's ``config.json`` as a dict (export starts from it).
  """

  config: TransformerConfig
  variables: dict[str, Any]
  model_type: str
  hf_config: dict[str, Any]


# ------------------------------------------------------------------------------------ config


def read_hf_config(path: str) -> dict[str, Any]:
  """Reads ``<path>/config.json``; errors name the folder."""
  file = os.path.join(path, "config.json")
  if not os.path.isfile(file):
    raise checkpoint_error(path, "has no config.json (expected a Hugging Face checkpoint folder)")
  with open(file) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise checkpoint_error(path, f"config.json is not valid JSON ({e})") from None


# ---------------------------------------------------------------------------------- tensors


@contextlib.contextmanager
def _open_tensors(path: str, file: str):
  """``safe_open(file)``; a file that is not safetensors (a truncated download, a Git LFS
  pointer) or lacks a tensor is a :func:`checkpoint_error` naming it."""
  name = os.path.basename(file)
  try:
    with open(file, "rb") as f:
      lfs = f.read(len(_LFS_POINTER)) == _LFS_POINTER
  except OSError as e:
    raise checkpoint_error(path, f"{name} cannot be read: {e.strerror or e}") from None
  if lfs:
    raise checkpoint_error(path, f"{name} is a Git LFS pointer, not the weights (run git lfs pull)")
  try:
    with safe_open(file, framework="np") as f:
      yield f
  except SafetensorError as e:
    raise checkpoint_error(
      path, f"{name} is not a readable safetensors file ({e}); an incomplete download?"
    ) from None


_LFS_POINTER = b"version https://git-lfs"


def _safetensor_files(path: str) -> dict[str, str]:
  """Tensor name -> file, from ``model.safetensors.index.json`` or ``model.safetensors``."""
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      try:
        parsed = json.load(f)
      except json.JSONDecodeError as e:
        raise checkpoint_error(
          path, f"model.safetensors.index.json is not valid JSON ({e})"
        ) from None
    weight_map = parsed.get("weight_map") if isinstance(parsed, dict) else None
    if not isinstance(weight_map, dict):
      raise checkpoint_error(path, "model.safetensors.index.json has no 'weight_map' object")
    files = {n: os.path.join(path, f) for n, f in weight_map.items()}
    for file in sorted(set(files.values())):
      if not os.path.isfile(file):
        raise checkpoint_error(
          path, f"shard {os.path.basename(file)!r} listed in the index is missing"
        )
    return files
  single = os.path.join(path, "model.safetensors")
  if not os.path.isfile(single):
    raise checkpoint_error(path, "has neither model.safetensors nor model.safetensors.index.json")
  with _open_tensors(path, single) as f:
    return {n: single for n in f.keys()}


def load_tensors(path: str, names: list[str] | None = None) -> dict[str, Array]:
  """Reads tensors (all, or ``names``) of a checkpoint folder as NumPy arrays.

  bfloat16 tensors come back as ``ml_dtypes.bfloat16`` arrays.
  """
  files = _safetensor_files(path)
  wanted = sorted(files) if names is None else [n for n in names if n in files]
  by_file: dict[str, list[str]] = {}
  for n in wanted:
    by_file.setdefault(files[n], []).append(n)
  out = {}
  for file, ns in by_file.items():
    with _open_tensors(path, file) as f:
      held = set(f.keys())
      for n in ns:
        if n not in held:
          raise checkpoint_error(
            path, f"{os.path.basename(file)} does not hold tensor {n!r} (the index says it does)"
          )
        out[n] = f.get_tensor(n)
  return out


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _import(path, *, head, max_len, dtype, param_dtype, remat) -> tuple[HFModel, list[Entry]]:
  path = str(path)
  hf = read_hf_config(path)
  model_type = model_type_of(hf, path)
  cfg = transformer_config(
    hf, path=path, max_len=max_len, dtype=dtype, param_dtype=param_dtype, remat=remat
  )
  files = _safetensor_files(path)
  if head == "reward" and "score.weight" not in files:
    entries = tensor_map(cfg, model_type, head="none")
  else:
    entries = tensor_map(cfg, model_type, head=head)
  tensors = load_tensors(path, [e.name for e in entries])
  unused = sorted(set(files) - {e.name for e in entries})
  if unused:  # e.g. the LM head of a causal LM imported as a reward model; or a config mismatch
    shown = ", ".join(unused[:8]) + (", ..." if len(unused) > 8 else "")
    logging.warning("checkpoint %r: %d tensors not used: %s", path, len(unused), shown)
  params: dict[str, Any] = {}
  for e in entries:
    if e.name not in tensors:
      raise checkpoint_error(path, f"tensor {e.name!r} is missing (expected shape {e.shape})")
    x = tensors[e.name]
    if tuple(x.shape) != e.shape:
      raise checkpoint_error(
        path, f"tensor {e.name!r} has shape {tuple(x.shape)}, expected {e.shape}"
      )
    value = np.asarray(e.to_jax(np.asarray(x, np.float32)))
    _set(params, e.path, jnp.asarray(value, param_dtype))
  return HFModel(cfg, {"params": params}, model_type, hf), entries


def import_policy(
  path: str | os.PathLike,
  *,
  value_head: bool = False,
  max_len: int | None = None,
  dtype: Any = jnp.float32,
  param_dtype: Any = jnp.float32,
  remat: bool = False,
) -> HFModel:
  """Imports a ``*ForCausalLM`` checkpoint as :class:`jaxrm.models.policy.PolicyModel` variables.

  Args:
    path: local folder with ``config.json`` and safetensors weights.
    value_head: add a zero-initialised value head (``PolicyModel(config, value_head=True)``).
    max_len: see :func:`transformer_config`.
    dtype: compute dtype.
    param_dtype: parameter dtype (``jnp.bfloat16`` halves the memory).
    remat: rematerialise block activations in the backward pass.

  Returns:
    :class:`HFModel`; ``PolicyModel(model.config).apply(model.variables, tokens, mask)``
    gives the checkpoint's logits.
  """
  model, _ = _import(
    path, head="policy", max_len=max_len, dtype=dtype, param_dtype=param_dtype, remat=remat
  )
  if value_head:
    w = model.config.width
    model.variables["params"]["value_head"] = {
      "kernel": jnp.zeros((w, 1), param_dtype),
      "bias": jnp.zeros((1,), param_dtype),
    }
  return model


def import_reward_model(
  path: str | os.PathLike,
  *,
  max_len: int | None = None,
  dtype: Any = jnp.float32,
  param_dtype: Any = jnp.float32,
  remat: bool = False,
) -> HFModel:
  """Imports a checkpoint as :class:`jaxrm.models.reward_model.RewardModel` variables.

  A ``*ForSequenceClassification`` checkpoint (``num_labels=1``) keeps its score head as the
  reward head; any other checkpoint of a supported family (e.g. ``*ForCausalLM``) gives its
  backbone with a zero reward head, ready to be trained. Arguments as in
  :func:`import_policy`.
  """
  path = str(path)
  model, _ = _import(
    path, head="reward", max_len=max_len, dtype=dtype, param_dtype=param_dtype, remat=remat
  )
  params = model.variables["params"]
  if "head" not in params:
    params["head"] = {"kernel": jnp.zeros((model.config.width, 1), param_dtype)}
  return model


# ------------------------------------------------------------------------------------ export


def _export(path, config, variables, model_type, head, base) -> None:
  path = str(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"export folder {path!r} is a file, not a directory")
  held = sorted(os.listdir(path)) if os.path.isdir(path) else []
  if held:  # stale files (another checkpoint's shards and index) would be read with the new ones
    shown = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
    raise ValueError(
      f"export folder {path!r} is not empty (it holds {shown}); export into a new or empty folder"
    )
  hf = hf_config_for(config, model_type, head=head, base=base)
  params = variables["params"] if "params" in variables else variables
  tensors = {}
  for e in tensor_map(config, model_type, head=head):
    try:
      leaf = _get(params, e.path)
    except (KeyError, TypeError):
      raise ValueError(
        f"params has no leaf {'/'.join(e.path)} (needed for tensor {e.name!r})"
      ) from None
    value = np.asarray(jax.device_get(leaf))
    tensors[e.name] = np.ascontiguousarray(e.to_hf(value)).astype(value.dtype)
    if tensors[e.name].shape != e.shape:
      raise ValueError(
        f"params leaf {'/'.join(e.path)} has shape {value.shape}; tensor {e.name!r} needs {e.shape}"
      )
  os.makedirs(path, exist_ok=True)
  save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f, indent=2, sort_keys=True)


def export_policy(
  path: str | os.PathLike,
  config: TransformerConfig,
  variables: dict[str, Any],
  *,
  model_type: str,
  base_config: dict[str, Any] | None = None,
) -> None:
  """Writes a policy as a Hugging Face ``*ForCausalLM`` checkpoint (config + safetensors).

  Args:
    path: output folder (created).
    config: the policy's backbone configuration; must be expressible as ``model_type``.
    variables: ``PolicyModel`` variables (a value head, if any, is not exported).
    model_type: ``'gpt2'``, ``'llama'``, ``'mistral'`` or ``'qwen2'``.
    base_config: the imported ``config.json`` (``HFModel.hf_config``) to keep its other
      fields (token ids, ...).
  """
  _export(path, config, variables, model_type, "policy", base_config)


def export_reward_model(
  path: str | os.PathLike,
  config: TransformerConfig,
  variables: dict[str, Any],
  *,
  model_type: str,
  base_config: dict[str, Any] | None = None,
) -> None:
  """Writes a reward model as ``*ForSequenceClassification`` (``num_labels=1``).

  Hugging Face reads the score at the last non-pad token, which equals jaxrm's
  ``pooling='last'`` for right-padded inputs; set ``pad_token_id`` in ``base_config`` so that
  batched inputs are pooled correctly there. Arguments as in :func:`export_policy`.
  """
  _export(path, config, variables, model_type, "reward", base_config)
