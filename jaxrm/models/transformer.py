"""Decoder-only transformer backbone (flax.linen) with a padding mask and a KV cache.

The backbone maps ``tokens [batch, seq]`` and a boolean ``mask [batch, seq]`` (True on real
tokens) to hidden states ``[batch, seq, width]`` in float32. It is the shared trunk of
:class:`jaxrm.models.reward_model.RewardModel` and :class:`jaxrm.models.policy.PolicyModel`.

Design:

* Pre-norm blocks (attention, MLP) with a final norm. The options cover the GPT-2 and
  Llama families (Llama 2/3, Qwen2/2.5, Mistral): LayerNorm or RMSNorm (``norm``), GELU or
  SwiGLU MLP (``mlp``), grouped-query attention (``num_kv_heads``), rotary positions with
  their base and scaling (``rope_base``, ``rope_scaling``) or a learned table, and biases per
  projection (``qkv_bias``, ``attn_out_bias``, ``mlp_bias``). The defaults are the original
  jaxrm block (LayerNorm, GELU, fused multi-head QKV, all biases, rotary) with its parameter
  tree unchanged.
* Parameter tree of a block ``block_{i}``: ``ln_attn``, attention (``qkv`` kernel
  ``[width, 3, heads, head_dim]`` when ``num_kv_heads`` is None; otherwise ``query``
  ``[width, heads, head_dim]``, ``key`` and ``value`` ``[width, kv_heads, head_dim]``),
  ``attn_out`` ``[heads, head_dim, width]``, ``ln_mlp``, ``mlp_in`` (``[width, mlp_dim]``;
  the "up" projection for SwiGLU), ``mlp_gate`` (SwiGLU only) and ``mlp_out``
  ``[mlp_dim, width]``. Then ``embed``, ``pos_embed`` (learned only) and ``ln_final``.
* Causal self-attention that also masks padded keys. Query rows with no valid key (a pad
  token in a left-padded prompt) get a zero attention output instead of NaN.
* Positions are derived from the mask, ``positions = cumsum(mask) - 1``, so left- and
  right-padding give identical hidden states on the real tokens. Positions are either rotary
  (default; Su et al. 2021) or a learned table of ``max_len`` rows.
* Mixed precision: parameters are stored in ``config.param_dtype`` (float32 by default, or
  bfloat16 to halve their memory). With ``config.dtype=jnp.bfloat16`` the projections' matmuls
  take bfloat16 operands and sum in float32, forward and backward
  (:mod:`jaxrm.models.precision`), and queries, keys and values are rounded to bfloat16 (the
  KV cache's dtype), so the attention's products do the same
  (:func:`jaxrm.models.attention.attend`); the residual stream, norms, activations, the
  softmax and the output are float32.
* ``remat=True`` rematerialises each block's activations in the backward pass
  (``flax.linen.remat``; same parameters and outputs, less memory, ~1/3 more compute).
* KV-cached decoding through an explicit :class:`KVCache` pytree passed in and out of
  ``__call__`` (pure: no mutable flax collection). A cache has a static number of slots; a
  call with ``t`` tokens writes them into slots ``[index, index + t)``. Prefill is one call
  over the (left-padded) prompt, decoding is one call per token. Positions continue from the
  number of real tokens already in the cache, so cached decoding reproduces the full forward
  pass exactly (up to float rounding).

Input validation happens at trace time (free under ``jax.jit``): rank, shapes and the length
against ``max_len`` always raise ``ValueError`` naming the argument; token ids are checked
against ``[0, vocab_size)`` only when the values are concrete (eager calls), because under
tracing the values do not exist yet — see :func:`check_token_range`.

References:
  Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (GPT-2).
  Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding".
  Zhang & Sennrich 2019, "Root Mean Square Layer Normalization".
  Shazeer 2020, "GLU Variants Improve Transformer" (SwiGLU).
  Ainslie et al. 2023, "GQA: Training Generalized Multi-Query Transformer Models".
  Touvron et al. 2023, "Llama 2"; Meta 2024, "The Llama 3 Herd of Models" (RoPE scaling).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxrm.math._arrays import is_concrete
from jaxrm.models import attention, precision
from jaxrm.models.rope import RopeScaling, apply_rotary, rope_frequencies

_POSITIONS = ("rotary", "learned")
_NORMS = ("layernorm", "rmsnorm")
_MLPS = ("gelu", "swiglu")
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyperparameters of the decoder-only backbone (hashable: usable as a static jit arg).

  Attributes:
    vocab_size: number of token ids; ids must lie in ``[0, vocab_size)``.
    num_layers: number of transformer blocks.
    width: model (residual stream) width.
    num_heads: attention heads; must divide ``width``.
    max_len: longest sequence (and largest KV cache) the model accepts.
    mlp_ratio: MLP hidden width is ``mlp_ratio * width`` unless ``mlp_dim`` is given.
    position: ``'rotary'`` (default) or ``'learned'`` absolute position embeddings.
    dtype: operand dtype of the projections' and the attention's matmuls (their sums are
      float32) and the dtype of queries, keys, values and the KV cache: ``jnp.float32`` or
      ``jnp.bfloat16``.
    rope_base: base (theta) of the rotary frequencies.
    layer_norm_eps: epsilon of every norm (LayerNorm or RMSNorm).
    norm: ``'layernorm'`` (scale and bias; GPT-2) or ``'rmsnorm'`` (scale only; Llama).
    mlp: ``'gelu'`` (tanh-approximated GELU, GPT-2's ``gelu_new``) or ``'swiglu'``
      (``mlp_out(silu(mlp_gate(x)) * mlp_in(x))``; Llama).
    mlp_dim: explicit MLP hidden width (Llama's ``intermediate_size``); overrides
      ``mlp_ratio``.
    num_kv_heads: None for the fused multi-head ``qkv`` projection (the original layout), or
      the number of key/value heads (grouped-query attention; must divide ``num_heads``;
      equal to ``num_heads`` for plain multi-head attention with separate projections).
    rope_scaling: optional :class:`RopeScaling`.
    qkv_bias: whether the query/key/value projections have biases (GPT-2, Qwen2: yes).
    attn_out_bias: whether the attention output projection has a bias (GPT-2: yes).
    mlp_bias: whether the MLP projections have biases (GPT-2: yes).
    tie_embeddings: the policy's LM head is the transpose of the token embedding (GPT-2,
      small Qwen2 models) instead of a separate ``lm_head`` kernel.
    head_bias: whether the LM head and the reward head have a bias (Hugging Face heads do
      not).
    param_dtype: storage dtype of the parameters, ``jnp.float32`` or ``jnp.bfloat16``.
    remat: rematerialise block activations in the backward pass (saves memory).
    attention_query_block: None (default) for one attention over the whole sequence, or a
      query block length: without a KV cache, a sequence longer than this is attended in
      query blocks of this length, block ``[s, e)`` reading only keys ``[0, e)``, the ones
      causal masking leaves it. The same attention (float sums may group differently),
      without the masked upper triangle of the score matrix: a speed setting for long
      sequences (``benchmarks/attention_share.py``). Decoding with a KV cache ignores it.
  """

  vocab_size: int
  num_layers: int
  width: int
  num_heads: int
  max_len: int
  mlp_ratio: int = 4
  position: str = "rotary"
  dtype: Any = jnp.float32
  rope_base: float = 10000.0
  layer_norm_eps: float = 1e-5
  norm: str = "layernorm"
  mlp: str = "gelu"
  mlp_dim: int | None = None
  num_kv_heads: int | None = None
  rope_scaling: RopeScaling | None = None
  qkv_bias: bool = True
  attn_out_bias: bool = True
  mlp_bias: bool = True
  tie_embeddings: bool = False
  head_bias: bool = True
  param_dtype: Any = jnp.float32
  remat: bool = False
  attention_query_block: int | None = None

  def __post_init__(self):
    names = ("vocab_size", "num_layers", "width", "num_heads", "max_len", "mlp_ratio")
    optional = ("mlp_dim", "num_kv_heads", "attention_query_block")
    for name in names + optional:
      value = getattr(self, name)
      if name in optional and value is None:
        continue
      if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if self.width % self.num_heads:
      raise ValueError(
        f"width must be divisible by num_heads, got width={self.width}, num_heads={self.num_heads}"
      )
    if self.position not in _POSITIONS:
      raise ValueError(f"position must be one of {_POSITIONS}, got {self.position!r}")
    if self.position == "rotary" and self.head_dim % 2:
      raise ValueError(f"rotary positions need an even head_dim, got {self.head_dim}")
    for name in ("dtype", "param_dtype"):
      if jnp.dtype(getattr(self, name)) not in _DTYPES:
        raise ValueError(f"{name} must be float32 or bfloat16, got {getattr(self, name)!r}")
    if self.norm not in _NORMS:
      raise ValueError(f"norm must be one of {_NORMS}, got {self.norm!r}")
    if self.mlp not in _MLPS:
      raise ValueError(f"mlp must be one of {_MLPS}, got {self.mlp!r}")
    if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"num_kv_heads must divide num_heads, got num_kv_heads={self.num_kv_heads}, "
        f"num_heads={self.num_heads}"
      )
    if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
      raise ValueError(f"rope_scaling must be a RopeScaling or None, got {self.rope_scaling!r}")

  def architecture(self) -> TransformerConfig:
    """This config without the settings of how it computes and stores (``dtype``,
    ``param_dtype``, ``remat``, ``attention_query_block``): two configs with equal
    architectures compute the same function of the same parameter values."""
    return dataclasses.replace(
      self,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      remat=False,
      attention_query_block=None,
    )

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @property
  def kv_heads(self) -> int:
    """Number of key/value heads (``num_heads`` unless grouped-query attention)."""
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  @property
  def hidden_dim(self) -> int:
    """MLP hidden width: ``mlp_dim`` if given, else ``mlp_ratio * width``."""
    return self.mlp_ratio * self.width if self.mlp_dim is None else self.mlp_dim


