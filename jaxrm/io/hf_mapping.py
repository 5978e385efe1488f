"""What corresponds to what between Hugging Face checkpoints and jaxrm (no file I/O).

:func:`transformer_config` turns a ``config.json`` dict into a
:class:`jaxrm.models.transformer.TransformerConfig` and :func:`hf_config_for` goes back;
:func:`tensor_map` lists, per Hugging Face tensor, its name and shape, the jaxrm parameter path
and the two conversions (``nn.Linear`` weights ``[out, in]`` are transposed and split into
heads; GPT-2's ``Conv1D`` weights are already ``[in, out]``). :mod:`jaxrm.io.hf` reads and writes
the files. BUILD_NOTES.md tabulates the mapping per family.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import math
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from jaxrm.models.transformer import RopeScaling, TransformerConfig

FAMILIES = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama", "qwen2": "llama"}
_ARCH_PREFIX = {"gpt2": "GPT2", "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}

Array = np.ndarray


class Entry(NamedTuple):
  """One tensor of the mapping: Hugging Face name and shape <-> jaxrm parameter path."""

  name: str  # Hugging Face tensor name
  shape: tuple[int, ...]  # shape in the Hugging Face checkpoint
  path: tuple[str, ...]  # path in the flax params tree
  to_jax: Callable[[Array], Array]
  to_hf: Callable[[Array], Array]


def checkpoint_error(path: str, message: str) -> ValueError:
  """A ``ValueError`` whose message starts with the checkpoint's name."""
  return ValueError(f"checkpoint {str(path)!r}: {message}")


# ------------------------------------------------------------------------------------ config


def model_type_of(hf: dict[str, Any], path: str) -> str:
  model_type = hf.get("model_type")
  if model_type not in FAMILIES:
    archs = hf.get("architectures")
    raise checkpoint_error(
      path,
      f"unsupported architecture model_type={model_type!r} (architectures={archs}); "
      f"supported model_type values: {sorted(FAMILIES)}",
    )
  return model_type


_REQUIRED = object()


def _field(
  d: dict[str, Any],
  key: str,
  kind: type,
  path: str,
  default: Any = _REQUIRED,
  *,
  where: str = "config.json",
) -> Any:
  """``kind(d[key])`` (``default`` where the key is absent or null and a default is given);
  a missing field or a value of another type is a :func:`checkpoint_error` naming the field."""
  value = d.get(key)
  if value is None:
    if default is _REQUIRED:
      raise checkpoint_error(path, f"{where} has no field {key!r} (or it is null)")
    return default
  if (
    isinstance(value, bool)
    or not isinstance(value, (int, float))
    or not math.isfinite(value)
    or (kind is int and value != int(value))
  ):
    want = "an integer" if kind is int else "a number"
    raise checkpoint_error(path, f"{where} field {key!r} must be {want}, got {value!r}")
  return kind(value)


def _rope(hf: dict[str, Any], path: str) -> tuple[float, RopeScaling | None]:
  """(theta, scaling) from ``rope_parameters`` (transformers >= 5) or ``rope_scaling``."""
  params, scaling = hf.get("rope_parameters") or {}, hf.get("rope_scaling") or {}
  for name, value in (("rope_parameters", params), ("rope_scaling", scaling)):
    if not isinstance(value, dict):
      raise checkpoint_error(path, f"config.json field {name!r} must be an object, got {value!r}")
  theta = _field(params, "rope_theta", float, path, _field(hf, "rope_theta", float, path, 1e4))
  spec = params if params.get("rope_type", "default") != "default" else scaling
  where = "config.json " + ("rope_parameters" if spec is params else "rope_scaling")
  kind = spec.get("rope_type", spec.get("type", "default"))
  if kind == "default" or not spec:
    return theta, None
  if kind == "linear":
    return theta, RopeScaling("linear", _field(spec, "factor", float, path, where=where))
  if kind == "llama3":
    return theta, RopeScaling(
      "llama3",
      _field(spec, "factor", float, path, where=where),
      low_freq_factor=_field(spec, "low_freq_factor", float, path, where=where),
      high_freq_factor=_field(spec, "high_freq_factor", float, path, where=where),
      original_max_len=_field(spec, "original_max_position_embeddings", int, path, where=where),
    )
  raise checkpoint_error(
    path, f"rope type {kind!r} is not supported (supported: default, linear, llama3)"
  )


