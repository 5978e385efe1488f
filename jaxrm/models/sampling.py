"""Autoregressive sampling: KV-cached for :class:`PolicyModel`, full-forward for any model.

:func:`sample` runs one prefill forward pass over the left-padded prompts and then one
cached forward per new token, all inside a single ``jax.jit`` (a ``lax.scan`` over steps
with a static-size :class:`jaxrm.models.transformer.KVCache` of ``prompt_len + max_new_tokens``
slots). :func:`sample_with_apply_fn` is the model-agnostic path: it recomputes a full
forward pass of any ``apply_fn(params, tokens, mask)`` per token (O(n) times slower, but
works for any model).

The sampling distribution at each step is ``softmax(filter_logits(logits))``: logits
divided by the temperature, then restricted to the ``top_k`` most likely tokens, then to
the nucleus of mass ``top_p`` (Holtzman et al. 2020). The returned ``logprobs`` are the
log-probabilities of the sampled tokens under that distribution, aligned with ``tokens``
(entry ``t`` is the log-prob of ``tokens[:, t]``), and 0 outside the response.

A sequence ends at its first ``eos_id`` (the EOS token itself is part of the response);
every later position holds ``PAD_ID`` with mask False. With ``eos_id=None`` every response
has exactly ``max_new_tokens`` tokens. Randomness: step ``i`` uses
``jax.random.fold_in(key, i)``, so the same key gives the same samples. With ``[batch]``
keys, one per example, example ``b``'s step ``i`` uses ``fold_in(key[b], i)``: its sample
does not depend on the rest of the batch, so :func:`sample` can split the batch into
``thread_groups`` concurrent calls (on a CPU, one small decode program keeps about one core
busy) and return the same samples as one call (log-probabilities up to float rounding: a
program for another batch size may round differently).

References:
  Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration" (nucleus sampling).
"""

from __future__ import annotations

from collections.abc import Callable
import concurrent.futures
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrm.math._arrays import is_int, key_shape
from jaxrm.models.policy import PolicyModel
from jaxrm.models.transformer import TransformerConfig, check_token_range, init_cache, is_concrete

# Byte-tokenizer conventions (see jaxrm/tokenizer.py): PAD=0, BOS=1, EOS=2.
PAD_ID = 0
EOS_ID = 2


class SampleOutput(NamedTuple):
  """Prompts followed by sampled responses; all fields ``[batch, prompt_len + max_new_tokens]``."""

  tokens: jax.Array  # int32; PAD_ID where mask is False
  mask: jax.Array  # bool; True on real prompt and response tokens
  response_mask: jax.Array  # bool; True on response tokens (EOS included)
  logprobs: jax.Array  # float32; log-prob of each response token under the sampling dist.


def _check_filter_args(temperature, top_k, top_p, vocab):
  if not isinstance(top_k, (int, np.integer)) or not 0 <= top_k <= vocab:
    raise ValueError(f"top_k must be an int in [0, vocab={vocab}], got {top_k!r}")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  if is_concrete(temperature) and not float(temperature) > 0:
    raise ValueError(f"temperature must be positive, got {temperature}")


def filter_logits(
  logits: jax.typing.ArrayLike,
  *,
  temperature: float | jax.Array = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
) -> jax.Array:
  """Applies temperature, top-k and top-p (nucleus) filtering to ``logits [..., vocab]``.

  Args:
    logits: unnormalised next-token logits.
    temperature: positive divisor of the logits (may be a traced scalar).
    top_k: keep only the ``top_k`` largest logits (0 keeps all). Ties with the k-th value
      are kept.
    top_p: keep the smallest set of most likely tokens whose probability (after
      temperature and top-k) is at least ``top_p``; the most likely token is always kept.
      1.0 keeps all.

  Returns:
    float32 logits of the same shape with excluded entries set to ``-inf``;
    ``log_softmax`` of the result is the sampling distribution.
  """
  logits = jnp.asarray(logits, jnp.float32)
  _check_filter_args(temperature, top_k, top_p, logits.shape[-1])
  logits = logits / temperature
  if 0 < top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_logits = -jnp.sort(-logits, axis=-1)  # descending
    sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep = mass_before < top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def _check_prompt(prompt_tokens, prompt_mask, max_new_tokens, max_len, vocab_size):
  shape, mask_shape = jnp.shape(prompt_tokens), jnp.shape(prompt_mask)
  if len(shape) != 2:
    raise ValueError(f"prompt_tokens must have shape [batch, prompt_len], got {shape}")
  if mask_shape != shape:
    raise ValueError(f"prompt_mask must have the shape of prompt_tokens {shape}, got {mask_shape}")
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
  if max_len is not None and shape[1] + max_new_tokens > max_len:
    raise ValueError(
      f"prompt_tokens length {shape[1]} (shape {shape}) + max_new_tokens "
      f"{max_new_tokens} exceeds max_len={max_len}"
    )
  if vocab_size is not None:
    check_token_range(prompt_tokens, vocab_size, name="prompt_tokens")
  check_left_padded(prompt_mask)


