"""Decoder-only transformer backbone (flax.linen) with a padding mask and a KV cache.

The backbone maps ``tokens [batch, seq]`` and a boolean ``mask [batch, seq]`` (True on real
tokens) to hidden states ``[batch, seq, width]`` in float32. It is the shared trunk of
:class:`jaxrm.models.reward_model.RewardModel` and :class:`jaxrm.models.policy.PolicyModel`.

Design:

* Pre-LayerNorm blocks (attention, MLP) with a final LayerNorm, as in GPT-2.
* Causal self-attention that also masks padded keys. Query rows with no valid key (a pad
  token in a left-padded prompt) get a zero attention output instead of NaN.
* Positions are derived from the mask, ``positions = cumsum(mask) - 1``, so left- and
  right-padding give identical hidden states on the real tokens. Positions are either rotary
  (default; Su et al. 2021) or a learned table of ``max_len`` rows.
* Mixed precision: parameters are always float32; matmuls run in ``config.dtype`` (float32 or
  bfloat16); the residual stream, layer norms, the attention softmax and the output are
  float32.
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
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxrm.math._arrays import is_concrete

_POSITIONS = ("rotary", "learned")
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
    mlp_ratio: MLP hidden width is ``mlp_ratio * width``.
    position: ``'rotary'`` (default) or ``'learned'`` absolute position embeddings.
    dtype: compute dtype of the matmuls, ``jnp.float32`` or ``jnp.bfloat16``. Parameters
      are float32 either way.
    rope_base: base of the rotary frequencies.
    layer_norm_eps: epsilon of every LayerNorm.
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

  def __post_init__(self):
    for name in ("vocab_size", "num_layers", "width", "num_heads", "max_len", "mlp_ratio"):
      value = getattr(self, name)
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
    if jnp.dtype(self.dtype) not in _DTYPES:
      raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads


class KVCache(NamedTuple):
  """Key/value cache for incremental decoding; a pure pytree passed in and out of the model.

  ``cache_len`` is the static number of slots. Slots are filled left to right; slot order is
  time order.
  """

  keys: jax.Array  # [num_layers, batch, cache_len, num_heads, head_dim], config.dtype
  values: jax.Array  # [num_layers, batch, cache_len, num_heads, head_dim], config.dtype
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
  shape = (config.num_layers, batch_size, cache_len, config.num_heads, config.head_dim)
  return KVCache(
    keys=jnp.zeros(shape, config.dtype),
    values=jnp.zeros(shape, config.dtype),
    mask=jnp.zeros((batch_size, cache_len), bool),
    index=jnp.zeros((), jnp.int32),
  )


def check_token_range(tokens: jax.typing.ArrayLike, vocab_size: int, name: str = "tokens") -> None:
  """Raises ``ValueError`` if concrete ``tokens`` fall outside ``[0, vocab_size)``.

  Only concrete arrays are checked: under ``jax.jit`` (or any transformation) the values do
  not exist at trace time, so the check is skipped there and an out-of-range id would be
  clamped by the embedding gather. Validate data eagerly (or call the model eagerly once)
  to get the error.

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


def _check_inputs(tokens, mask, config: TransformerConfig, cache: KVCache | None) -> None:
  tokens_shape, mask_shape = jnp.shape(tokens), jnp.shape(mask)
  if len(tokens_shape) != 2:
    raise ValueError(f"tokens must have shape [batch, seq], got {tokens_shape}")
  if not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
    raise ValueError(f"tokens must be an integer array, got dtype {jnp.result_type(tokens)}")
  if mask_shape != tokens_shape:
    raise ValueError(f"mask must have the shape of tokens {tokens_shape}, got {mask_shape}")
  seq = tokens_shape[1]
  limit = config.max_len if cache is None else cache.mask.shape[1]
  if seq > limit:
    what = f"max_len={config.max_len}" if cache is None else f"cache_len={limit}"
    raise ValueError(f"tokens has length {seq} (shape {tokens_shape}), longer than {what}")
  if cache is not None and cache.mask.shape[0] != tokens_shape[0]:
    raise ValueError(
      f"cache has batch size {cache.mask.shape[0]} (cache.mask shape "
      f"{cache.mask.shape}) but tokens has shape {tokens_shape}"
    )
  check_token_range(tokens, config.vocab_size)