def transformer_config(
  hf: dict[str, Any],
  *,
  path: str = "<config>",
  max_len: int | None = None,
  dtype: Any = jnp.float32,
  param_dtype: Any = jnp.float32,
  remat: bool = False,
) -> TransformerConfig:
  """The :class:`TransformerConfig` equivalent to a Hugging Face ``config.json`` dict.

  Args:
    hf: the parsed ``config.json``.
    path: checkpoint name used in error messages.
    max_len: longest sequence to accept (default ``max_position_embeddings``, or
      ``sliding_window`` when that is shorter: jaxrm attends over the whole context, which
      equals sliding-window attention only up to the window). GPT-2 needs its full
      ``n_positions`` table, so ``max_len`` must not exceed it.
    dtype: compute dtype (float32 or bfloat16).
    param_dtype: parameter dtype (float32 or bfloat16).
    remat: rematerialise block activations in the backward pass.

  Returns:
    The configuration.
  """
  if not isinstance(hf, dict):
    raise checkpoint_error(path, f"config.json must hold a JSON object, got {type(hf).__name__}")
  model_type = model_type_of(hf, path)
  common = dict(
    vocab_size=_field(hf, "vocab_size", int, path), dtype=dtype, param_dtype=param_dtype
  )
  common.update(remat=remat, head_bias=False)
  if FAMILIES[model_type] == "gpt2":
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
      raise checkpoint_error(
        path, f"activation_function={act!r} is not supported (expected 'gelu_new')"
      )
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
      if hf.get(flag):
        raise checkpoint_error(path, f"{flag}=true is not supported (expected false)")
    if not hf.get("scale_attn_weights", True):
      raise checkpoint_error(path, "scale_attn_weights=false is not supported (expected true)")
    width = _field(hf, "n_embd", int, path)
    n_positions = _field(hf, "n_positions", int, path)
    if max_len is not None and max_len > n_positions:
      raise checkpoint_error(path, f"max_len={max_len} exceeds n_positions={n_positions}")
    return TransformerConfig(
      num_layers=_field(hf, "n_layer", int, path),
      width=width,
      num_heads=_field(hf, "n_head", int, path),
      max_len=n_positions,  # the learned table is used whole; longer inputs are rejected
      mlp_dim=_field(hf, "n_inner", int, path, 4 * width),
      position="learned",
      layer_norm_eps=_field(hf, "layer_norm_epsilon", float, path, 1e-5),
      tie_embeddings=True,
      **common,
    )
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise checkpoint_error(path, f"hidden_act={act!r} is not supported (expected 'silu')")
  width, heads = _field(hf, "hidden_size", int, path), _field(hf, "num_attention_heads", int, path)
  head_dim = _field(hf, "head_dim", int, path, None)
  if head_dim is not None and head_dim * heads != width:
    raise checkpoint_error(
      path,
      f"head_dim={head_dim} with num_attention_heads={heads} is not hidden_size={width}; "
      "jaxrm needs head_dim = hidden_size / num_attention_heads",
    )
  theta, scaling = _rope(hf, path)
  limit = _field(hf, "max_position_embeddings", int, path)
  window = (
    _field(hf, "sliding_window", int, path, None) if hf.get("use_sliding_window", True) else None
  )
  if window:
    limit = min(limit, window)
  if max_len is not None:
    if window and max_len > window:
      raise checkpoint_error(
        path, f"max_len={max_len} exceeds sliding_window={window} (not supported)"
      )
    limit = max_len
  bias = bool(hf.get("attention_bias", False))
  return TransformerConfig(
    num_layers=_field(hf, "num_hidden_layers", int, path),
    width=width,
    num_heads=heads,
    num_kv_heads=_field(hf, "num_key_value_heads", int, path, heads),
    max_len=limit,
    mlp_dim=_field(hf, "intermediate_size", int, path),
    norm="rmsnorm",
    mlp="swiglu",
    rope_base=theta,
    rope_scaling=scaling,
    layer_norm_eps=_field(hf, "rms_norm_eps", float, path, 1e-6),
    qkv_bias=bias or model_type == "qwen2",
    attn_out_bias=bias,
    mlp_bias=bool(hf.get("mlp_bias", False)),
    tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    **common,
  )