def check_left_padded(prompt_mask: Any, *, name: str = "prompt_mask") -> None:
  """Raises ``ValueError`` naming ``name`` unless each row of a concrete ``[batch, prompt_len]``
  mask is left-padded with at least one real token (``False...False True...True``); a traced
  mask (under ``jit``) is not checked."""
  if is_concrete(prompt_mask):
    m = np.asarray(prompt_mask).astype(bool)
    if m.size and (np.any(m[:, 1:] < m[:, :-1]) or not np.all(m[:, -1])):
      raise ValueError(
        f"{name} (shape {m.shape}) must be left-padded with at least one real "
        "token per row: each row False...False True...True (tokenizers pad on the right by "
        'default; jaxrm\'s batch_encode takes padding_side="left")'
      )


def _check_keys(key: Any, batch: int) -> None:
  """Raises ``ValueError`` unless ``key`` is one PRNG key or ``[batch]`` keys."""
  got = key_shape(key)
  if got not in ((), (batch,)):
    raise ValueError(
      f"key must be one key, got keys of shape {got} (or [batch] keys, one per example: "
      f"shape ({batch},))"
    )


def _per_example(key: jax.Array) -> bool:
  """Whether ``key`` (checked by :func:`_check_keys`) holds one key per example."""
  return key_shape(key) != ()


def _draw(key, step, filtered):
  """One token per row of ``filtered [b, V]``: from ``fold_in(key, step)`` for the batch, or
  from ``fold_in(key[b], step)`` for row ``b`` with per-example keys."""
  if _per_example(key):
    draw = lambda k, logits: jax.random.categorical(jax.random.fold_in(k, step), logits)
    return jax.vmap(draw)(key, filtered)
  return jax.random.categorical(jax.random.fold_in(key, step), filtered, axis=-1)


def _choose(logits, key, step, done, temperature, top_k, top_p, eos_id):
  """Samples one token per row; finished rows emit PAD with log-prob 0."""
  filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
  token = _draw(key, step, filtered)
  logp = jnp.take_along_axis(jax.nn.log_softmax(filtered, axis=-1), token[:, None], axis=-1)[:, 0]
  active = ~done
  token = jnp.where(active, token, PAD_ID).astype(jnp.int32)
  logp = jnp.where(active, logp, 0.0)
  if eos_id is not None:
    done = done | (active & (token == eos_id))
  return token, logp, active, done


def _decode(
  step_fn,
  state,
  first_logits,
  key,
  temperature,
  *,
  prompt_tokens,
  prompt_mask,
  max_new_tokens,
  top_k,
  top_p,
  eos_id,
):
  """Shared sampling loop; ``step_fn(state, token [b], active [b], i) -> (logits [b,V], state)``."""
  batch = prompt_tokens.shape[0]
  choose = functools.partial(
    _choose, temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id
  )

  def body(carry, step):
    state, logits, done = carry
    token, logp, active, done = choose(logits, key, step, done)
    logits, state = step_fn(state, token, active, step)
    return (state, logits, done), (token, active, logp)

  done = jnp.zeros((batch,), bool)
  (_, logits, done), (toks, acts, lps) = jax.lax.scan(
    body, (state, first_logits, done), jnp.arange(max_new_tokens - 1)
  )
  token, logp, active, _ = choose(logits, key, max_new_tokens - 1, done)
  toks = jnp.concatenate([toks, token[None]], axis=0).T  # [b, n]
  acts = jnp.concatenate([acts, active[None]], axis=0).T
  lps = jnp.concatenate([lps, logp[None]], axis=0).T
  prompt_mask = prompt_mask.astype(bool)
  prompt_tokens = jnp.where(prompt_mask, prompt_tokens, PAD_ID).astype(jnp.int32)
  no = jnp.zeros_like(prompt_mask)
  return SampleOutput(
    tokens=jnp.concatenate([prompt_tokens, toks], axis=1),
    mask=jnp.concatenate([prompt_mask, acts], axis=1),
    response_mask=jnp.concatenate([no, acts], axis=1),
    logprobs=jnp.concatenate([jnp.zeros(prompt_mask.shape, jnp.float32), lps], axis=1),
  )


