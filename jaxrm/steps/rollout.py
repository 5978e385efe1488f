"""RLHF rollouts: sample responses from the policy, score them, and measure log-probs and KL.

A rollout (:func:`rollout`) takes a batch of LEFT-padded prompts and

1. samples one response per prompt from the current policy with its sampler
   (``policy.sample`` of a :class:`jaxrm.models.policy.PolicyFns`: KV-cached for jaxrm's
   transformer, full-forward for any ``apply_fn``), each example with its own key
   ``fold_in(key, global_example_index)`` (:func:`example_keys`), so a data-parallel run
   whose devices each sample a shard of the prompts draws exactly the samples of a
   single-device run on the global batch;
2. scores the full sequences with any pure ``reward_fn(reward_params, tokens [b, s],
   mask [b, s]) -> [b]`` (a reward model, an ensemble objective, or a rule with
   ``reward_params=None``);
3. recomputes the policy's log-probs, entropies and values with a full forward pass (not
   the sampler's cached ones, so that the PPO ratio is exactly 1 before the first update)
   and the reference policy's log-probs;
4. estimates the per-token ``KL(pi || pi_ref)`` with the chosen estimator (k1/k2/k3,
   :mod:`jaxrm.math.kl`) and, with ``exact_kl=True``, computes the exact per-token KL between
   the two full next-token distributions at each sampled prefix
   (:func:`jaxrm.math.kl.exact_kl_from_logits`; summed over a response it is an unbiased,
   lower-variance estimate of the sequence KL, exact given the sampled prefixes).

Log-probs are those of the *sampling* distribution ``softmax(logits / temperature)``, for
the policy and for the reference (as in TRL), so with ``temperature=1`` they are the model's
own. Every per-token array is aligned with ``tokens`` (:mod:`jaxrm.models.policy` convention: entry
``t`` concerns ``tokens[:, t]``) and is 0 outside the response. ``values[:, t]`` is the value
of the state in which ``tokens[:, t]`` is chosen, i.e. the value head read at ``t - 1`` (the
alignment :mod:`jaxrm.math.advantages` expects).

:func:`token_frequency` is a rule-based reward (the fraction of response tokens equal to
one id) used by tests and the experiment scripts.

Example::

  out = rollout(params, ref_params, None, prompts, prompt_mask, key,
                policy=transformer_policy(cfg),
                reward_fn=lambda _, t, m: token_frequency(t, m, token_id=5,
                                                          prompt_len=prompts.shape[1]),
                max_new_tokens=8, eos_id=None)
  out.scores            # [batch]
  out.kl.sum(-1)        # per-sequence KL estimate
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp

from jaxrm.math import kl as kl_lib
from jaxrm.models import sampling
from jaxrm.models.policy import PolicyFns, token_entropy, token_logprobs

RewardFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


class Rollout(NamedTuple):
  """A batch of sampled responses with everything the policy-gradient losses need.

  All per-token fields are ``[batch, prompt_len + max_new_tokens]``, aligned with
  ``tokens`` and 0 where ``response_mask`` is False.
  """

  tokens: jax.Array  # int32; left-padded prompt, then the response, then PAD
  mask: jax.Array  # bool; True on real prompt and response tokens
  response_mask: jax.Array  # bool; True on response tokens (EOS included)
  logprobs: jax.Array  # float32; log pi(tokens[t] | tokens[:t]) from a full forward pass
  ref_logprobs: jax.Array  # float32; the same under the reference policy
  entropy: jax.Array  # float32; entropy of the distribution tokens[t] was drawn from
  values: jax.Array | None  # float32; value of the state in which tokens[t] is chosen
  kl: jax.Array  # float32; per-token KL(pi || pi_ref) estimate (the chosen estimator)
  scores: jax.Array  # [batch] float32; reward_fn of each full sequence
  kl_exact: jax.Array | None = None  # float32; KL(pi(.|tokens[:t]) || pi_ref(.|tokens[:t]))


def token_frequency(
  tokens: jax.typing.ArrayLike, mask: jax.typing.ArrayLike, *, token_id: int, prompt_len: int
) -> jax.Array:
  """Fraction of the response tokens equal to ``token_id`` (a rule-based reward).

  The response is the real tokens at positions ``>= prompt_len`` (prompts are left-padded
  to ``prompt_len``, so the response always starts there).

  Args:
    tokens: ``[batch, seq]`` int prompt + response tokens.
    mask: ``[batch, seq]`` bool, True on real tokens.
    token_id: the rewarded token.
    prompt_len: length of the (padded) prompt part.

  Returns:
    ``[batch]`` float32 in ``[0, 1]``; 0 for a row without response tokens.
  """
  tokens, mask = jnp.asarray(tokens), jnp.asarray(mask).astype(bool)
  if tokens.ndim != 2 or mask.shape != tokens.shape:
    raise ValueError(
      f"tokens and mask must have the same shape [batch, seq], got {tokens.shape} and {mask.shape}"
    )
  if not 0 <= prompt_len < tokens.shape[1]:
    raise ValueError(f"prompt_len must be in [0, seq={tokens.shape[1]}), got {prompt_len}")
  response = mask & (jnp.arange(tokens.shape[1]) >= prompt_len)[None, :]
  hits = jnp.sum(response & (tokens == token_id), axis=1, dtype=jnp.float32)
  return hits / jnp.maximum(jnp.sum(response, axis=1, dtype=jnp.float32), 1.0)


def example_keys(key: jax.Array, batch_size: int, *, offset: Any = 0) -> jax.Array:
  """Per-example keys ``fold_in(key, offset + i)`` for ``i < batch_size`` -> ``[batch_size]``.

  With ``offset`` the global index of the first local example (``axis_index * batch_size``
  under data parallelism) every example gets the same key on any number of devices.
  """
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(offset + jnp.arange(batch_size))


def global_offset(local_size: int, axis_name: Any) -> jax.Array:
  """Global index of this device's first example: ``axis_index * local_size`` (0 unmapped)."""
  if axis_name is None:
    return jnp.zeros((), jnp.int32)
  return lax.axis_index(axis_name) * local_size


