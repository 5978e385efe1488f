"""Policy language model (backbone + LM head + optional value head) and log-prob helpers.

Alignment convention used throughout jaxrm: for a sequence ``tokens [batch, seq]`` and the
model's ``logits [batch, seq, vocab]`` (``logits[:, t]`` predicts ``tokens[:, t + 1]``), the
per-token arrays returned here are aligned with ``tokens``: entry ``t`` concerns the
distribution from which ``tokens[:, t]`` was drawn, i.e. ``logits[:, t - 1]``; entry 0 is 0.
So a response mask over ``tokens`` selects exactly the response log-probs.

Example::

  model = PolicyModel(config, value_head=True)
  params = model.init(key, tokens, mask)
  logits, values = model.apply(params, tokens, mask)
  logp = token_logprobs(logits, tokens)            # [batch, seq]
  seq_logp = sequence_logprobs(logits, tokens, response_mask)  # [batch]
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrm.models.transformer import KVCache, Transformer, TransformerConfig

Initializer = Callable[..., jax.Array]


class PolicyModel(nn.Module):
  """Autoregressive policy: ``(tokens, mask) -> (logits [b, s, V] f32, values [b, s] f32 | None)``.

  ``values[:, t]`` is the value head read at token ``t`` (the state after ``tokens[:, :t+1]``).
  Parameters live under ``'backbone'``, ``'lm_head'`` and (if ``value_head``) ``'value_head'``.
  The LM head is computed in float32; with ``config.tie_embeddings`` it is the transposed token
  embedding (no ``'lm_head'`` kernel; a bias, if ``config.head_bias``, is ``'lm_head_bias'``).

  Attributes:
    config: backbone configuration.
    value_head: whether to add a scalar value head (for PPO).
    lm_bias_init: initializer of the LM-head bias, ``(key, shape, dtype) -> array``. The
      default is zeros; ``nn.initializers.constant(log_probs)`` with a ``[vocab]`` array
      makes the initial policy lean towards a unigram distribution (e.g. Zipf).
    lm_kernel_init: initializer of the LM-head kernel ``[width, vocab]``;
      ``nn.initializers.zeros`` makes the initial policy exactly ``softmax(bias)``.
  """

  config: TransformerConfig
  value_head: bool = False
  lm_bias_init: Initializer = nn.initializers.zeros_init()
  lm_kernel_init: Initializer = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(
    self, tokens: jax.typing.ArrayLike, mask: jax.typing.ArrayLike, cache: KVCache | None = None
  ):
    """Runs the policy.

    Args:
      tokens: ``[batch, seq]`` int token ids.
      mask: ``[batch, seq]`` bool, True on real tokens.
      cache: optional :class:`jaxrm.models.transformer.KVCache` for incremental decoding (see
        :class:`jaxrm.models.transformer.Transformer`).

    Returns:
      ``(logits, values)`` or, with a cache, ``(logits, values, new_cache)``; ``logits``
      ``[batch, seq, vocab]`` float32, ``values`` ``[batch, seq]`` float32 or None.
    """
    cfg = self.config
    backbone = Transformer(cfg, name="backbone")
    out = backbone(tokens, mask, cache=cache)
    hidden, new_cache = (out, None) if cache is None else out
    if cfg.tie_embeddings:
      embedding = backbone.variables["params"]["embed"]["embedding"]
      logits = hidden @ jnp.asarray(embedding, jnp.float32).T
      if cfg.head_bias:
        bias = self.param("lm_head_bias", self.lm_bias_init, (cfg.vocab_size,), cfg.param_dtype)
        logits = logits + bias.astype(jnp.float32)
    else:
      logits = nn.Dense(
        cfg.vocab_size,
        use_bias=cfg.head_bias,
        dtype=jnp.float32,
        param_dtype=cfg.param_dtype,
        kernel_init=self.lm_kernel_init,
        bias_init=self.lm_bias_init,
        name="lm_head",
      )(hidden)
    values = None
    if self.value_head:
      values = nn.Dense(1, dtype=jnp.float32, param_dtype=jnp.float32, name="value_head")(hidden)[
        ..., 0
      ]
    if cache is None:
      return logits, values
    return logits, values, new_cache


def _check_logits_tokens(logits, tokens):
  if logits.ndim != 3:
    raise ValueError(f"logits must have shape [batch, seq, vocab], got {logits.shape}")
  if tokens.shape != logits.shape[:2]:
    raise ValueError(
      f"tokens must have shape {logits.shape[:2]} to match logits {logits.shape}, got "
      f"{tokens.shape}"
    )


def token_logprobs(logits: jax.typing.ArrayLike, tokens: jax.typing.ArrayLike) -> jax.Array:
  """Per-token log-probs ``log p(tokens[:, t] | tokens[:, :t])`` aligned with ``tokens``.

  Args:
    logits: ``[batch, seq, vocab]``; ``logits[:, t]`` is the next-token distribution after
      ``tokens[:, :t+1]``.
    tokens: ``[batch, seq]`` int.

  Returns:
    ``[batch, seq]`` float32; entry ``t >= 1`` is ``log_softmax(logits[:, t-1])[tokens[:, t]]``
    and entry 0 is 0. Multiply (or ``where``) by a response mask before summing.
  """
  logits = jnp.asarray(logits)
  tokens = jnp.asarray(tokens)
  _check_logits_tokens(logits, tokens)
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, tokens[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]
  return jnp.pad(picked, ((0, 0), (1, 0)))


def sequence_logprobs(
  logits: jax.typing.ArrayLike, tokens: jax.typing.ArrayLike, mask: jax.typing.ArrayLike
) -> jax.Array:
  """Sum of :func:`token_logprobs` over the True entries of ``mask [batch, seq]`` -> ``[batch]``.

  ``mask`` is aligned with ``tokens`` (typically a response mask), so
  ``sequence_logprobs(logits, tokens, response_mask)`` is ``log pi(response | prompt)``.
  """
  mask = jnp.asarray(mask).astype(bool)
  logp = token_logprobs(logits, tokens)
  if mask.shape != logp.shape:
    raise ValueError(f"mask must have shape {logp.shape} to match tokens, got {mask.shape}")
  return jnp.sum(jnp.where(mask, logp, 0.0), axis=1)


def token_entropy(logits: jax.typing.ArrayLike) -> jax.Array:
  """Entropy of the distribution each token was drawn from, aligned like :func:`token_logprobs`.

  Args:
    logits: ``[batch, seq, vocab]``.

  Returns:
    ``[batch, seq]`` float32 (nats); entry ``t >= 1`` is ``H(softmax(logits[:, t-1]))`` and
    entry 0 is 0.
  """
  logits = jnp.asarray(logits)
  if logits.ndim != 3:
    raise ValueError(f"logits must have shape [batch, seq, vocab], got {logits.shape}")
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  p = jnp.exp(logp)
  # p * logp with p == 0 (e.g. -inf logits after top-k filtering) contributes 0.
  ent = -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)
  return jnp.pad(ent, ((0, 0), (1, 0)))