def _rotary(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """Rotary position embedding of ``x [batch, t, heads, head_dim]`` at ``positions [batch, t]``."""
  half = x.shape[-1] // 2
  inv_freq = 1.0 / (base ** (jnp.arange(half, dtype=jnp.float32) / half))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, t, half]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x1 = x[..., :half].astype(jnp.float32)
  x2 = x[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, attn_mask: jax.Array) -> jax.Array:
  """Masked softmax attention; float32 softmax; rows with no valid key output zeros.

  Args:
    q: ``[batch, t, heads, head_dim]``.
    k: ``[batch, L, heads, head_dim]``.
    v: ``[batch, L, heads, head_dim]``.
    attn_mask: ``[batch, t, L]`` bool, True where query may attend key.

  Returns:
    ``[batch, t, heads, head_dim]`` in the dtype of ``v``.
  """
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * scale
  mask = attn_mask[:, None, :, :]
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = jnp.where(jnp.any(mask, axis=-1, keepdims=True), probs, 0.0)
  return jnp.einsum("bhts,bshd->bthd", probs.astype(v.dtype), v)


class _Block(nn.Module):
  """Pre-LayerNorm transformer block: x + attn(LN(x)), then x + mlp(LN(x)).

  With ``kv = (keys, values, layer)`` (the stacked cache arrays and this block's layer),
  the new keys/values are written straight into ``[layer, :, index:index + t]`` of the
  stacked arrays (one in-place update per step inside a decode loop, no re-stacking), and
  attention runs over all cache slots of this layer.
  """

  config: TransformerConfig

  @nn.compact
  def __call__(self, x, positions, attn_mask, kv=None, index=None):
    cfg = self.config
    dense = dict(dtype=cfg.dtype, param_dtype=jnp.float32)
    h = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=jnp.float32, name="ln_attn")(x)
    qkv = nn.DenseGeneral((3, cfg.num_heads, cfg.head_dim), name="qkv", **dense)(h)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if cfg.position == "rotary":
      q = _rotary(q, positions, cfg.rope_base)
      k = _rotary(k, positions, cfg.rope_base)
    if kv is not None:
      cache_k, cache_v, layer = kv
      start = (layer, 0, index, 0, 0)
      cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype)[None], start)
      cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype)[None], start)
      k, v = cache_k[layer], cache_v[layer]
      kv = (cache_k, cache_v, layer)
    attn = _attend(q, k, v, attn_mask)
    attn = nn.DenseGeneral(cfg.width, axis=(-2, -1), name="attn_out", **dense)(attn)
    x = x + attn.astype(jnp.float32)
    h = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=jnp.float32, name="ln_mlp")(x)
    h = nn.Dense(cfg.mlp_ratio * cfg.width, name="mlp_in", **dense)(h)
    h = nn.gelu(h)
    h = nn.Dense(cfg.width, name="mlp_out", **dense)(h)
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
    self, tokens: jax.typing.ArrayLike, mask: jax.typing.ArrayLike, cache: KVCache | None = None
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

    Returns:
      ``hidden [batch, seq, width]`` float32 if ``cache`` is None, else
      ``(hidden, new_cache)``.
    """
    cfg = self.config
    _check_inputs(tokens, mask, cfg, cache)
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
    positions = jnp.maximum(positions, 0)  # pads before the first real token

    embed_init = nn.initializers.normal(stddev=0.02)
    x = nn.Embed(
      cfg.vocab_size,
      cfg.width,
      embedding_init=embed_init,
      param_dtype=jnp.float32,
      dtype=jnp.float32,
      name="embed",
    )(tokens)
    if cfg.position == "learned":
      x = x + nn.Embed(
        cfg.max_len,
        cfg.width,
        embedding_init=embed_init,
        param_dtype=jnp.float32,
        dtype=jnp.float32,
        name="pos_embed",
      )(positions)

    kv = None if cache is None else (cache.keys, cache.values, 0)
    for layer in range(cfg.num_layers):
      if kv is not None:
        kv = (kv[0], kv[1], layer)
      x, kv = _Block(cfg, name=f"block_{layer}")(x, positions, attn_mask, kv, index)
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=jnp.float32, name="ln_final")(x)
    x = x.astype(jnp.float32)
    if cache is None:
      return x
    new_cache = KVCache(keys=kv[0], values=kv[1], mask=key_mask, index=index + seq)
    return x, new_cache
