"""Timing helpers shared by the benchmarks: best-of-n wall time, the float32 matmul ceiling
and the KV-cached sampler's tokens/s (used by ``model_throughput.py`` and ``peer_trl.py``)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxrm.models.policy import PolicyModel
from jaxrm.models.presets import flops_per_token
from jaxrm.models.sampling import sample


def best_time(fn, reps: int) -> float:
  """Smallest wall time of ``reps`` calls of ``fn`` (each blocked until ready), in seconds."""
  best = float("inf")
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best


def measure_matmul_flops(n: int, reps: int) -> float:
  """Best float32 FLOP/s of a jitted ``[n, n] @ [n, n]`` on the default device."""
  keys = jax.random.split(jax.random.key(0))
  a = jax.random.normal(keys[0], (n, n), jnp.float32)
  b = jax.random.normal(keys[1], (n, n), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, b))  # compile + warm-up
  return 2.0 * n**3 / best_time(lambda: matmul(a, b), reps)


def sampler_prompts(
  *, vocab_size: int, batch: int, prompt_len: int
) -> tuple[np.ndarray, np.ndarray]:
  """Seeded left-padded prompts of random real lengths in ``[1, prompt_len]``.

  Returns:
    ``(tokens [batch, prompt_len] int, mask [batch, prompt_len] bool)``, pad id 0.
  """
  rng = np.random.default_rng(1)
  lengths = rng.integers(1, prompt_len + 1, size=batch)
  mask = np.arange(prompt_len)[None, :] >= (prompt_len - lengths)[:, None]
  tokens = np.where(mask, rng.integers(3, vocab_size, size=(batch, prompt_len)), 0)
  return tokens, mask


def benchmark_sampler(cfg, *, batch: int, prompt_len: int, new_tokens: int, reps: int) -> dict:
  """Times the KV-cached sampler on :func:`sampler_prompts`; returns a metrics dict."""
  model = PolicyModel(cfg)
  tokens, mask = sampler_prompts(vocab_size=cfg.vocab_size, batch=batch, prompt_len=prompt_len)
  params = jax.jit(model.init)(jax.random.key(0), jnp.asarray(tokens), jnp.asarray(mask))
  run = lambda: sample(
    params,
    tokens,
    mask,
    jax.random.key(1),
    config=cfg,
    max_new_tokens=new_tokens,
    temperature=1.0,
    eos_id=None,
  )
  start = time.perf_counter()
  jax.block_until_ready(run())
  first_s = time.perf_counter() - start
  seconds = best_time(run, reps)
  # Forward FLOPs of the generated tokens (attention at the full length: an upper bound).
  flops = batch * new_tokens * flops_per_token(cfg, prompt_len + new_tokens, head="policy")
  return dict(
    sample_s=seconds,
    sampler_tokens_per_s=batch * new_tokens / seconds,
    sampler_flops_per_s=flops / seconds,
    sampler_compile_s=max(first_s - seconds, 0.0),
  )