# ----------------------------------------------------------------------------------- mapping


def _ident(x):
  return x


def _t(x):
  return np.ascontiguousarray(np.asarray(x).T)


def _gpt2_map(cfg: TransformerConfig, prefix: str) -> list[Entry]:
  w, h, d, m = cfg.width, cfg.num_heads, cfg.head_dim, cfg.hidden_dim
  p = prefix
  out = [
    Entry(f"{p}wte.weight", (cfg.vocab_size, w), ("embed", "embedding"), _ident, _ident),
    Entry(f"{p}wpe.weight", (cfg.max_len, w), ("pos_embed", "embedding"), _ident, _ident),
  ]
  for i in range(cfg.num_layers):
    b, hp = f"block_{i}", f"{p}h.{i}."
    out += [
      Entry(f"{hp}ln_1.weight", (w,), (b, "ln_attn", "scale"), _ident, _ident),
      Entry(f"{hp}ln_1.bias", (w,), (b, "ln_attn", "bias"), _ident, _ident),
      Entry(
        f"{hp}attn.c_attn.weight",
        (w, 3 * w),
        (b, "qkv", "kernel"),
        lambda x: x.reshape(w, 3, h, d),
        lambda x: x.reshape(w, 3 * w),
      ),
      Entry(
        f"{hp}attn.c_attn.bias",
        (3 * w,),
        (b, "qkv", "bias"),
        lambda x: x.reshape(3, h, d),
        lambda x: x.reshape(3 * w),
      ),
      Entry(
        f"{hp}attn.c_proj.weight",
        (w, w),
        (b, "attn_out", "kernel"),
        lambda x: x.reshape(h, d, w),
        lambda x: x.reshape(w, w),
      ),
      Entry(f"{hp}attn.c_proj.bias", (w,), (b, "attn_out", "bias"), _ident, _ident),
      Entry(f"{hp}ln_2.weight", (w,), (b, "ln_mlp", "scale"), _ident, _ident),
      Entry(f"{hp}ln_2.bias", (w,), (b, "ln_mlp", "bias"), _ident, _ident),
      Entry(f"{hp}mlp.c_fc.weight", (w, m), (b, "mlp_in", "kernel"), _ident, _ident),
      Entry(f"{hp}mlp.c_fc.bias", (m,), (b, "mlp_in", "bias"), _ident, _ident),
      Entry(f"{hp}mlp.c_proj.weight", (m, w), (b, "mlp_out", "kernel"), _ident, _ident),
      Entry(f"{hp}mlp.c_proj.bias", (w,), (b, "mlp_out", "bias"), _ident, _ident),
    ]
  out += [
    Entry(f"{p}ln_f.weight", (w,), ("ln_final", "scale"), _ident, _ident),
    Entry(f"{p}ln_f.bias", (w,), ("ln_final", "bias"), _ident, _ident),
  ]
  return out


def _heads_in(w: int, n: int, d: int) -> tuple[Callable, Callable]:
  """``nn.Linear`` ``[n*d, w]`` <-> DenseGeneral kernel ``[w, n, d]``."""
  return (lambda x: _t(x).reshape(w, n, d), lambda x: _t(np.asarray(x).reshape(w, n * d)))


