"""benchmarks/prefix_sharing.py: its counts against brute force, and the script on the HH sample."""

import os
import sys

import numpy as np

from tests import script_runner

sys.path.insert(0, script_runner.ROOT)
from benchmarks import prefix_sharing  # noqa: E402

SAMPLE = os.path.join(script_runner.ROOT, "tests", "data", "hh_rlhf_sample.jsonl.gz")


def _computed_scores(length, block):
  """Counts the (query, key) pairs a blocked causal attention computes, one query at a time."""
  return sum(min((i // block + 1) * block, length) for i in range(length))


def test_causal_scores_counts_every_key_a_query_block_reads():
  for length in (0, 1, 5, 64, 100, 256):
    for block in (1, 7, 64, 300):
      assert prefix_sharing.causal_scores(length, block) == _computed_scores(length, block)
  assert prefix_sharing.causal_scores(256, 1) == 256 * 257 // 2  # exact causal
  assert prefix_sharing.causal_scores(256, 256) == 256 * 256  # the full matrix


def _batch(chosen, rejected, length):
  out = {}
  for key, rows in (("chosen", chosen), ("rejected", rejected)):
    out[key] = np.zeros((len(rows), length), np.int32)
    out[f"{key}_mask"] = np.zeros((len(rows), length), bool)
    for i, row in enumerate(rows):
      out[key][i, : len(row)] = row
      out[f"{key}_mask"][i, : len(row)] = True
  return out


def test_common_prefix_matches_a_loop_and_stops_at_the_shorter_sequence():
  rng = np.random.default_rng(0)
  chosen, rejected = [], []
  for _ in range(50):
    shared = list(rng.integers(1, 4, rng.integers(0, 10)))
    chosen.append(shared + list(rng.integers(1, 4, rng.integers(0, 6))))
    rejected.append(shared + list(rng.integers(1, 4, rng.integers(0, 6))))
  # One sequence is a prefix of the other (padding ids agree); identical rows filling the width.
  chosen += [[5, 6, 7], [5, 6], [1] * 16]
  rejected += [[5, 6], [5, 6, 0], [1] * 16]
  expected = []
  for c, r in zip(chosen, rejected):
    n = 0
    while n < min(len(c), len(r)) and c[n] == r[n]:
      n += 1
    expected.append(n)
  got = prefix_sharing.common_prefix(_batch(chosen, rejected, 16))
  np.testing.assert_array_equal(got, expected)


def test_layouts_count_slots_and_scores_of_each_layout():
  # Pair 0: common 4, suffixes 2 and 3 (packed 9); pair 1: common 1, suffixes 3 and 1 (packed 5).
  batch = _batch([[1, 2, 3, 4, 5, 5], [9, 1, 1, 1]], [[1, 2, 3, 4, 6, 6, 6], [9, 2]], 8)
  out = prefix_sharing.layouts(batch, block=2, buckets=(8, 16), multiple=4)
  scores = prefix_sharing.causal_scores
  lengths = prefix_sharing.pair_lengths(batch)
  np.testing.assert_array_equal(lengths["common"], [4, 1])
  np.testing.assert_array_equal(lengths["packed"], [9, 5])
  assert out["two rows"] == (4 * 8, 4 * scores(8, 2))
  assert out["packed, power-of-two"] == (2 * 16, 2 * scores(16, 2))
  assert out["packed, x4"] == (2 * 12, 2 * scores(12, 2))
  # Prefix rows pad to 4 (longest common 4), suffix rows to 4 (longest suffix 3).
  assert out["prefix cache"] == (2 * 4 + 4 * 4, 2 * scores(4, 2) + 4 * (scores(4, 2) + 4 * 4))


def test_script_prints_every_layout_on_the_hh_sample():
  proc = script_runner.run_subprocess("benchmarks/prefix_sharing.py", f"--file={SAMPLE}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = {r[0].strip(): r for r in (l.split("|") for l in proc.stdout.splitlines()) if len(r) == 5}
  assert set(rows) == {"layout", "two rows", "packed, power-of-two", "packed, x64", "prefix cache"}
  assert float(rows["two rows"][2]) == 1.0 and float(rows["two rows"][4]) == 1.0
  assert "batches of 32 pairs" in proc.stdout


def test_script_rejects_a_bad_bucket_multiple_and_a_missing_file_in_one_line():
  proc = script_runner.run_subprocess("benchmarks/prefix_sharing.py", "--packed_multiple=0")
  assert proc.returncode != 0 and "--packed_multiple must be >= 1" in proc.stderr
  proc = script_runner.run_subprocess("benchmarks/prefix_sharing.py", "--file=/no/such.jsonl")
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert "--file: preference file not found: /no/such.jsonl" in proc.stderr
