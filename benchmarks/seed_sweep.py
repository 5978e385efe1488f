r"""Seeds per second of vmapped reward-model seed sweeps (jaxrm.steps.rm_sweep) against seed count.

Trains ``k`` synthetic-world proxies at once (one ``lax.scan`` chunk per call, all seeds under
``jax.vmap``) and reports steps/s, seed-steps/s and the speed-up over one seed, with compile
time separately. ``--thread_groups=G`` splits the ``k`` seeds into ``G`` equal groups, each
run in its own Python thread (``RewardModelSweep.train(thread_groups=G)``; XLA runs the
programs concurrently): a way to use more cores than one tiny program does. ``--seed_batch=k``
vmaps only ``k`` seeds together and loops over a group's seeds ``k`` at a time
(``RewardModelSweep.train(seed_batch=k)``; 1: each seed's own unbatched step, one after
another). Commands (the figures in BUILD_NOTES.md)::

  python benchmarks/seed_sweep.py --width=16 --layers=1 --seeds=1,4,16
  python benchmarks/seed_sweep.py --width=8 --layers=1 --seeds=1,8 --thread_groups=2
  python benchmarks/seed_sweep.py --layers=2 --width=64 --heads=4 --seeds=1,8 --thread_groups=2
  python benchmarks/seed_sweep.py --width=16 --layers=1 --steps=200 --seeds=1,8 --thread_groups=2 --seed_batch=1
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
import jax  # noqa: E402

from benchmarks import timing  # noqa: E402

_SEEDS = flags.DEFINE_list("seeds", ["1", "4", "16"], "Seed counts to time.")
_WIDTH = flags.DEFINE_integer("width", 16, "Proxy width.")
_LAYERS = flags.DEFINE_integer("layers", 1, "Proxy layers.")
_HEADS = flags.DEFINE_integer("heads", 2, "Proxy attention heads (dividing --width).")
_STEPS = flags.DEFINE_integer("steps", 100, "Timed steps (one compiled chunk).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Pairs per step and seed.")
_GROUPS = flags.DEFINE_integer(
  "thread_groups", 1, "Split each seed count into this many groups, one thread each."
)
_SEED_BATCH = flags.DEFINE_integer(
  "seed_batch", 0, "Seeds vmapped together in a group's program (0: all of the group's)."
)


def main(argv):
  del argv
  if _GROUPS.value < 1:
    raise app.UsageError(f"--thread_groups must be >= 1, got {_GROUPS.value}")
  if _SEED_BATCH.value < 0:
    raise app.UsageError(
      f"--seed_batch must be >= 0 (0: all seeds vmapped), got {_SEED_BATCH.value}"
    )
  seed_counts = [int(s) for s in _SEEDS.value]
  for k in seed_counts:
    if k < 1 or k % min(_GROUPS.value, k):
      raise app.UsageError(
        f"--seeds={k} with --thread_groups={_GROUPS.value}: seed counts must be >= 1 and "
        "divisible into the groups"
      )
  try:
    sweep, pairs, seq_len = timing.synthetic_sweep(
      layers=_LAYERS.value, width=_WIDTH.value, heads=_HEADS.value, batch_size=_BATCH.value
    )
  except ValueError as e:  # heads not dividing the width, ...
    raise app.UsageError(str(e)) from None
  print(
    f"device: {jax.devices()[0].platform} | proxy {_LAYERS.value}x{_WIDTH.value}x{_HEADS.value} | "
    f"batch {_BATCH.value} pairs x {seq_len} tokens | {_STEPS.value} steps per call | "
    f"seeds in up to {_GROUPS.value} thread(s), "
    + (f"{_SEED_BATCH.value} vmapped at a time" if _SEED_BATCH.value else "all vmapped")
  )
  print("seeds | compile s | steps/s | seed-steps/s | speed-up vs 1 seed")

  base = None
  for k in seed_counts:
    first, seconds = timing.seed_sweep_seconds(
      sweep,
      pairs,
      seeds=k,
      steps=_STEPS.value,
      thread_groups=min(_GROUPS.value, k),
      seed_batch=_SEED_BATCH.value or None,
    )
    rate = _STEPS.value / seconds
    base = base or rate * k
    print(
      f"{k:5d} | {max(first - seconds, 0):9.1f} | {rate:7.1f} | {rate * k:12.1f} | "
      f"{rate * k / base:5.2f}x"
    )


if __name__ == "__main__":
  app.run(main)