def _llama_map(cfg: TransformerConfig, prefix: str) -> list[Entry]:
  w, h, kv, d, m = cfg.width, cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.hidden_dim
  p = prefix
  out = [
    Entry(f"{p}embed_tokens.weight", (cfg.vocab_size, w), ("embed", "embedding"), _ident, _ident)
  ]
  for i in range(cfg.num_layers):
    b, lp = f"block_{i}", f"{p}layers.{i}."
    out.append(Entry(f"{lp}input_layernorm.weight", (w,), (b, "ln_attn", "scale"), _ident, _ident))
    for hf_name, name, n in (
      ("q_proj", "query", h),
      ("k_proj", "key", kv),
      ("v_proj", "value", kv),
    ):
      to_jax, to_hf = _heads_in(w, n, d)
      out.append(
        Entry(f"{lp}self_attn.{hf_name}.weight", (n * d, w), (b, name, "kernel"), to_jax, to_hf)
      )
      if cfg.qkv_bias:
        out.append(
          Entry(
            f"{lp}self_attn.{hf_name}.bias",
            (n * d,),
            (b, name, "bias"),
            lambda x, n=n: x.reshape(n, d),
            lambda x, n=n: np.asarray(x).reshape(n * d),
          )
        )
    out.append(
      Entry(
        f"{lp}self_attn.o_proj.weight",
        (w, h * d),
        (b, "attn_out", "kernel"),
        lambda x: _t(x).reshape(h, d, w),
        lambda x: _t(np.asarray(x).reshape(h * d, w)),
      )
    )
    if cfg.attn_out_bias:
      out.append(Entry(f"{lp}self_attn.o_proj.bias", (w,), (b, "attn_out", "bias"), _ident, _ident))
    out.append(
      Entry(f"{lp}post_attention_layernorm.weight", (w,), (b, "ln_mlp", "scale"), _ident, _ident)
    )
    for hf_name, name, shape in (
      ("gate_proj", "mlp_gate", (m, w)),
      ("up_proj", "mlp_in", (m, w)),
      ("down_proj", "mlp_out", (w, m)),
    ):
      out.append(Entry(f"{lp}mlp.{hf_name}.weight", shape, (b, name, "kernel"), _t, _t))
      if cfg.mlp_bias:
        out.append(Entry(f"{lp}mlp.{hf_name}.bias", shape[:1], (b, name, "bias"), _ident, _ident))
  out.append(Entry(f"{p}norm.weight", (w,), ("ln_final", "scale"), _ident, _ident))
  return out


def tensor_map(config: TransformerConfig, model_type: str, *, head: str) -> list[Entry]:
  """The full tensor mapping of a model.

  Args:
    config: the backbone configuration (from :func:`transformer_config`).
    model_type: ``'gpt2'``, ``'llama'``, ``'mistral'`` or ``'qwen2'``.
    head: ``'policy'`` (``*ForCausalLM``: backbone + LM head unless tied) or ``'reward'``
      (``*ForSequenceClassification``: backbone + ``score``).

  Returns:
    One :class:`Entry` per Hugging Face tensor; ``path`` is relative to the model's
    ``params`` (``('backbone', ...)`` for the backbone).
  """
  family = FAMILIES[model_type]
  prefix = "transformer." if family == "gpt2" else "model."
  body = (_gpt2_map if family == "gpt2" else _llama_map)(config, prefix)
  entries = [e._replace(path=("backbone",) + e.path) for e in body]
  w = config.width
  if head == "policy" and not config.tie_embeddings:
    entries.append(Entry("lm_head.weight", (config.vocab_size, w), ("lm_head", "kernel"), _t, _t))
  elif head == "reward":
    entries.append(Entry("score.weight", (1, w), ("head", "kernel"), _t, _t))
  return entries


# ------------------------------------------------------------------------------------ export