def check_prompts(
  prompts: Any, prompt_mask: Any, *, max_len: int | None, max_new_tokens: int
) -> None:
  """Checks of a prompt batch; raises ``ValueError`` naming the argument. Shapes and dtype are
  checked at trace time; left padding (:func:`jaxrm.models.sampling.check_left_padded`) where
  the mask is concrete, i.e. outside ``jit``.

  ``max_len`` is the policy's longest sequence (:attr:`PolicyFns.max_len`; None: unchecked).
  """
  shape, mask_shape = jnp.shape(prompts), jnp.shape(prompt_mask)
  if len(shape) != 2:
    raise ValueError(f"prompts must have shape [batch, prompt_len], got {shape}")
  if mask_shape != shape:
    raise ValueError(f"prompt_mask must have the shape of prompts {shape}, got {mask_shape}")
  if not jnp.issubdtype(jnp.result_type(prompts), jnp.integer):
    raise ValueError(f"prompts must be an integer array, got dtype {jnp.result_type(prompts)}")
  if max_len is not None and shape[1] + max_new_tokens > max_len:
    raise ValueError(
      f"prompts length {shape[1]} (shape {shape}) + max_new_tokens "
      f"{max_new_tokens} exceeds the policy's max_len={max_len}"
    )
  sampling.check_left_padded(prompt_mask)


def check_eos_id(eos_id: int | None, *, vocab_size: int | None) -> None:
  """Raises ``ValueError`` unless ``eos_id`` is None or a token of the policy's vocabulary."""
  if eos_id is not None and vocab_size is not None and not 0 <= eos_id < vocab_size:
    raise ValueError(f"eos_id must be None or in [0, vocab_size={vocab_size}), got {eos_id}")


def _forward(params, tokens, mask, *, policy: PolicyFns, value_head: bool, temperature: float):
  """``(logits / temperature, values or None)`` of a full forward pass."""
  logits, values = policy.apply(params, tokens, mask)
  if not value_head:
    values = None
  elif values is None:
    raise ValueError(
      "this algorithm needs a value head, but the policy's apply returned values=None (for "
      "jaxrm's transformer: transformer_policy(config, value_head=True) and params from "
      "init_value_head)"
    )
  return logits / temperature, values


def _outputs(logits, values, tokens):
  logp = token_logprobs(logits, tokens)
  entropy = token_entropy(logits)
  if values is not None:
    values = jnp.pad(values[:, :-1], ((0, 0), (1, 0)))
  return logp, entropy, values