@functools.partial(
  jax.jit, static_argnames=("config", "max_new_tokens", "top_k", "top_p", "eos_id")
)
def _sample_cached(
  params,
  prompt_tokens,
  prompt_mask,
  key,
  temperature,
  *,
  config,
  max_new_tokens,
  top_k,
  top_p,
  eos_id,
):
  model = PolicyModel(config)
  batch, prompt_len = prompt_tokens.shape
  prompt_mask = prompt_mask.astype(bool)
  cache = init_cache(config, batch, prompt_len + max_new_tokens)
  logits, _, cache = model.apply(params, prompt_tokens, prompt_mask, cache=cache)

  def step_fn(cache, token, active, step):
    del step
    logits, _, cache = model.apply(params, token[:, None], active[:, None], cache=cache)
    return logits[:, 0], cache

  return _decode(
    step_fn,
    cache,
    logits[:, -1],
    key,
    temperature,
    prompt_tokens=prompt_tokens,
    prompt_mask=prompt_mask,
    max_new_tokens=max_new_tokens,
    top_k=top_k,
    top_p=top_p,
    eos_id=eos_id,
  )


def sample(
  params: Any,
  prompt_tokens: jax.typing.ArrayLike,
  prompt_mask: jax.typing.ArrayLike,
  key: jax.Array,
  *,
  config: TransformerConfig,
  max_new_tokens: int,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  eos_id: int | None = EOS_ID,
  thread_groups: int = 1,
) -> SampleOutput:
  """Samples responses from a :class:`PolicyModel` with a KV cache, in one jit.

  Args:
    params: variables of ``PolicyModel(config, value_head=...)`` (with or without a value
      head; the value head is not evaluated).
    prompt_tokens: ``[batch, prompt_len]`` int, LEFT-padded (prompts of different lengths).
    prompt_mask: ``[batch, prompt_len]`` bool, ``False...False True...True`` per row.
    key: one PRNG key (step ``i`` uses ``fold_in(key, i)``) or ``[batch]`` keys, one per
      example (example ``b``'s step ``i`` uses ``fold_in(key[b], i)``).
    config: the policy's backbone configuration (static).
    max_new_tokens: response length budget (static); ``prompt_len + max_new_tokens``
      must not exceed ``config.max_len``.
    temperature: positive; traced, so changing it does not recompile.
    top_k: 0 (off) or the number of most likely tokens to keep (static).
    top_p: nucleus mass in (0, 1]; 1.0 is off (static).
    eos_id: token that ends a sequence, or None for fixed-length responses (static).
    thread_groups: splits the batch into this many equal groups, each sampled by its own
      call in its own host thread, so that XLA runs the groups' programs at the same time
      (on a CPU one decode program keeps about one core busy). Needs per-example keys, so
      that the samples are those of a single call (log-probabilities up to float rounding);
      not under ``jit``.

  Returns:
    :class:`SampleOutput` with fields of shape ``[batch, prompt_len + max_new_tokens]``.

  Raises:
    ValueError: bad prompts, keys or settings, or ``thread_groups`` that does not divide the
      batch or comes with a single key.
  """
  _check_prompt(prompt_tokens, prompt_mask, max_new_tokens, config.max_len, config.vocab_size)
  batch = jnp.shape(prompt_tokens)[0]
  _check_keys(key, batch)
  _check_filter_args(temperature, top_k, top_p, config.vocab_size)
  if not is_int(thread_groups) or thread_groups < 1 or batch % thread_groups:
    raise ValueError(
      f"thread_groups must be an int >= 1 that divides the batch of {batch}, got {thread_groups!r}"
    )
  call = functools.partial(
    _sample_cached,
    params,
    temperature=jnp.asarray(temperature, jnp.float32),
    config=config,
    max_new_tokens=max_new_tokens,
    top_k=top_k,
    top_p=float(top_p),
    eos_id=eos_id,
  )
  tokens, mask = jnp.asarray(prompt_tokens, jnp.int32), jnp.asarray(prompt_mask).astype(bool)
  if thread_groups == 1:
    return call(tokens, mask, key)
  if not _per_example(key):
    raise ValueError(
      f"thread_groups={thread_groups} needs [batch] keys, one per example (e.g. "
      "jax.random.split(key, batch)), so that the samples do not depend on the grouping"
    )
  if not all(is_concrete(x) for x in (tokens, mask, key)):
    raise ValueError(f"thread_groups={thread_groups} runs host threads: call sample outside jit")
  size = batch // thread_groups
  parts = [slice(g * size, (g + 1) * size) for g in range(thread_groups)]
  run = lambda p: jax.block_until_ready(call(tokens[p], mask[p], key[p]))
  with concurrent.futures.ThreadPoolExecutor(thread_groups) as pool:
    outs = list(pool.map(run, parts))
  return SampleOutput(*(jnp.concatenate(f, axis=0) for f in zip(*outs)))


