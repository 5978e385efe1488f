"""Helpers shared by the benchmarks: best-of-n wall time, the float32 matmul ceiling, the
KV-cached sampler's tokens/s (``model_throughput.py``, ``peer_trl.py``), the README HH
reward-model step on random full-length pairs (``attention_share.py``, ``op_profile.py``) and
the synthetic-world seed sweep and its timing (``seed_sweep.py``, ``op_profile.py``,
``peer_trl.py``)."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import shapes
from experiments.configs import reward_model as rm_configs
from jaxrm.data import synthetic
from jaxrm.math import preference
from jaxrm.models import transformer
from jaxrm.models.policy import PolicyModel
from jaxrm.models.presets import flops_per_token
from jaxrm.models.reward_model import RewardModel
from jaxrm.models.sampling import sample
from jaxrm.steps import parallel
from jaxrm.steps.rm_sweep import RewardModelSweep
from jaxrm.train import reward_model as rm_train
from jaxrm.train.rm_config import init_state, make_optimizer

VOCAB = 259  # the byte tokenizer's


def full_length_pairs(
  *, pairs: int, seq_len: int, count: int, vocab_size: int = VOCAB
) -> list[dict[str, np.ndarray]]:
  """``count`` seeded batches of ``pairs`` random (chosen, rejected) pairs of ids in ``[3,
  vocab_size)``, no padding."""
  rng = np.random.default_rng(0)
  shape = (pairs, seq_len)
  return [
    {
      "chosen": rng.integers(3, vocab_size, shape).astype(np.int32),
      "chosen_mask": np.ones(shape, bool),
      "rejected": rng.integers(3, vocab_size, shape).astype(np.int32),
      "rejected_mask": np.ones(shape, bool),
      "weight": np.ones(pairs, np.float32),
    }
    for _ in range(count)
  ]


def hh_backbone(
  *, layers: int, width: int, heads: int, seq_len: int, matmul_dtype: str
) -> transformer.TransformerConfig:
  """A backbone of this shape with the README HH run's settings (causal query blocks of
  ``reward_model.py:hh``) on the byte vocabulary; raises ``ValueError`` for a bad shape."""
  return transformer.TransformerConfig(
    vocab_size=VOCAB,
    num_layers=layers,
    width=width,
    num_heads=heads,
    max_len=seq_len,
    attention_query_block=rm_configs.get_config("hh").model.attention_query_block,
    dtype=jnp.dtype(matmul_dtype),
  )


def hh_step_fn(backbone, seq_len: int, *, microbatch_size: int = -1):
  """``(step_fn, state)``: the README HH run's training step function (``reward_model.py:hh``:
  optimizer, non-finite guard, microbatches; not jitted) on ``backbone``, and its initial
  state; ``microbatch_size`` >= 0 replaces the config's."""
  config = rm_configs.get_config("hh")
  config.microbatch_size = shapes.hh_microbatch_size(microbatch_size)
  model = RewardModel(backbone, pooling=config.model.pooling)
  optimizer, _ = make_optimizer(config)
  return rm_train.step_fn(config, model, optimizer), init_state(config, model, optimizer, seq_len)


def hh_reward_model_step(backbone, seq_len: int, *, microbatch_size: int = -1):
  """``(step, state)``: :func:`hh_step_fn` in the HH run's parallel mode, and its placed
  initial state."""
  step_fn, state = hh_step_fn(backbone, seq_len, microbatch_size=microbatch_size)
  step = parallel.make_parallel_step(step_fn, mode=rm_configs.get_config("hh").parallel)
  return step, step.put_state(state)


def synthetic_sweep(*, layers: int, width: int, heads: int, batch_size: int):
  """``(sweep, pairs, seq_len)``: a :class:`RewardModelSweep` of synthetic-world proxies (the
  studies' proxy architecture at ``layers`` x ``width``, AdamW 1e-3, ``batch_size`` pairs per
  step and seed) and 2,048 comparisons of the default world to train on."""
  cfg = synthetic.WorldConfig(num_calibration=2048)
  # The architecture first: a bad shape is refused before the world is built.
  model = RewardModel(cfg.reward_config(num_layers=layers, width=width, num_heads=heads))
  world = synthetic.init_world(cfg, jax.random.key(0))
  pairs = synthetic.make_comparisons(world, cfg, jax.random.key(1), num=2048).as_batch()
  sweep = RewardModelSweep(
    init_fn=lambda k: model.init(k, pairs["chosen"][:1], pairs["chosen_mask"][:1]),
    apply_fn=model.apply,
    loss_fn=preference.bradley_terry_loss,
    optimizer=optax.adamw(1e-3),
    batch_size=batch_size,
  )
  return sweep, pairs, cfg.seq_len


def seed_sweep_seconds(
  sweep: RewardModelSweep,
  pairs,
  *,
  seeds: int,
  steps: int,
  thread_groups: int = 1,
  seed_batch: int | None = None,
) -> tuple[float, float]:
  """``(first, second)``: wall seconds of two calls of ``steps`` steps of ``seeds`` fresh
  seeds (one compiled chunk, :meth:`RewardModelSweep.train` with ``thread_groups`` and
  ``seed_batch``); the first call compiles unless this process already has the program."""
  states = sweep.init(jax.random.split(jax.random.key(2), seeds))
  times = []
  for _ in range(2):
    start = time.perf_counter()
    states, metrics = sweep.train(
      states,
      pairs,
      num_steps=steps,
      chunk=steps,
      log_every_chunk=False,
      thread_groups=thread_groups,
      seed_batch=seed_batch,
    )
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return times[0], times[1]


def best_time(fn, reps: int) -> float:
  """Smallest wall time of ``reps`` calls of ``fn`` (each blocked until ready), in seconds."""
  best = float("inf")
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best


def measure_matmul_flops(n: int, reps: int, *, dtype=jnp.float32) -> float:
  """Best FLOP/s of a jitted ``[n, n] @ [n, n]`` on the default device: float32, or with
  ``dtype=jnp.bfloat16`` bfloat16 operands summed in float32 (mixed precision's matmul)."""
  keys = jax.random.split(jax.random.key(0))
  a = jax.random.normal(keys[0], (n, n), dtype)
  b = jax.random.normal(keys[1], (n, n), dtype)
  matmul = jax.jit(functools.partial(jnp.matmul, preferred_element_type=jnp.float32))
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


def benchmark_sampler(
  cfg, *, batch: int, prompt_len: int, new_tokens: int, reps: int, thread_groups: int = 1
) -> dict:
  """Times the KV-cached sampler on :func:`sampler_prompts`; returns a metrics dict. With
  ``thread_groups > 1`` the batch is split into that many concurrent calls (per-example
  keys, as :func:`jaxrm.models.sampling.sample` requires for it)."""
  model = PolicyModel(cfg)
  tokens, mask = sampler_prompts(vocab_size=cfg.vocab_size, batch=batch, prompt_len=prompt_len)
  params = jax.jit(model.init)(jax.random.key(0), jnp.asarray(tokens), jnp.asarray(mask))
  key = jax.random.key(1)
  run = lambda: sample(
    params,
    tokens,
    mask,
    key if thread_groups == 1 else jax.random.split(key, batch),
    config=cfg,
    max_new_tokens=new_tokens,
    temperature=1.0,
    eos_id=None,
    thread_groups=thread_groups,
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