class KVCache(NamedTuple):
  """Key/value cache for incremental decoding; a pure pytree passed in and out of the model.

  ``cache_len`` is the static number of slots. Slots are filled left to right; slot order is
  time order. Heads come before slots, the layout attention reads, and each layer has its own
  array: a decode step writes its one new slot per head in place and attention reads the
  layer's array as it is, without transposing, slicing or copying it.
  """

  keys: tuple[jax.Array, ...]  # per layer: [batch, kv_heads, cache_len, head_dim], config.dtype
  values: tuple[jax.Array, ...]  # per layer: [batch, kv_heads, cache_len, head_dim], config.dtype
  mask: jax.Array  # [batch, cache_len] bool, True on slots holding a real token
  index: jax.Array  # shape=(), int32: next slot to write


def init_cache(config: TransformerConfig, batch_size: int, cache_len: int | None = None) -> KVCache:
  """Returns an empty :class:`KVCache` with ``cache_len`` slots (default ``config.max_len``).

  Args:
    config: the backbone configuration.
    batch_size: number of sequences decoded together.
    cache_len: number of slots, at most ``config.max_len``. A sampler uses
      ``prompt_len + max_new_tokens``.

  Returns:
    A cache whose slots are all empty (``mask`` False) and ``index`` 0.
  """
  cache_len = config.max_len if cache_len is None else int(cache_len)
  if not 1 <= cache_len <= config.max_len:
    raise ValueError(f"cache_len must be in [1, max_len={config.max_len}], got {cache_len}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  shape = (batch_size, config.kv_heads, cache_len, config.head_dim)
  layers = range(config.num_layers)
  return KVCache(
    keys=tuple(jnp.zeros(shape, config.dtype) for _ in layers),
    values=tuple(jnp.zeros(shape, config.dtype) for _ in layers),
    mask=jnp.zeros((batch_size, cache_len), bool),
    index=jnp.zeros((), jnp.int32),
  )


def out_of_range_negatives(tokens: jax.Array, vocab_size: int) -> jax.Array:
  """``tokens`` with negative ids replaced by ``vocab_size``: JAX's gathers read a negative
  index from the end (``-100``, Hugging Face's ignore index, would silently read id
  ``vocab_size - 100``), while an index ``>= vocab_size`` gives NaN in their default fill mode.
  """
  return jnp.where(tokens < 0, vocab_size, tokens)


def check_token_range(tokens: jax.typing.ArrayLike, vocab_size: int, name: str = "tokens") -> None:
  """Raises ``ValueError`` if concrete ``tokens`` fall outside ``[0, vocab_size)``.

  Only concrete arrays are checked: under ``jax.jit`` (or any transformation) the values do
  not exist at trace time, so the check is skipped there. There an out-of-range id (negative
  ones too, see :func:`out_of_range_negatives`) makes the embedding gather return NaN, so the
  row's outputs are NaN and the training steps skip the update. Validate data eagerly (or call
  the model eagerly once) to get the error.

  Args:
    tokens: integer array of any shape.
    vocab_size: exclusive upper bound on the ids.
    name: argument name used in the error message.
  """
  if not is_concrete(tokens):
    return
  values = np.asarray(tokens)
  if values.size == 0:
    return
  low, high = int(values.min()), int(values.max())
  if low < 0 or high >= vocab_size:
    raise ValueError(
      f"{name} must have ids in [0, vocab_size={vocab_size}), got min {low} and max "
      f"{high} (shape {values.shape})"
    )


def _check_inputs(
  tokens, mask, config: TransformerConfig, cache: KVCache | None, segments=None
) -> None:
  tokens_shape, mask_shape = jnp.shape(tokens), jnp.shape(mask)
  if len(tokens_shape) != 2:
    raise ValueError(f"tokens must have shape [batch, seq], got {tokens_shape}")
  if not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
    raise ValueError(f"tokens must be an integer array, got dtype {jnp.result_type(tokens)}")
  if mask_shape != tokens_shape:
    raise ValueError(f"mask must have the shape of tokens {tokens_shape}, got {mask_shape}")
  if segments is not None:
    if cache is not None:
      raise ValueError("segments is for a pass without a cache (got both)")
    if jnp.shape(segments) != tokens_shape:
      raise ValueError(
        f"segments must have the shape of tokens {tokens_shape}, got {jnp.shape(segments)}"
      )
    if not jnp.issubdtype(jnp.result_type(segments), jnp.integer):
      raise ValueError(f"segments must be an integer array, got {jnp.result_type(segments)}")
  seq = tokens_shape[1]
  if cache is not None:
    limit = cache.mask.shape[1]
    what = f"cache_len={limit}"
  elif segments is not None:  # a packed row: two sequences of at most max_len tokens
    limit = 2 * config.max_len
    what = f"2 * max_len={limit} (a packed row)"
  else:
    limit = config.max_len
    what = f"max_len={limit}"
  if seq > limit:
    raise ValueError(f"tokens has length {seq} (shape {tokens_shape}), longer than {what}")
  if cache is not None and cache.mask.shape[0] != tokens_shape[0]:
    raise ValueError(
      f"cache has batch size {cache.mask.shape[0]} (cache.mask shape "
      f"{cache.mask.shape}) but tokens has shape {tokens_shape}"
    )
  if cache is not None and not len(cache.keys) == len(cache.values) == config.num_layers:
    raise ValueError(
      f"cache has {len(cache.keys)} key and {len(cache.values)} value arrays but the model has "
      f"num_layers={config.num_layers} (make it with init_cache(config, ...))"
    )
  check_token_range(tokens, config.vocab_size)


def _segment_mask_and_positions(attn_mask: jax.Array, segments: jax.Array):
  """A packed row's attention mask and positions (``Transformer``'s ``segments``).

  ``attn_mask`` ``[batch, seq, seq]`` is the causal mask of real keys; a key is kept when it
  is in the query's segment or the shared segment 0. A token's position counts the real
  tokens it attends to (itself included), minus one: its index in its own sequence."""
  segments = jnp.asarray(segments, jnp.int32)
  key_segment = segments[:, None, :]
  attn_mask = attn_mask & ((key_segment == segments[:, :, None]) | (key_segment == 0))
  positions = jnp.sum(attn_mask, axis=2, dtype=jnp.int32) - 1
  return attn_mask, positions


def _norm(cfg: TransformerConfig, name: str) -> nn.Module:
  if cfg.norm == "rmsnorm":
    return nn.RMSNorm(
      epsilon=cfg.layer_norm_eps, dtype=jnp.float32, param_dtype=cfg.param_dtype, name=name
    )
  return nn.LayerNorm(
    epsilon=cfg.layer_norm_eps, dtype=jnp.float32, param_dtype=cfg.param_dtype, name=name
  )


class _Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)).

  With ``kv = (keys, values)`` (this layer's cache arrays), the new keys/values are written
  straight into slots ``[index, index + t)`` (one in-place update per step inside a decode
  loop), and attention runs over all cache slots.
  """

  config: TransformerConfig

  @nn.compact
  def __call__(self, x, positions, attn_mask, kv=None, index=None, rows=None):
    """``rows [batch, n]`` (no cache): queries, attention output and MLP only at those
    positions (keys and values at all of them); the block's output is ``[batch, n, width]``."""
    cfg = self.config
    dense = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    if jnp.dtype(cfg.dtype) == jnp.bfloat16:
      dense["dot_general"] = precision.mixed_dot_general
    h = _norm(cfg, "ln_attn")(x)
    if cfg.num_kv_heads is None:
      qkv = nn.DenseGeneral(
        (3, cfg.num_heads, cfg.head_dim), use_bias=cfg.qkv_bias, name="qkv", **dense
      )(h)
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
      proj = functools.partial(nn.DenseGeneral, use_bias=cfg.qkv_bias, **dense)
      q = proj((cfg.num_heads, cfg.head_dim), name="query")(h)
      k = proj((cfg.kv_heads, cfg.head_dim), name="key")(h)
      v = proj((cfg.kv_heads, cfg.head_dim), name="value")(h)
    if rows is not None:
      take = lambda a: jnp.take_along_axis(a, rows.reshape(rows.shape + (1,) * (a.ndim - 2)), 1)  # noqa: E731
      x, q, q_positions, attn_mask = take(x), take(q), take(positions), take(attn_mask)
    else:
      q_positions = positions
    if cfg.position == "rotary":
      inv_freq = rope_frequencies(cfg.head_dim, base=cfg.rope_base, scaling=cfg.rope_scaling)
      limit = positions.shape[1] if kv is None else kv[0].shape[2]  # positions < limit
      q = apply_rotary(q, q_positions, inv_freq, max_position=limit)
      k = apply_rotary(k, positions, inv_freq, max_position=limit)
    q, k, v = (a.astype(cfg.dtype) for a in (q, k, v))
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [batch, kv_heads, t, head_dim]
    if kv is not None:
      cache_k, cache_v = kv
      start = (0, 0, index, 0)
      k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), start)
      v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), start)
      kv = (k, v)
    attn = attention.attend(
      q, k, v, attn_mask, query_block=None if kv is not None else cfg.attention_query_block
    )
    attn = nn.DenseGeneral(
      cfg.width, axis=(-2, -1), use_bias=cfg.attn_out_bias, name="attn_out", **dense
    )(attn)
    x = x + attn.astype(jnp.float32)
    h = _norm(cfg, "ln_mlp")(x)
    up = nn.Dense(cfg.hidden_dim, use_bias=cfg.mlp_bias, name="mlp_in", **dense)(h)
    if cfg.mlp == "swiglu":
      gate = nn.Dense(cfg.hidden_dim, use_bias=cfg.mlp_bias, name="mlp_gate", **dense)(h)
      h = nn.silu(gate) * up
    else:
      h = nn.gelu(up)
    h = nn.Dense(cfg.width, use_bias=cfg.mlp_bias, name="mlp_out", **dense)(h)
    x = x + h.astype(jnp.float32)
    return x, kv


