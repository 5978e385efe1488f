r"""Would encoding each pair's shared prompt once pay on the HH sample? Work per layout.

Issue 14 names a lever: encode the prompt that chosen and rejected share once, either as one
row per pair (common prefix + chosen suffix + rejected suffix, positions restarting for the
rejected suffix, a block mask) or as a prefix KV cache that both suffixes attend to. Before
building either, this counts the backbone's work under each layout on the training batches the
README HH run sees (its config, tokenizer, truncation and bucketing iterator, one epoch of
``pairs.train_iterator``; each batch's pairs stay together in every layout):

- ``two rows`` (what jaxrm and TRL do): a chosen and a rejected row per pair, padded to the
  batch's bucket;
- ``packed``: one row per pair, ``common + (chosen - common) + (rejected - common)`` tokens
  (``common``: the longest common token prefix, at least the prompt), padded to the bucket of
  the batch's longest packed row: the same power-of-two buckets, or multiples of
  ``--packed_multiple`` (finer buckets, more compiled shapes);
- ``prefix cache``: the common prefixes as one row per pair, then both suffixes as rows whose
  queries also read the prefix's keys; each padded to its batch maximum, rounded up to
  multiples of ``--packed_multiple``.

Printed per layout, summed over the epoch: token slots (rows x padded length: what the
projections and the MLP compute) and attention score elements per head and layer, with causal
query blocks of ``attention_query_block`` (block ``[s, e)`` computes ``e`` keys, as the ``hh``
config does; a block mask can skip no more statically, since where the suffixes meet varies
by row), each relative to ``two rows``. These are counts, not times. The time of a layout's
step is bounded below by the library's step at the same rows and length: e.g. a packed batch of
32 pairs at 448 tokens is at least ``python benchmarks/attention_share.py --variants=block64
--batch_pairs=16 --seq_len=448`` (32 rows; figures in BUILD_NOTES.md).

  python benchmarks/prefix_sharing.py
"""

import collections
import math
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
import numpy as np  # noqa: E402

from experiments.configs import reward_model as rm_configs  # noqa: E402
from jaxrm.data import iterator, pairs  # noqa: E402
from jaxrm.train.reward_model import run_tokenizer_for  # noqa: E402

_FILE = flags.DEFINE_string("file", rm_configs.HH_FILE, "HH-RLHF JSONL(.gz) file.")
_PACKED_MULTIPLE = flags.DEFINE_integer(
  "packed_multiple", 64, "Finer bucket: packed and prefix-cache rows pad to its multiples."
)


def common_prefix(batch: dict) -> np.ndarray:
  """``[B]`` length of the longest common token prefix of each pair's chosen and rejected."""
  both = np.minimum(batch["chosen_mask"].sum(1), batch["rejected_mask"].sum(1))
  differ = (batch["chosen"] != batch["rejected"]) | (
    np.arange(batch["chosen"].shape[1]) >= both[:, None]
  )
  return np.where(differ.any(1), np.argmax(differ, axis=1), both)  # identical to the end


def causal_scores(length: int, block: int) -> int:
  """Score elements of one row's causal attention with query blocks of ``block`` tokens."""
  if length <= 0:
    return 0
  starts = range(0, length, block)
  return sum((min(s + block, length) - s) * min(s + block, length) for s in starts)


def round_up(n: int, multiple: int) -> int:
  return int(math.ceil(n / multiple) * multiple)


def pair_lengths(batch: dict) -> dict[str, np.ndarray]:
  """``[B]`` chosen, rejected, common-prefix and packed-row lengths of each pair."""
  chosen, rejected = batch["chosen_mask"].sum(1), batch["rejected_mask"].sum(1)
  common = common_prefix(batch)
  return {
    "chosen": chosen,
    "rejected": rejected,
    "common": common,
    "packed": chosen + rejected - common,
  }


def layouts(batch: dict, *, block: int, buckets: tuple[int, ...], multiple: int) -> dict:
  """``(token slots, attention score elements)`` of one batch under each layout."""
  n, length = batch["chosen"].shape
  p = pair_lengths(batch)
  packed = next(b for b in buckets if b >= p["packed"].max())
  fine = round_up(int(p["packed"].max()), multiple)
  prefix = round_up(int(p["common"].max()), multiple)
  suffix = round_up(int((np.maximum(p["chosen"], p["rejected"]) - p["common"]).max()), multiple)
  # A suffix query block [s, e) reads the prefix's keys and the suffix's first e keys.
  suffix_scores = causal_scores(suffix, block) + suffix * prefix
  return {
    "two rows": (2 * n * length, 2 * n * causal_scores(length, block)),
    "packed, power-of-two": (n * packed, n * causal_scores(packed, block)),
    f"packed, x{multiple}": (n * fine, n * causal_scores(fine, block)),
    "prefix cache": (
      n * prefix + 2 * n * suffix,
      n * causal_scores(prefix, block) + 2 * n * suffix_scores,
    ),
  }


def main(argv):
  del argv
  multiple = _PACKED_MULTIPLE.value
  if multiple < 1:
    raise app.UsageError(f"--packed_multiple must be >= 1, got {multiple}")
  config = rm_configs.get_config("hh")
  config.data.files = (_FILE.value,)
  block = config.model.attention_query_block
  with tempfile.TemporaryDirectory() as workdir:
    try:
      data = pairs.load_data(config.data, workdir, tok=run_tokenizer_for(config))
    except (OSError, ValueError) as e:  # a missing file; a bad line, named with its number
      raise app.UsageError(f"--file: {e}") from None
    it = pairs.train_iterator(config, data)
    batches = [next(it) for _ in range(pairs.num_examples(data.train) // config.batch_size)]
  buckets = iterator.power_of_two_buckets(2 * data.max_len)
  per_pair = [pair_lengths(b) for b in batches]
  real = sum(int((p["chosen"] + p["rejected"]).sum()) for p in per_pair)
  common = sum(int(p["common"].sum()) for p in per_pair)
  packed = np.concatenate([p["packed"] for p in per_pair])
  fine = collections.Counter(round_up(int(p["packed"].max()), multiple) for p in per_pair)
  counts = [layouts(b, block=block, buckets=buckets, multiple=multiple) for b in batches]
  totals = {name: tuple(map(sum, zip(*(c[name] for c in counts)))) for name in counts[0]}
  print(
    f"{len(batches)} batches of {config.batch_size} pairs (one epoch; bucket lengths "
    f"{sorted({b['chosen'].shape[1] for b in batches})}); query blocks of {block}"
  )
  print(
    f"real tokens {real:,}; one copy of each common prefix is {common / real:.1%} of them; packed row "
    f"median {np.median(packed):.0f}, max {packed.max()} tokens; batches per packed length "
    f"(x{multiple}) {dict(sorted(fine.items()))}"
  )
  slots, scores = totals["two rows"]
  print("layout | token slots | vs two rows | attention scores | vs two rows")
  for name, (n_slots, n_scores) in totals.items():
    print(f"{name} | {n_slots:,} | {n_slots / slots:.3f} | {n_scores:,} | {n_scores / scores:.3f}")


if __name__ == "__main__":
  app.run(main)