@functools.partial(
  jax.jit, static_argnames=("apply_fn", "max_new_tokens", "top_k", "top_p", "eos_id")
)
def _sample_full(
  params,
  prompt_tokens,
  prompt_mask,
  key,
  temperature,
  *,
  apply_fn,
  max_new_tokens,
  top_k,
  top_p,
  eos_id,
):
  batch, prompt_len = prompt_tokens.shape
  prompt_mask = prompt_mask.astype(bool)
  pad = jnp.full((batch, max_new_tokens), PAD_ID, jnp.int32)
  buf_tokens = jnp.concatenate([prompt_tokens, pad], axis=1)
  buf_mask = jnp.concatenate([prompt_mask, jnp.zeros((batch, max_new_tokens), bool)], axis=1)

  def next_logits(tokens, mask, slot):
    out = apply_fn(params, tokens, mask)
    logits = out[0] if isinstance(out, tuple) else out
    return jax.lax.dynamic_index_in_dim(logits, slot, axis=1, keepdims=False)

  def step_fn(state, token, active, step):
    tokens, mask = state
    slot = prompt_len + step
    tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, slot))
    mask = jax.lax.dynamic_update_slice(mask, active[:, None], (0, slot))
    return next_logits(tokens, mask, slot), (tokens, mask)

  first = next_logits(buf_tokens, buf_mask, prompt_len - 1)
  return _decode(
    step_fn,
    (buf_tokens, buf_mask),
    first.astype(jnp.float32),
    key,
    temperature,
    prompt_tokens=prompt_tokens,
    prompt_mask=prompt_mask,
    max_new_tokens=max_new_tokens,
    top_k=top_k,
    top_p=top_p,
    eos_id=eos_id,
  )


def sample_with_apply_fn(
  apply_fn: Callable[..., Any],
  params: Any,
  prompt_tokens: jax.typing.ArrayLike,
  prompt_mask: jax.typing.ArrayLike,
  key: jax.Array,
  *,
  max_new_tokens: int,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  eos_id: int | None = EOS_ID,
  max_len: int | None = None,
) -> SampleOutput:
  """Model-agnostic sampler: one full forward pass of ``apply_fn`` per new token.

  Same semantics, randomness and output as :func:`sample` (identical samples for a
  :class:`PolicyModel` up to float rounding), without a KV cache.

  Args:
    apply_fn: ``apply_fn(params, tokens [b, s], mask [b, s])`` returning ``logits
      [b, s, V]`` or a tuple whose first element is the logits. It is a static jit argument:
      pass the same function object across calls to avoid recompiling.
    params: parameters for ``apply_fn``.
    prompt_tokens, prompt_mask, key, max_new_tokens, temperature, top_k, top_p, eos_id:
      as in :func:`sample`.
    max_len: optional limit on ``prompt_len + max_new_tokens`` (checked when given).

  Returns:
    :class:`SampleOutput` with fields of shape ``[batch, prompt_len + max_new_tokens]``.
  """
  _check_prompt(prompt_tokens, prompt_mask, max_new_tokens, max_len, None)
  _check_keys(key, jnp.shape(prompt_tokens)[0])
  _check_filter_args(temperature, top_k, top_p, float("inf"))  # vocab checked when traced
  return _sample_full(
    params,
    jnp.asarray(prompt_tokens, jnp.int32),
    jnp.asarray(prompt_mask).astype(bool),
    key,
    jnp.asarray(temperature, jnp.float32),
    apply_fn=apply_fn,
    max_new_tokens=max_new_tokens,
    top_k=top_k,
    top_p=float(top_p),
    eos_id=eos_id,
  )
