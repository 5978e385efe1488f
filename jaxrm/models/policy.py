"""Policy language model (backbone + LM head + optional value head) and log-prob helpers.

Alignment convention used throughout jaxrm: for a sequence ``tokens [batch, seq]`` and the
model's ``logits [batch, seq, vocab]`` (``logits[:, t]`` predicts ``tokens[:, t + 1]``), the
per-token arrays returned here are aligned with ``tokens``: entry ``t`` concerns the
distribution from which ``tokens[:, t]`` was drawn, i.e. ``logits[:, t - 1]``; entry 0 is 0.
So a response mask over ``tokens`` selects exactly the response log-probs.

:class:`PolicyFns` is what the RL steps take instead of a model class (as the reward-model step
takes an ``apply_fn``): the policy's forward pass and its sampler. :func:`transformer_policy`
builds it for :class:`PolicyModel` (KV-cached sampler), :func:`apply_fn_policy` for any model
given its ``apply_fn`` (full-forward sampler).

Example::

  model = PolicyModel(config, value_head=True)
  params = model.init(key, tokens, mask)
  logits, values = model.apply(params, tokens, mask)
  logp = token_logprobs(logits, tokens)            # [batch, seq]
  seq_logp = sequence_logprobs(logits, tokens, response_mask)  # [batch]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrm.math._arrays import check_key
from jaxrm.models.transformer import (
  KVCache,
  Transformer,
  TransformerConfig,
  check_token_range,
  out_of_range_negatives,
)

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
    tokens: ``[batch, seq]`` int in ``[0, vocab)`` (checked where concrete; under ``jit`` an
      id out of range gives NaN).

  Returns:
    ``[batch, seq]`` float32; entry ``t >= 1`` is ``log_softmax(logits[:, t-1])[tokens[:, t]]``
    and entry 0 is 0. Multiply (or ``where``) by a response mask before summing.
  """
  logits = jnp.asarray(logits)
  tokens = jnp.asarray(tokens)
  _check_logits_tokens(logits, tokens)
  vocab = logits.shape[-1]
  check_token_range(tokens, vocab)
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  ids = out_of_range_negatives(tokens[:, 1:, None].astype(jnp.int32), vocab)
  picked = jnp.take_along_axis(logp, ids, axis=-1)[..., 0]
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


class PolicyFns(NamedTuple):
  """The functions of a policy that the RL steps need (model-agnostic, like ``apply_fn``).

  Attributes:
    apply: ``apply(params, tokens [b, s], mask [b, s]) -> (logits [b, s, V], values)``, with
      ``logits[:, t]`` the next-token logits after ``tokens[:, :t+1]`` and ``values [b, s]``
      the value head read at token ``t`` (the state after ``tokens[:, :t+1]``), or None for
      a policy without a value head (or called with parameters that have none, e.g. the
      reference policy's).
    sample: ``sample(params, prompts [b, p], prompt_mask [b, p], keys [b], *, max_new_tokens,
      temperature, eos_id) -> jaxrm.models.sampling.SampleOutput``; row ``i`` is drawn with
      ``keys[i]`` alone from ``softmax(logits / temperature)``, from LEFT-padded prompts,
      with the output conventions of :func:`jaxrm.models.sampling.sample`.
    vocab_size: vocabulary size, checked against ``eos_id`` when known (None: unchecked).
    max_len: longest sequence the policy accepts, checked against ``prompt_len +
      max_new_tokens`` when known (None: unchecked).
  """

  apply: Callable[..., tuple[jax.Array, jax.Array | None]]
  sample: Callable[..., Any]
  vocab_size: int | None = None
  max_len: int | None = None


def transformer_policy(config: TransformerConfig, *, value_head: bool = False) -> PolicyFns:
  """:class:`PolicyFns` of ``PolicyModel(config)`` with the KV-cached sampler.

  Args:
    config: the backbone configuration.
    value_head: read the value head (PPO). ``apply`` evaluates it only for parameters that
      hold a ``'value_head'`` (:func:`jaxrm.steps.rl.init_value_head`) and returns
      ``values=None`` for others (the reference policy needs none).

  Returns:
    :class:`PolicyFns` whose ``sample`` is :func:`jaxrm.models.sampling.sample` with one key
    per row (per-example keys: a row's sample does not depend on the rest of the batch).
  """
  if not isinstance(config, TransformerConfig):
    raise ValueError(f"config must be a TransformerConfig, got {type(config).__name__}")
  plain, with_head = PolicyModel(config), PolicyModel(config, value_head=True)

  def apply(params, tokens, mask):
    inner = params.get("params") if isinstance(params, Mapping) else None
    if value_head and isinstance(inner, Mapping) and "value_head" in inner:
      return with_head.apply(params, tokens, mask)
    return plain.apply(params, tokens, mask)

  def sample(params, prompts, prompt_mask, keys, *, max_new_tokens, temperature, eos_id):
    from jaxrm.models import sampling  # sampling imports PolicyModel from this module

    check_key(keys, "keys", shape=jnp.shape(prompts)[:1])
    return sampling.sample(
      params,
      prompts,
      prompt_mask,
      keys,
      config=config,
      max_new_tokens=max_new_tokens,
      temperature=temperature,
      eos_id=eos_id,
    )

  return PolicyFns(apply=apply, sample=sample, vocab_size=config.vocab_size, max_len=config.max_len)


def apply_fn_policy(
  apply_fn: Callable[..., Any], *, vocab_size: int | None = None, max_len: int | None = None
) -> PolicyFns:
  """:class:`PolicyFns` of any model from its ``apply_fn`` (flax, haiku, equinox, ...).

  Args:
    apply_fn: ``apply_fn(params, tokens [b, s], mask [b, s])`` returning ``(logits [b, s, V],
      values [b, s] | None)`` (aligned as in :class:`PolicyModel`), or the logits alone
      (then ``values`` is None). Pass the same function object to reuse compilations.
    vocab_size: optional vocabulary size (checks ``eos_id``).
    max_len: optional longest sequence (checks the prompt and response lengths).

  Returns:
    :class:`PolicyFns` whose ``sample`` runs
    :func:`jaxrm.models.sampling.sample_with_apply_fn` (one full forward pass per new token,
    no KV cache) on each row with its own key.
  """
  if not callable(apply_fn):
    raise ValueError(f"apply_fn must be callable, got {type(apply_fn).__name__}")

  def apply(params, tokens, mask):
    out = apply_fn(params, tokens, mask)
    if isinstance(out, tuple):
      if len(out) != 2:
        raise ValueError(f"apply_fn must return logits or (logits, values), got {len(out)} outputs")
      return out
    return out, None

  def sample(params, prompts, prompt_mask, keys, *, max_new_tokens, temperature, eos_id):
    from jaxrm.models import sampling  # sampling imports PolicyModel from this module

    def one(prompt, mask, key):
      out = sampling.sample_with_apply_fn(
        apply_fn,
        params,
        prompt[None],
        mask[None],
        key,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        eos_id=eos_id,
        max_len=max_len,
      )
      return jax.tree.map(lambda x: x[0], out)

    return jax.vmap(one)(prompts, prompt_mask, keys)

  return PolicyFns(apply=apply, sample=sample, vocab_size=vocab_size, max_len=max_len)