class Transformer(nn.Module):
  """Decoder-only transformer backbone.

  Example::

    config = TransformerConfig(vocab_size=259, num_layers=2, width=64, num_heads=2,
                               max_len=128)
    model = Transformer(config)
    params = model.init(key, tokens, mask)
    hidden = model.apply(params, tokens, mask)  # [batch, seq, 64] float32

  Attributes:
    config: a :class:`TransformerConfig`.
  """

  config: TransformerConfig

  @nn.compact
  def __call__(
    self,
    tokens: jax.typing.ArrayLike,
    mask: jax.typing.ArrayLike,
    cache: KVCache | None = None,
    *,
    rows: jax.Array | None = None,
    segments: jax.Array | None = None,
  ):
    """Runs the backbone.

    Args:
      tokens: ``[batch, seq]`` integer token ids in ``[0, vocab_size)``.
      mask: ``[batch, seq]`` bool, True on real tokens (pads may be left or right).
      cache: optional :class:`KVCache`. When given, the ``seq`` tokens are the next ones
        after those already cached; they are written to slots ``[index, index + seq)``,
        attend to every cached real token, and their positions continue from the number
        of real tokens in the cache. ``index + seq`` must not exceed the cache length
        (checked only for ``seq``; ``index`` is traced).
      rows: optional ``[batch, n]`` integer positions in ``[0, seq)`` (without ``cache``):
        the hidden states of only these positions, ``[batch, n, width]``, the same as
        ``jnp.take_along_axis(hidden, rows[..., None], 1)`` of the full pass. The last layer
        computes its queries, attention and MLP at these positions only (every earlier
        layer feeds its keys and values), e.g. a reward model reading one token.
      segments: optional ``[batch, seq]`` integers (without ``cache``): several sequences that
        share a prefix, packed in one row (:func:`jaxrm.data.packing.pack_pairs`). Segment 0
        is the shared prefix and comes first; each other value is one sequence's own tokens
        after it, contiguous. A token attends to the earlier real tokens of its own segment
        and of segment 0, and its position is its index in its own sequence (prefix, then
        its segment), so each sequence's hidden states are those of the sequence alone in an
        unpacked row. Rows may then be up to ``2 * max_len`` long; each sequence must still
        fit ``max_len`` (not checked under ``jit``).

    Returns:
      ``hidden [batch, seq, width]`` (``[batch, n, width]`` with ``rows``) float32 if
      ``cache`` is None, else ``(hidden, new_cache)``.
    """
    cfg = self.config
    _check_inputs(tokens, mask, cfg, cache, segments)
    if rows is not None:
      if cache is not None:
        raise ValueError("rows is for a pass without a cache (got both)")
      rows = jnp.asarray(rows)
      if rows.ndim != 2 or rows.shape[0] != jnp.shape(tokens)[0]:
        raise ValueError(
          f"rows must have shape [batch, n] with batch {jnp.shape(tokens)[0]}, got {rows.shape}"
        )
      if not jnp.issubdtype(rows.dtype, jnp.integer):
        raise ValueError(f"rows must be an integer array, got dtype {rows.dtype}")
      rows = rows.astype(jnp.int32)
    tokens = jnp.asarray(tokens, jnp.int32)
    mask = jnp.asarray(mask).astype(bool)
    seq = tokens.shape[1]
    new_positions = jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1
    if cache is None:
      positions = new_positions
      q_slots = jnp.arange(seq)
      key_mask = mask
      index = None
    else:
      index = cache.index
      positions = jnp.sum(cache.mask, axis=1, dtype=jnp.int32)[:, None] + new_positions
      q_slots = index + jnp.arange(seq)
      key_mask = jax.lax.dynamic_update_slice(cache.mask, mask, (0, index))
    k_slots = jnp.arange(key_mask.shape[1])
    causal = k_slots[None, :] <= q_slots[:, None]  # [seq, L]
    attn_mask = causal[None] & key_mask[:, None, :]  # [batch, seq, L]
    if segments is not None:
      attn_mask, positions = _segment_mask_and_positions(attn_mask, segments)
    positions = jnp.maximum(positions, 0)  # pads before the first real token

    embed_init = nn.initializers.normal(stddev=0.02)
    tokens = out_of_range_negatives(tokens, cfg.vocab_size)
    x = nn.Embed(
      cfg.vocab_size,
      cfg.width,
      embedding_init=embed_init,
      param_dtype=cfg.param_dtype,
      dtype=jnp.float32,
      name="embed",
    )(tokens)
    if cfg.position == "learned":
      x = x + nn.Embed(
        cfg.max_len,
        cfg.width,
        embedding_init=embed_init,
        param_dtype=cfg.param_dtype,
        dtype=jnp.float32,
        name="pos_embed",
      )(positions)

    block = nn.remat(_Block) if cfg.remat and cache is None else _Block
    keys, values = [], []
    for layer in range(cfg.num_layers):
      kv = None if cache is None else (cache.keys[layer], cache.values[layer])
      last = rows if layer == cfg.num_layers - 1 else None
      x, kv = block(cfg, name=f"block_{layer}")(x, positions, attn_mask, kv, index, last)
      if kv is not None:
        keys.append(kv[0])
        values.append(kv[1])
    x = _norm(cfg, "ln_final")(x)
    x = x.astype(jnp.float32)
    if cache is None:
      return x
    new_cache = KVCache(keys=tuple(keys), values=tuple(values), mask=key_mask, index=index + seq)
    return x, new_cache