def policy_outputs(
  params: Any,
  tokens: jax.Array,
  mask: jax.Array,
  *,
  policy: PolicyFns,
  value_head: bool = False,
  temperature: float = 1.0,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """Full forward pass of a policy -> per-token log-probs, entropies and values.

  Args:
    params: policy variables.
    tokens: ``[batch, seq]`` int.
    mask: ``[batch, seq]`` bool.
    policy: the policy's functions (:class:`jaxrm.models.policy.PolicyFns`).
    value_head: return the values (``policy.apply`` must return them, else ``ValueError``).
    temperature: the logits are divided by it (the sampling distribution).

  Returns:
    ``(logprobs, entropy, values)``, each ``[batch, seq]`` aligned with ``tokens`` (entry 0
    is 0); ``values[:, t]`` is the value read at ``t - 1`` (None unless ``value_head``).
  """
  logits, values = _forward(
    params, tokens, mask, policy=policy, value_head=value_head, temperature=temperature
  )
  return _outputs(logits, values, tokens)


def token_exact_kl(logits: jax.Array, ref_logits: jax.Array) -> jax.Array:
  """Exact per-token ``KL(pi || pi_ref)`` of the next-token distributions, aligned with tokens.

  Args:
    logits: ``[batch, seq, vocab]`` of the policy; ``logits[:, t]`` predicts ``tokens[:, t+1]``.
    ref_logits: the same of the reference.

  Returns:
    ``[batch, seq]`` float32; entry ``t >= 1`` is the KL between ``softmax(logits[:, t-1])``
    and ``softmax(ref_logits[:, t-1])`` (the distributions ``tokens[:, t]`` is drawn from),
    entry 0 is 0 (the alignment of :func:`jaxrm.models.policy.token_logprobs`).
  """
  kl = kl_lib.exact_kl_from_logits(logits[:, :-1], ref_logits[:, :-1])
  return jnp.pad(kl, ((0, 0), (1, 0)))


def rollout(
  policy_params: Any,
  ref_params: Any,
  reward_params: Any,
  prompts: jax.typing.ArrayLike,
  prompt_mask: jax.typing.ArrayLike,
  key: jax.Array,
  *,
  policy: PolicyFns,
  reward_fn: RewardFn,
  max_new_tokens: int,
  temperature: float = 1.0,
  eos_id: int | None = sampling.EOS_ID,
  kl_estimator: str = "k1",
  value_head: bool = False,
  example_offset: Any = 0,
  exact_kl: bool = False,
) -> Rollout:
  """Samples one response per prompt, scores it, and computes log-probs, values and KL.

  Args:
    policy_params: the policy's variables (with a value head if ``value_head``).
    ref_params: variables of the reference policy (same ``policy.apply``; a value head, if
      any, is ignored).
    reward_params: first argument of ``reward_fn`` (any pytree, or None).
    prompts: ``[batch, prompt_len]`` int, LEFT-padded.
    prompt_mask: ``[batch, prompt_len]`` bool, ``False...False True...True`` per row.
    key: PRNG key; example ``i`` samples with ``fold_in(key, example_offset + i)``.
    policy: the policy's functions (:class:`jaxrm.models.policy.PolicyFns`), e.g.
      :func:`jaxrm.models.policy.transformer_policy`.
    reward_fn: ``reward_fn(reward_params, tokens [b, s], mask [b, s]) -> [b]``.
    max_new_tokens: response length budget (static).
    temperature: sampling temperature (static); log-probs are those of
      ``softmax(logits / temperature)`` for the policy and the reference.
    eos_id: token that ends a response (kept in it), or None for fixed-length responses.
    kl_estimator: ``'k1'``, ``'k2'`` or ``'k3'`` for :attr:`Rollout.kl`.
    value_head: evaluate the policy's value head (PPO).
    example_offset: global index of the first example (see :func:`example_keys`).
    exact_kl: also compute :attr:`Rollout.kl_exact` (:func:`token_exact_kl`, a softmax over
      the vocabulary of both policies); else it is None.

  Returns:
    A :class:`Rollout`.
  """
  check_prompts(prompts, prompt_mask, max_len=policy.max_len, max_new_tokens=max_new_tokens)
  check_eos_id(eos_id, vocab_size=policy.vocab_size)
  kl_lib.kl_estimate(jnp.zeros(()), jnp.zeros(()), estimator=kl_estimator)  # validates
  prompts = jnp.asarray(prompts, jnp.int32)
  prompt_mask = jnp.asarray(prompt_mask).astype(bool)
  batch = prompts.shape[0]
  keys = example_keys(key, batch, offset=example_offset)
  out = policy.sample(
    policy_params,
    prompts,
    prompt_mask,
    keys,
    max_new_tokens=max_new_tokens,
    temperature=temperature,
    eos_id=eos_id,
  )
  tokens, mask, response = out.tokens, out.mask, out.response_mask
  scores = jnp.asarray(reward_fn(reward_params, tokens, mask))
  if scores.shape != (batch,):
    raise ValueError(
      f"reward_fn must return rewards of shape [batch] = ({batch},), got {scores.shape}"
    )
  scores = scores.astype(jnp.float32)
  logits, values = _forward(
    policy_params, tokens, mask, policy=policy, value_head=value_head, temperature=temperature
  )
  ref_logits, _ = _forward(
    ref_params, tokens, mask, policy=policy, value_head=False, temperature=temperature
  )
  logp, entropy, values = _outputs(logits, values, tokens)
  ref_logp = token_logprobs(ref_logits, tokens)
  full_kl = token_exact_kl(logits, ref_logits) if exact_kl else None
  zero = lambda x: None if x is None else jnp.where(response, x, 0.0)
  logp, ref_logp, entropy, values, full_kl = map(zero, (logp, ref_logp, entropy, values, full_kl))
  kl = jnp.where(response, kl_lib.kl_estimate(logp, ref_logp, estimator=kl_estimator), 0.0)
  return Rollout(
    tokens=tokens,
    mask=mask,
    response_mask=response,
    logprobs=logp,
    ref_logprobs=ref_logp,
    entropy=entropy,
    values=values,
    kl=kl,
    scores=scores,
    kl_exact=full_kl,
  )
