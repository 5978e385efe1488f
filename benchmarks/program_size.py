r"""The reward-model training step's compiled program: its size, compile time and load time.

Builds the README HH run's training step (``experiments/configs/reward_model.py:hh``:
AdamW, the non-finite guard, causal query blocks; mixed precision with
``--matmul_dtype=bfloat16``) at the flags' backbone shape, then times, in this process:

- ``trace and lower``: ``jax.jit(step).lower(state, batch)``;
- ``compile``: XLA's compile of that lowering (the persistent compilation cache is turned off
  for this process, so this is a real compile: an executable that was itself loaded from the
  cache cannot be serialised again on XLA:CPU, its kernels' code is missing);
- ``instructions``: the optimised program's HLO instructions (lines with ``=`` in
  ``compiled.as_text()``; fused computations' bodies included);
- ``executable bytes``: the serialised executable
  (``jax.experimental.serialize_executable.serialize``), what a persistent compilation cache
  stores before compression;
- ``load``: ``deserialize_and_load`` of those bytes, median of ``--loads``: what a later
  process pays to take the program from the compilation cache (the first step of a run with a
  warm cache);
- ``first call`` and ``step``: the loaded program's first call, and the median of ``--reps``
  later calls, on random full-length pairs;
- ``loss``: the first call's loss from the compiled program and from the loaded one (the
  same step on the same state and batch: the same number).

Commands (figures in BUILD_NOTES.md)::

  python benchmarks/program_size.py --layers=4 --width=256 --heads=4 --seq_len=128 --batch_pairs=16
  python benchmarks/program_size.py --layers=12 --width=768 --heads=12 --seq_len=128 --batch_pairs=2
"""

import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
from jax.experimental import serialize_executable  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import shapes, timing  # noqa: E402

_LAYERS = flags.DEFINE_integer("layers", 4, "Backbone layers.")
_WIDTH = flags.DEFINE_integer("width", 256, "Backbone width.")
_HEADS = flags.DEFINE_integer("heads", 4, "Attention heads.")
_SEQ = flags.DEFINE_integer("seq_len", 128, "Tokens per response.")
_PAIRS = flags.DEFINE_integer("batch_pairs", 16, "Pairs per step.")
_LOADS = flags.DEFINE_integer("loads", 3, "Timed loads of the serialised executable.")
_REPS = flags.DEFINE_integer("reps", 3, "Timed steps after the first call.")
_MATMUL = flags.DEFINE_enum(
  "matmul_dtype",
  "bfloat16",
  ["float32", "bfloat16"],
  "The backbone's matmul dtype (bfloat16: mixed precision, model.matmul_dtype).",
)

_MICRO = flags.DEFINE_integer("microbatch_size", -1, shapes.MICROBATCH_HELP)


def seconds(fn):
  start = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - start


def main(argv):
  del argv
  jax.config.update("jax_enable_compilation_cache", False)
  for flag in (_LAYERS, _WIDTH, _HEADS, _SEQ, _PAIRS, _LOADS, _REPS):
    if flag.value < 1:
      raise app.UsageError(f"--{flag.name} must be >= 1, got {flag.value}")
  try:
    backbone = timing.hh_backbone(
      layers=_LAYERS.value,
      width=_WIDTH.value,
      heads=_HEADS.value,
      seq_len=_SEQ.value,
      matmul_dtype=_MATMUL.value,
    )
  except ValueError as e:  # heads not dividing the width, ...
    raise app.UsageError(str(e)) from None
  micro = shapes.microbatch_size(_MICRO, _PAIRS.value)
  step_fn, state = timing.hh_step_fn(backbone, _SEQ.value, microbatch_size=micro)
  step = jax.jit(functools.partial(step_fn, axis_name=None), donate_argnums=0)
  (batch,) = timing.full_length_pairs(pairs=_PAIRS.value, seq_len=_SEQ.value, count=1)
  batch = jax.tree.map(jnp.asarray, batch)

  lowered, lower_s = seconds(lambda: step.lower(state, batch))
  compiled, compile_s = seconds(lowered.compile)
  instructions = sum(" = " in line for line in compiled.as_text().splitlines())
  payload, in_tree, out_tree = serialize_executable.serialize(compiled)
  loads = []
  for _ in range(_LOADS.value):
    loaded, load_s = seconds(
      lambda: serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
    )
    loads.append(load_s)
  compiled_loss = float(compiled(jax.tree.map(jnp.copy, state), batch)[1]["loss"])
  (state, metrics), first_s = seconds(lambda: jax.block_until_ready(loaded(state, batch)))
  steps = []
  for _ in range(_REPS.value):
    state, step_s = seconds(lambda s=state: jax.block_until_ready(loaded(s, batch)[0]))
    steps.append(step_s)
  print(
    f"RM step {_LAYERS.value}x{_WIDTH.value} ({_HEADS.value} heads), {_PAIRS.value} pairs x "
    f"{_SEQ.value} tokens, microbatches of {micro or _PAIRS.value}, {_MATMUL.value} matmuls, "
    f"{jax.devices()[0].platform}"
  )
  print(
    "trace and lower s | compile s | instructions | executable bytes | load s | "
    "first call s | step s | loss (compiled / loaded)"
  )
  print(
    f"{lower_s:.2f} | {compile_s:.2f} | {instructions} | {len(payload)} | "
    f"{statistics.median(loads):.3f} | {first_s:.3f} | {statistics.median(steps):.4f} | "
    f"{compiled_loss:.7f} / {float(metrics['loss']):.7f}"
  )


if __name__ == "__main__":
  app.run(main)
