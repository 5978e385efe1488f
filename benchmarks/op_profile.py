r"""Where a compiled program's time goes, op by op: the RM training step, the KV-cached sampler
or a synthetic-world seed sweep.

Runs the program a few times under ``jax.profiler`` (a Perfetto trace; XLA:CPU records one
event per executed HLO op) and sums the events' durations per call of the program:

- ``--target=rm_step``: jaxrm's reward-model training step with the README's HH settings
  (``experiments/configs/reward_model.py:hh``: non-finite guard, query blocks) on random
  full-length batches, as ``attention_share.py`` times it;
- ``--target=sampler``: :func:`jaxrm.models.sampling.sample` on a preset (left-padded prompts,
  ``--new_tokens`` tokens each, no EOS), as ``model_throughput.py`` times it;
- ``--target=seed_sweep``: one compiled chunk of ``--steps`` steps of
  :class:`jaxrm.steps.rm_sweep.RewardModelSweep` training ``--seeds`` synthetic-world proxies
  at once (``--layers`` x ``--width``, ``--batch`` pairs per step and seed), as
  ``seed_sweep.py`` times it.

Printed: the program's wall time per call (without the profiler), then the op time per call
grouped twice: by op kind (the HLO name without its number: ``dot``, ``slice_bitcast_fusion``,
...) and by the JAX operation that produced it (the ``op_name`` XLA keeps in the optimised
HLO, which this script dumps with ``--xla_dump_to`` into a temporary directory; layer numbers
are folded together). Op times from several threads can add up to more than the wall time,
and the profiler slows short ops; compare shares, not absolute sums, with ``attention_share.py``
or ``model_throughput.py`` timings. Figures in BUILD_NOTES.md::

  python benchmarks/op_profile.py --target=rm_step
  python benchmarks/op_profile.py --target=sampler --preset=small --batch=64
  python benchmarks/op_profile.py --target=seed_sweep --layers=1 --width=8 --seeds=8
"""

from __future__ import annotations

import atexit
import collections
import functools
import glob
import gzip
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time

_DUMP = tempfile.mkdtemp(prefix="op_profile_hlo_")
atexit.register(functools.partial(shutil.rmtree, _DUMP, ignore_errors=True))
# XLA reads its flags once, when the backend starts: set before jax is imported.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={_DUMP}".strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import shapes, timing  # noqa: E402
from jaxrm.models.policy import PolicyModel  # noqa: E402
from jaxrm.models.presets import preset  # noqa: E402
from jaxrm.models.sampling import sample  # noqa: E402

_TARGET = flags.DEFINE_enum(
  "target", "rm_step", ["rm_step", "sampler", "seed_sweep"], "Program to profile."
)
_REPS = flags.DEFINE_integer("reps", 5, "Profiled calls (after warm-up calls).")
_TOP = flags.DEFINE_integer("top", 25, "Rows printed per table.")
_LAYERS = flags.DEFINE_integer(
  "layers", 2, "rm_step, seed_sweep: backbone layers (README HH model: 2)."
)
_WIDTH = flags.DEFINE_integer("width", 64, "rm_step, seed_sweep: backbone width (README HH: 64).")
_HEADS = flags.DEFINE_integer(
  "heads", 2, "rm_step, seed_sweep: attention heads (README HH model: 2)."
)
_SEQ = flags.DEFINE_integer("seq_len", 256, "rm_step: tokens per response (README HH run: 256).")
_PAIRS = flags.DEFINE_integer("batch_pairs", 32, "rm_step: pairs per step (README HH run: 32).")
_MICRO = flags.DEFINE_integer("microbatch_size", -1, shapes.MICROBATCH_HELP)
_MATMUL = flags.DEFINE_enum(
  "matmul_dtype",
  "float32",
  ["float32", "bfloat16"],
  "rm_step: the backbone's matmul dtype (bfloat16: mixed precision, model.matmul_dtype).",
)
_PRESET = flags.DEFINE_string("preset", "small", "sampler: model preset.")
_BATCH = flags.DEFINE_integer(
  "batch", 64, "sampler: sequences sampled together; seed_sweep: pairs per step and seed."
)
_PROMPT = flags.DEFINE_integer("prompt_len", 32, "sampler: prompt length (left-padded).")
_NEW = flags.DEFINE_integer("new_tokens", 64, "sampler: tokens generated per sequence.")
_SEEDS = flags.DEFINE_integer("seeds", 8, "seed_sweep: proxies trained at once (vmapped).")
_STEPS = flags.DEFINE_integer("steps", 20, "seed_sweep: steps per call (one compiled chunk).")

# Trace events that are not an HLO op: the executor's spans, waits and Python frames.
_NOT_OPS = re.compile(
  r"^(\$|ThunkExecutor|SlinkyThreadPool|PjitFunction|CommonPjRt|ParseArg|end: )"
)


def rm_step_program():
  """``(run, name)``: one call of the HH reward-model training step, and its jit name."""
  backbone = timing.hh_backbone(
    layers=_LAYERS.value,
    width=_WIDTH.value,
    heads=_HEADS.value,
    seq_len=_SEQ.value,
    matmul_dtype=_MATMUL.value,
  )
  step, state = timing.hh_reward_model_step(
    backbone, _SEQ.value, microbatch_size=shapes.microbatch_size(_MICRO, _PAIRS.value)
  )
  (batch,) = timing.full_length_pairs(pairs=_PAIRS.value, seq_len=_SEQ.value, count=1)
  batch = step.shard_batch(batch)

  def run():
    nonlocal state
    state, metrics = step(state, batch)
    return metrics

  return run, "reward_model_step"


