r"""Reward-model training throughput, model FLOPs utilisation and sampler speed.

For each preset it measures, on this machine and in one run:

* the float32 matmul ceiling: best of a few jitted ``[n, n] @ [n, n]`` products (FLOP/s);
* reward-model forward+backward: a jitted ``value_and_grad`` of the Bradley-Terry loss on
  a batch of (chosen, rejected) pairs -> pairs/s and tokens/s;
* model FLOPs utilisation (MFU) = achieved model FLOP/s / measured matmul FLOP/s, with
  model FLOPs from :func:`jaxrm.models.presets.flops_per_token` (``6 N + 12 L T w`` per token);
* KV-cached sampler tokens/s (:func:`jaxrm.models.sampling.sample`, left-padded prompts,
  ``eos_id=None`` so every response has ``--new_tokens`` tokens).

Timings use ``block_until_ready``; warm-up calls are excluded; compile time is reported
separately (ahead-of-time ``lower().compile()`` for the RM step, first call minus a warm
call for the sampler).

Usage::

  python benchmarks/model_throughput.py                 # small + medium, seq 256
  python benchmarks/model_throughput.py --quick         # a few seconds
  python benchmarks/model_throughput.py --presets=tiny,small,medium --seq_len=512
  python benchmarks/model_throughput.py --presets=small --sampler_batches=1,16,64
"""

from __future__ import annotations

import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.timing import benchmark_sampler, best_time, measure_matmul_flops  # noqa: E402
from jaxrm.models.presets import flops_per_token, param_count, preset  # noqa: E402
from jaxrm.models.reward_model import RewardModel  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("presets", ["small", "medium"], "Presets to benchmark.")
flags.DEFINE_integer("seq_len", 256, "Tokens per sequence for the reward-model step.")
flags.DEFINE_integer("batch_pairs", 8, "Preference pairs per reward-model step.")
flags.DEFINE_integer("steps", 5, "Timed reward-model steps (after one warm-up).")
flags.DEFINE_integer("matmul_size", 2048, "n of the [n, n] @ [n, n] ceiling matmul.")
flags.DEFINE_integer("matmul_reps", 5, "Matmul repetitions (best is reported).")
flags.DEFINE_integer("sampler_batch", 32, "Sequences sampled together.")
flags.DEFINE_list(
  "sampler_batches",
  [],
  "If given: also time the sampler at each of these batch sizes (tokens/s against batch).",
)
flags.DEFINE_integer("prompt_len", 32, "Prompt length (left-padded, varying real lengths).")
flags.DEFINE_integer("new_tokens", 64, "Tokens generated per sequence.")
flags.DEFINE_integer("sampler_reps", 3, "Timed sampler calls (best is reported).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype of the models.")
flags.DEFINE_bool("quick", False, "Shrink everything for a few-second smoke run.")


