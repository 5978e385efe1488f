"""Masked softmax attention with its own backward pass (:func:`attend`), the transformer's.

The forward pass keeps each query row's log-sum-exp instead of the probabilities; the backward
pass recomputes them from it and takes the softmax's row sums from the output
(FlashAttention's ``D = rowsum(dO * O)``, Dao et al. 2022): fewer passes over the ``[batch,
heads, t, L]`` score tensors that bind a step on CPU (``benchmarks/attention_share.py``).
Causal query blocks skip the masked upper triangle of the score matrix. With bfloat16 queries,
keys and values (a model with ``dtype=jnp.bfloat16``) every product takes bfloat16 operands
and sums in float32, as FlashAttention does on GPUs: the probabilities and the score gradients
are rounded to bfloat16 for the products that read them; the softmax stays float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def attend(
  q: jax.Array, k: jax.Array, v: jax.Array, attn_mask: jax.Array, *, query_block: int | None = None
) -> jax.Array:
  """Masked softmax attention (the softmax in float32); rows with no valid key output zeros.

  Grouped-query attention: query head ``h`` reads key/value head ``h // (heads // kv_heads)``
  (consecutive query heads share a key/value head, as in Hugging Face ``repeat_kv``).
  Differentiated by its own backward pass (see the module docstring).

  Args:
    q: ``[batch, t, heads, head_dim]``.
    k: ``[batch, kv_heads, L, head_dim]`` (head-major, the cache's layout); ``kv_heads``
      divides ``heads``.
    v: ``[batch, kv_heads, L, head_dim]``.
    attn_mask: ``[batch, t, L]`` bool, True where query may attend key.
    query_block: with ``t == L`` and a causal ``attn_mask`` (query ``i`` never attends key
      ``j > i``), attend query blocks ``[s, e)`` of this length to keys ``[0, e)`` only
      (:attr:`TransformerConfig.attention_query_block`). None: one block.

  Returns:
    ``[batch, t, heads, head_dim]`` float32. The products' operands are bfloat16 when ``q``,
    ``k`` and ``v`` all are (their sums float32), float32 otherwise.
  """
  b, t, heads, d = q.shape
  kv_heads, length = k.shape[1], k.shape[2]
  if query_block is None or t <= query_block or length != t:
    blocks = ((0, t, length),)
  else:
    ends = [min(start + query_block, t) for start in range(0, t, query_block)]
    blocks = tuple((start, end, end) for start, end in zip(range(0, t, query_block), ends))
  bf16 = all(a.dtype == jnp.bfloat16 for a in (q, k, v))
  q, k, v = (a.astype(jnp.bfloat16 if bf16 else jnp.float32) for a in (q, k, v))
  q = q.reshape(b, t, kv_heads, heads // kv_heads, d).transpose(0, 2, 3, 1, 4)
  out = _attention(q, k, v, attn_mask, blocks)  # [batch, kv_heads, group, t, head_dim]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, heads, d)


def _dot(spec, a, b):
  """``einsum`` with ``b``'s operand dtype (``a`` rounded to it) and a float32 result."""
  return jnp.einsum(spec, a.astype(b.dtype), b, preferred_element_type=jnp.float32)


def _scores(q, k, attn_mask, block):
  """Masked scaled scores of queries ``[s, e)`` against keys ``[0, key_end)``:
  ``[batch, kv_heads, group, e - s, key_end]`` float32, and which of those rows have a valid
  key."""
  s, e, key_end = block
  logits = _dot("bkgtd,bksd->bkgts", q[:, :, :, s:e], k[:, :, :key_end])
  mask = attn_mask[:, None, None, s:e, :key_end]
  logits = jnp.where(mask, logits * q.shape[-1] ** -0.5, jnp.finfo(jnp.float32).min)
  return logits, jnp.any(mask, axis=-1, keepdims=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, attn_mask, blocks):
  """``q`` ``[batch, kv_heads, group, t, head_dim]``; ``blocks``: ``(s, e, key_end)`` per query
  block. Returns the output in ``q``'s layout."""
  return _attention_fwd(q, k, v, attn_mask, blocks)[0]


def _attention_fwd(q, k, v, attn_mask, blocks):
  outs, lses = [], []
  for block in blocks:
    logits, valid = _scores(q, k, attn_mask, block)
    top = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.exp(logits - top)
    total = jnp.sum(p, axis=-1, keepdims=True)
    probs = jnp.where(valid, p / total, 0.0)
    outs.append(_dot("bkgts,bksd->bkgtd", probs, v[:, :, : block[2]]))
    lses.append(jnp.where(valid, top + jnp.log(total), jnp.inf))  # exp(x - inf) = 0
  out = jnp.concatenate(outs, axis=3)
  return out, (q, k, v, attn_mask, out, jnp.concatenate(lses, axis=3))


def _attention_bwd(blocks, residuals, g):
  q, k, v, attn_mask, out, lse = residuals
  # sum_j p_j dp_j of each query row, as a dot: XLA:CPU's reduction over the minor head_dim
  # axis is about 10x slower (BUILD_NOTES, session 35).
  delta = jnp.einsum("bkgtd,bkgtd->bkgt", g, out)[..., None]
  dq, dk, dv = [], jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
  for block in blocks:
    s, e, key_end = block
    p = jnp.exp(_scores(q, k, attn_mask, block)[0] - lse[:, :, :, s:e])
    g_block = g[:, :, :, s:e].astype(q.dtype)
    dv = dv.at[:, :, :key_end].add(_dot("bkgts,bkgtd->bksd", p, g_block))
    dp = _dot("bkgtd,bksd->bkgts", g_block, v[:, :, :key_end])
    ds = p * (dp - delta[:, :, :, s:e]) * q.shape[-1] ** -0.5
    dq.append(_dot("bkgts,bksd->bkgtd", ds, k[:, :, :key_end]))
    dk = dk.at[:, :, :key_end].add(_dot("bkgts,bkgtd->bksd", ds, q[:, :, :, s:e]))
  dq = jnp.concatenate(dq, axis=3)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)
