"""Scalar reward model: transformer backbone plus a linear head pooled over each sequence.

The reward of a sequence is read at its last real token (``pooling='last'``, the usual RLHF
choice; e.g. Ouyang et al. 2022) or from the masked mean of the hidden states
(``pooling='mean'``). Both use only the mask, so left- and right-padded batches give the
same rewards.

Example::

  model = RewardModel(config)
  params = model.init(key, tokens, mask)
  rewards = model.apply(params, tokens, mask)  # [batch] float32

References:
  Ouyang et al. 2022, "Training language models to follow instructions with human feedback".
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrm.models.transformer import Transformer, TransformerConfig

_POOLINGS = ("last", "mean")


def pool_hidden(
  hidden: jax.typing.ArrayLike, mask: jax.typing.ArrayLike, *, pooling: str = "last"
) -> jax.Array:
  """Pools ``hidden [batch, seq, width]`` to ``[batch, width]`` using ``mask [batch, seq]``.

  Args:
    hidden: per-token features.
    mask: bool, True on real tokens.
    pooling: ``'last'`` takes the features at the last True position of each row (works
      for left and right padding); ``'mean'`` averages over the True positions. A row with
      no True position pools to zeros.

  Returns:
    ``[batch, width]`` in the dtype of ``hidden``.
  """
  hidden = jnp.asarray(hidden)
  mask = jnp.asarray(mask).astype(bool)
  if hidden.ndim != 3:
    raise ValueError(f"hidden must have shape [batch, seq, width], got {hidden.shape}")
  if mask.shape != hidden.shape[:2]:
    raise ValueError(
      f"mask must have shape {hidden.shape[:2]} to match hidden {hidden.shape}, got {mask.shape}"
    )
  if pooling == "last":
    counts = jnp.cumsum(mask, axis=1)
    weights = mask & (counts == counts[:, -1:])  # one-hot at the last real token
  elif pooling == "mean":
    weights = mask / jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1)
  else:
    raise ValueError(f"pooling must be one of {_POOLINGS}, got {pooling!r}")
  return jnp.einsum("bs,bsw->bw", weights.astype(hidden.dtype), hidden)


def last_positions(mask: jax.typing.ArrayLike) -> jax.Array:
  """``[batch]`` int32: the position of each row's last True in ``mask [batch, seq]`` (0 for
  a row with none), the token ``pooling='last'`` reads."""
  mask = jnp.asarray(mask).astype(bool)
  seq = mask.shape[1]
  return (seq - 1 - jnp.argmax(mask[:, ::-1], axis=1)).astype(jnp.int32) * jnp.any(mask, axis=1)


class RewardModel(nn.Module):
  """Backbone + scalar head: ``(tokens [batch, seq], mask [batch, seq]) -> rewards [batch]``.

  Parameters live under ``'backbone'`` (a :class:`jaxrm.models.transformer.Transformer`, same
  layout as in :class:`jaxrm.models.policy.PolicyModel`) and ``'head'``.

  Attributes:
    config: backbone configuration.
    pooling: ``'last'`` (reward read at the last real token) or ``'mean'``.
  """

  config: TransformerConfig
  pooling: str = "last"

  @nn.compact
  def __call__(
    self,
    tokens: jax.typing.ArrayLike,
    mask: jax.typing.ArrayLike,
    *,
    segments: jax.typing.ArrayLike | None = None,
  ) -> jax.Array:
    """Returns float32 rewards ``[batch]``; see :func:`pool_hidden` for the pooling.

    With ``segments`` (``[batch, seq]``, a packed pair per row as
    :func:`jaxrm.data.packing.pack_pairs` builds it: segment 0 the shared prefix, 1 the first
    sequence's own tokens, 2 the second's), returns ``[batch, 2]``: the rewards of both
    sequences of each row, each read at its last real token (``pooling='last'`` only)."""
    if self.pooling not in _POOLINGS:
      raise ValueError(f"pooling must be one of {_POOLINGS}, got {self.pooling!r}")
    backbone = Transformer(self.config, name="backbone")
    if segments is not None:
      if self.pooling != "last":
        raise ValueError(f"packed pairs (segments) need pooling='last', got {self.pooling!r}")
      segments = jnp.asarray(segments)
      if jnp.shape(segments) != jnp.shape(mask):
        raise ValueError(
          f"segments must have the shape of mask {jnp.shape(mask)}, got {jnp.shape(segments)}"
        )
      mask = jnp.asarray(mask).astype(bool)
      shared = segments == 0
      seqs = [mask & (shared | (segments == s)) for s in (1, 2)]  # each sequence's tokens
      reads = jnp.stack([last_positions(m) for m in seqs], 1)
      hidden = backbone(tokens, mask, rows=reads, segments=segments)  # [batch, 2, width]
      pooled = jnp.where(jnp.stack([jnp.any(m, axis=1) for m in seqs], 1)[..., None], hidden, 0.0)
    elif self.pooling == "last" and jnp.ndim(mask) == 2:  # (else the backbone names the shape)
      # The last layer computes only the token read: the same rewards for less work.
      mask = jnp.asarray(mask).astype(bool)
      hidden = backbone(tokens, mask, rows=last_positions(mask)[:, None])[:, 0]
      pooled = jnp.where(jnp.any(mask, axis=1, keepdims=True), hidden, 0.0)
    else:
      pooled = pool_hidden(backbone(tokens, mask), mask, pooling=self.pooling)
    reward = nn.Dense(
      1,
      use_bias=self.config.head_bias,
      dtype=jnp.float32,
      param_dtype=self.config.param_dtype,
      name="head",
    )(pooled)
    return reward[..., 0].astype(jnp.float32)