def benchmark_reward_step(cfg, *, seq_len: int, batch_pairs: int, steps: int) -> dict:
  """Times a jitted value_and_grad of the Bradley-Terry loss; returns a metrics dict."""
  model = RewardModel(cfg)
  rng = np.random.default_rng(0)
  shape = (batch_pairs, seq_len)
  lengths = rng.integers(seq_len // 2, seq_len + 1, size=(2, batch_pairs))
  masks = np.arange(seq_len)[None, None, :] < lengths[:, :, None]  # right-padded
  chosen, rejected = (np.where(m, rng.integers(3, cfg.vocab_size, size=shape), 0) for m in masks)
  batch = tuple(jnp.asarray(x) for x in (chosen, masks[0], rejected, masks[1]))
  params = jax.jit(model.init)(jax.random.key(0), batch[0], batch[1])

  def loss_fn(params, chosen, chosen_mask, rejected, rejected_mask):
    margin = model.apply(params, chosen, chosen_mask) - model.apply(params, rejected, rejected_mask)
    return -jnp.mean(jax.nn.log_sigmoid(margin))

  start = time.perf_counter()
  step = jax.jit(jax.value_and_grad(loss_fn)).lower(params, *batch).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(step(params, *batch))  # warm-up
  seconds = best_time(lambda: step(params, *batch), steps)
  tokens = 2 * batch_pairs * seq_len
  flops = tokens * flops_per_token(cfg, seq_len, head="reward", backward=True)
  return dict(
    step_s=seconds,
    pairs_per_s=batch_pairs / seconds,
    tokens_per_s=tokens / seconds,
    model_flops_per_s=flops / seconds,
    compile_s=compile_s,
  )


def main(argv):
  del argv
  if FLAGS.quick:
    if not FLAGS["presets"].present:
      FLAGS.presets = ["tiny"]
    FLAGS.seq_len, FLAGS.batch_pairs, FLAGS.steps = 64, 4, 2
    FLAGS.matmul_size, FLAGS.matmul_reps = 512, 3
    FLAGS.prompt_len, FLAGS.new_tokens, FLAGS.sampler_reps = 8, 16, 2
  dtype = jnp.bfloat16 if FLAGS.dtype == "bfloat16" else jnp.float32
  device = jax.devices()[0]
  print(
    f"device: {device.platform} {device.device_kind} x{jax.device_count()} | "
    f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus | "
    f"jax {jax.__version__} | compute dtype {FLAGS.dtype}"
  )
  peak = measure_matmul_flops(FLAGS.matmul_size, FLAGS.matmul_reps)
  print(
    f"float32 matmul ceiling ({FLAGS.matmul_size}^2, best of {FLAGS.matmul_reps}): "
    f"{peak / 1e9:.1f} GFLOP/s"
  )
  print(
    f"reward step: {FLAGS.batch_pairs} pairs x {FLAGS.seq_len} tokens, value_and_grad | "
    f"sampler: batch {FLAGS.sampler_batch}, prompt {FLAGS.prompt_len}, "
    f"{FLAGS.new_tokens} new tokens"
  )
  header = (
    "preset",
    "params",
    "step ms",
    "tokens/s",
    "pairs/s",
    "GFLOP/s",
    "MFU",
    "compile s",
    "sampler tok/s",
    "sampler MFU",
    "sampler compile s",
  )
  rows = []
  for name in FLAGS.presets:
    max_len = max(FLAGS.seq_len, FLAGS.prompt_len + FLAGS.new_tokens)
    cfg = preset(name, max_len=max_len, dtype=dtype)
    rm = benchmark_reward_step(
      cfg, seq_len=FLAGS.seq_len, batch_pairs=FLAGS.batch_pairs, steps=FLAGS.steps
    )
    sm = benchmark_sampler(
      cfg,
      batch=FLAGS.sampler_batch,
      prompt_len=FLAGS.prompt_len,
      new_tokens=FLAGS.new_tokens,
      reps=FLAGS.sampler_reps,
    )
    rows.append(
      (
        name,
        f"{param_count(cfg):,}",
        f"{rm['step_s'] * 1e3:.1f}",
        f"{rm['tokens_per_s']:,.0f}",
        f"{rm['pairs_per_s']:.1f}",
        f"{rm['model_flops_per_s'] / 1e9:.1f}",
        f"{rm['model_flops_per_s'] / peak:.1%}",
        f"{rm['compile_s']:.1f}",
        f"{sm['sampler_tokens_per_s']:,.0f}",
        f"{sm['sampler_flops_per_s'] / peak:.1%}",
        f"{sm['sampler_compile_s']:.1f}",
      )
    )
  widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
  line = lambda r: " | ".join(c.rjust(w) for c, w in zip(r, widths))
  print(line(header))
  print("-+-".join("-" * w for w in widths))
  for row in rows:
    print(line(row))
  if FLAGS.sampler_batches:
    _sampler_scaling(dtype)


def _sampler_scaling(dtype) -> None:
  """Prints sampler tokens/s at each ``--sampler_batches`` size (does decode use the batch?)."""
  batches = [int(b) for b in FLAGS.sampler_batches]
  print(f"sampler tokens/s against batch (prompt {FLAGS.prompt_len}, {FLAGS.new_tokens} new):")
  print("preset | " + " | ".join(f"batch {b}" for b in batches))
  for name in FLAGS.presets:
    cfg = preset(name, max_len=FLAGS.prompt_len + FLAGS.new_tokens, dtype=dtype)
    rates = [
      benchmark_sampler(
        cfg,
        batch=b,
        prompt_len=FLAGS.prompt_len,
        new_tokens=FLAGS.new_tokens,
        reps=FLAGS.sampler_reps,
      )["sampler_tokens_per_s"]
      for b in batches
    ]
    print(f"{name} | " + " | ".join(f"{r:,.0f}" for r in rates))


if __name__ == "__main__":
  app.run(main)
