r"""The reward-model step on packed pairs against two rows per pair, on the same HH batches.

Builds the ``hh`` config's data (``experiments/configs/reward_model.py``; ``--max_len``,
``--batch_size``, ``--shape`` and ``--tokenizer`` as flags), takes ``--batches`` training
batches, and times the run's jitted step (:func:`jaxrm.train.reward_model.step_fn`, mixed
precision with ``--matmul_dtype=bfloat16``) over all of them in each layout: two rows per pair
(chosen, rejected; what the runs do by default) and one packed row per pair
(:func:`jaxrm.data.packing.pack_pairs`, rows in multiples of ``--pack_pairs``: what
``--config.model.pack_pairs`` does). Every shape is compiled before the clock starts; the
layouts alternate for ``--rounds`` rounds, each timing every batch once from the same state, and
the losses of both layouts are printed side by side (the same batches, so the same numbers up
to float rounding). Commands (figures in BUILD_NOTES.md)::

  python benchmarks/packed_step.py --shape=4x256x4 --batch_size=16 --max_len=128
  python benchmarks/packed_step.py --shape=4x256x4 --batch_size=16 --max_len=256 \
    --tokenizer=tests/data/hf/tokenizer
  python benchmarks/packed_step.py --pack_pairs=64
"""

import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.shapes import hh_config  # noqa: E402
from experiments.configs import reward_model as rm_configs  # noqa: E402
from jaxrm.data import packing, pairs  # noqa: E402
from jaxrm.io import rundir  # noqa: E402
from jaxrm.train import reward_model  # noqa: E402

_DATA = flags.DEFINE_string("data", rm_configs.HH_FILE, "HH-RLHF JSONL(.gz) file.")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "data.tokenizer ('': bytes).")
_MAX_LEN = flags.DEFINE_integer("max_len", 256, "Tokens per response (the hh config's: 256).")
_SHAPE = flags.DEFINE_string("shape", "", "LAYERSxWIDTHxHEADS ('': the hh config's tiny).")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Pairs per step (the hh config's: 32).")
_PACK = flags.DEFINE_integer("pack_pairs", 32, "Packed rows in multiples of this many tokens.")
_BATCHES = flags.DEFINE_integer("batches", 24, "Training batches timed per layout and round.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternating rounds (two rows, packed).")
_MATMUL = flags.DEFINE_enum(
  "matmul_dtype", "bfloat16", ["float32", "bfloat16"], "model.matmul_dtype."
)


def main(argv):
  del argv
  for name, flag in (("batches", _BATCHES), ("rounds", _ROUNDS), ("pack_pairs", _PACK)):
    if flag.value < 1:
      raise app.UsageError(f"--{name} must be >= 1, got {flag.value}")
  config = hh_config(
    data=_DATA.value,
    max_len=_MAX_LEN.value,
    batch_size=_BATCH.value,
    matmul_dtype=_MATMUL.value,
    shape=_SHAPE.value,
  )
  config.data.tokenizer = _TOKENIZER.value
  try:
    reward_model.validate_config(config)
    with tempfile.TemporaryDirectory() as workdir:
      data = pairs.load_data(config.data, workdir, tok=reward_model.run_tokenizer_for(config))
  except rundir.ConfigError as e:
    raise app.UsageError(e.flag_message()) from None
  except (OSError, ValueError) as e:  # a missing file; a bad line, named with its number
    raise app.UsageError(f"--data: {e}") from None
  backbone = reward_model.preset_backbone(config, vocab_size=data.vocab_size, max_len=data.max_len)
  model = reward_model.RewardModel(backbone, pooling=config.model.pooling)
  optimizer, _ = reward_model.make_optimizer(config)
  state = reward_model.init_state(config, model, optimizer, data.max_len)
  step = jax.jit(reward_model.step_fn(config, model, optimizer))
  it = pairs.train_iterator(config, data)
  batches = [next(it) for _ in range(_BATCHES.value)]
  layouts = {
    "two rows": [{k: b[k] for k in reward_model.STEP_KEYS if k in b} for b in batches],
    "packed": [
      {
        k: v
        for k, v in packing.pack_pairs(b, multiple=_PACK.value).items()
        if k in reward_model.PACKED_STEP_KEYS
      }
      for b in batches
    ],
  }
  slots = {
    "two rows": sum(2 * b["chosen"].size for b in layouts["two rows"]),
    "packed": sum(b["packed"].size for b in layouts["packed"]),
  }
  losses = {name: [float(step(state, b)[1]["loss"]) for b in bs] for name, bs in layouts.items()}
  seconds = {name: [] for name in layouts}
  for _ in range(_ROUNDS.value):
    for name, bs in layouts.items():
      start = time.perf_counter()
      for b in bs:
        metrics = step(state, b)[1]
      jax.block_until_ready(metrics)
      seconds[name].append((time.perf_counter() - start) / len(bs))
  shape = _SHAPE.value or "2x64x2 (tiny)"
  lengths = sorted({b["packed"].shape[1] for b in layouts["packed"]})
  print(
    f"backbone {shape}, {_MATMUL.value} matmuls | {len(batches)} batches of {_BATCH.value} pairs, "
    f"tokenizer {data.tokenizer}, max_len {_MAX_LEN.value} | two-row lengths "
    f"{sorted({b['chosen'].shape[1] for b in layouts['two rows']})}, packed lengths {lengths} "
    f"(multiples of {_PACK.value})"
  )
  print("layout | token slots | step ms per round | median ms | pairs/s | vs two rows")
  base = statistics.median(seconds["two rows"])
  for name, times in seconds.items():
    median = statistics.median(times)
    print(
      f"{name} | {slots[name]:,} | {' '.join(f'{t * 1e3:.1f}' for t in times)} | "
      f"{median * 1e3:.1f} | {_BATCH.value / median:.1f} | {base / median:.2f}x"
    )
  gap = np.max(np.abs(np.subtract(losses["packed"], losses["two rows"])))
  print(
    f"first batch's loss: two rows {losses['two rows'][0]:.6f}, packed "
    f"{losses['packed'][0]:.6f}; largest difference over the batches {gap:.2e}"
  )


if __name__ == "__main__":
  app.run(main)