def sampler_program():
  """``(run, name)``: one call of the KV-cached sampler on the preset, and its jit name."""
  cfg = preset(_PRESET.value, max_len=_PROMPT.value + _NEW.value)
  model = PolicyModel(cfg)
  tokens, mask = timing.sampler_prompts(
    vocab_size=cfg.vocab_size, batch=_BATCH.value, prompt_len=_PROMPT.value
  )
  params = jax.jit(model.init)(jax.random.key(0), jnp.asarray(tokens), jnp.asarray(mask))
  key = jax.random.key(1)
  kwargs = dict(config=cfg, max_new_tokens=_NEW.value, temperature=1.0, eos_id=None)
  return lambda: sample(params, tokens, mask, key, **kwargs), "_sample_cached"


def seed_sweep_program():
  """``(run, name)``: one compiled chunk of a synthetic-world seed sweep, and its jit name."""
  sweep, pairs, _ = timing.synthetic_sweep(
    layers=_LAYERS.value, width=_WIDTH.value, heads=_HEADS.value, batch_size=_BATCH.value
  )
  states = sweep.init(jax.random.split(jax.random.key(2), _SEEDS.value))

  def run():
    nonlocal states
    states, metrics = sweep.train(
      states, pairs, num_steps=_STEPS.value, chunk=_STEPS.value, log_every_chunk=False
    )
    return metrics

  return run, "_train_chunk"


_PROGRAMS = {
  "rm_step": rm_step_program,
  "sampler": sampler_program,
  "seed_sweep": seed_sweep_program,
}


def hlo_op_names(jit_name: str) -> dict[str, str]:
  """HLO instruction name -> its JAX ``op_name`` (layer numbers folded) from the dump."""
  files = glob.glob(os.path.join(_DUMP, f"*jit_{jit_name}*after_optimizations.txt"))
  names = {}
  for path in files:
    with open(path) as f:
      for m in re.finditer(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"', f.read(), re.M):
        op = re.sub(r"^jit\([^)]*\)/", "", m.group(2))
        names[m.group(1)] = re.sub(r"(block|layer)_\d+", r"\1_N", op)
  return names


def op_times(trace_dir: str) -> tuple[collections.Counter, collections.Counter]:
  """Summed duration (microseconds) and number of events of each HLO op in the trace."""
  (path,) = glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True)
  with gzip.open(path) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  times, counts = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and not _NOT_OPS.match(e["name"]):
      times[e["name"]] += e["dur"]
      counts[e["name"]] += 1
  return times, counts


def table(title: str, groups: collections.Counter, counts: collections.Counter, reps: int):
  total = sum(groups.values())
  print(f"\n{title} | ms per call | ops per call | share of op time")
  for name, us in groups.most_common(_TOP.value):
    print(f"{name[:110]} | {us / reps / 1e3:.2f} | {counts[name] / reps:g} | {us / total:.1%}")


def main(argv):
  del argv
  sizes = (
    _REPS,
    _TOP,
    _LAYERS,
    _WIDTH,
    _HEADS,
    _SEQ,
    _PAIRS,
    _BATCH,
    _PROMPT,
    _NEW,
    _SEEDS,
    _STEPS,
  )
  for flag in sizes:
    if flag.value < 1:
      raise app.UsageError(f"--{flag.name} must be >= 1, got {flag.value}")
  try:
    run, jit_name = _PROGRAMS[_TARGET.value]()
  except ValueError as e:  # an unknown preset, heads not dividing the width, ...
    raise app.UsageError(str(e)) from None
  for _ in range(3):  # compile and warm up
    jax.block_until_ready(run())
  walls = []
  for _ in range(_REPS.value):
    start = time.perf_counter()
    jax.block_until_ready(run())
    walls.append(time.perf_counter() - start)
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    for _ in range(_REPS.value):
      jax.block_until_ready(run())
    jax.profiler.stop_trace()
    times, counts = op_times(trace_dir)
  op_names = hlo_op_names(jit_name)
  kinds, kind_counts = collections.Counter(), collections.Counter()
  sources, source_counts = collections.Counter(), collections.Counter()
  for name, us in times.items():
    kind = re.sub(r"\.\d+$", "", name)
    source = op_names.get(name, "(no op_name)")
    kinds[kind] += us
    sources[source] += us
    kind_counts[kind] += counts[name]  # ops inside a loop run many times per call
    source_counts[source] += counts[name]
  reps = _REPS.value
  print(
    f"{_TARGET.value}: median wall {statistics.median(walls) * 1e3:.1f} ms per call without "
    f"the profiler | op time {sum(times.values()) / reps / 1e3:.1f} ms per call under it "
    f"| {len(times)} distinct ops"
  )
  table("op kind", kinds, kind_counts, reps)
  table("JAX operation", sources, source_counts, reps)


if __name__ == "__main__":
  app.run(main)