def hf_config_for(
  config: TransformerConfig,
  model_type: str,
  *,
  head: str,
  base: dict[str, Any] | None = None,
) -> dict[str, Any]:
  """The ``config.json`` dict for ``config`` as a ``model_type`` checkpoint.

  Args:
    config: the backbone configuration; it must be expressible in ``model_type`` (checked).
    model_type: ``'gpt2'``, ``'llama'``, ``'mistral'`` or ``'qwen2'``.
    head: ``'policy'`` (``*ForCausalLM``) or ``'reward'`` (``*ForSequenceClassification``).
    base: an imported ``config.json`` to start from (keeps token ids and other fields).

  Returns:
    The config dict.
  """
  if model_type not in FAMILIES:
    raise ValueError(f"model_type must be one of {sorted(FAMILIES)}, got {model_type!r}")
  family = FAMILIES[model_type]
  hf = _hf_config_fields(config, model_type, head=head, base=base)
  want = transformer_config(
    hf,
    max_len=None if family == "gpt2" else config.max_len,
    dtype=config.dtype,
    param_dtype=config.param_dtype,
    remat=config.remat,
  )
  # How attention is computed, not what: any block length exports.
  want = dataclasses.replace(want, attention_query_block=config.attention_query_block)
  diff = [
    f"{f.name}={getattr(config, f.name)!r} (needs {getattr(want, f.name)!r})"
    for f in dataclasses.fields(config)
    if getattr(config, f.name) != getattr(want, f.name)
  ]
  if diff:
    raise ValueError(f"config cannot be exported as model_type={model_type!r}: {', '.join(diff)}")
  return hf


def _hf_config_fields(
  config: TransformerConfig, model_type: str, *, head: str, base: dict[str, Any] | None
) -> dict[str, Any]:
  """``config.json`` fields for ``config`` without checking that they describe it exactly."""
  cfg = config
  suffix = "ForCausalLM" if head == "policy" else "ForSequenceClassification"
  arch = _ARCH_PREFIX[model_type] + suffix
  if model_type == "gpt2" and head == "policy":
    arch = "GPT2LMHeadModel"
  out = dict(base or {})
  for key in ("rope_scaling", "rope_parameters", "id2label", "label2id", "num_labels"):
    out.pop(key, None)
  out.update(model_type=model_type, architectures=[arch], vocab_size=cfg.vocab_size)
  out["torch_dtype"] = "bfloat16" if jnp.dtype(cfg.param_dtype) == jnp.bfloat16 else "float32"
  out.pop("dtype", None)
  if head == "reward":
    out.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
  if FAMILIES[model_type] == "gpt2":
    out.update(
      n_embd=cfg.width,
      n_layer=cfg.num_layers,
      n_head=cfg.num_heads,
      n_positions=cfg.max_len,
      n_inner=cfg.hidden_dim,
      activation_function="gelu_new",
      layer_norm_epsilon=cfg.layer_norm_eps,
      tie_word_embeddings=True,
    )
    return out
  out.update(
    hidden_size=cfg.width,
    num_hidden_layers=cfg.num_layers,
    num_attention_heads=cfg.num_heads,
    num_key_value_heads=cfg.kv_heads,
    head_dim=cfg.head_dim,
    intermediate_size=cfg.hidden_dim,
    hidden_act="silu",
    max_position_embeddings=max(cfg.max_len, int(out.get("max_position_embeddings", 0))),
    rms_norm_eps=cfg.layer_norm_eps,
    tie_word_embeddings=cfg.tie_embeddings,
    rope_theta=cfg.rope_base,
  )
  if model_type != "qwen2":
    out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
  sc = cfg.rope_scaling
  if sc is not None:
    rope = dict(rope_type=sc.kind, factor=sc.factor)
    if sc.kind == "llama3":
      rope.update(
        low_freq_factor=sc.low_freq_factor,
        high_freq_factor=sc.high_freq_factor,
        original_max_position_embeddings=sc.original_max_len,
      )
    out["rope_scaling"] = rope
  if out.get("sliding_window") is not None and out["sliding_window"] < cfg.max_len:
    out["sliding_window"] = cfg.max_len
  return out
