"""Tests for jaxrm.data.iterator.BatchIterator."""

import json
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxrm.data import iterator as iterator_lib
from jaxrm.data import pairs
from jaxrm.data import preferences as prefs
from jaxrm.data.iterator import BatchIterator

N, WIDTH, BATCH = 203, 64, 8
SAMPLE = str(pathlib.Path(__file__).parent / "data" / "hh_rlhf_sample.jsonl.gz")
BUCKETS = (8, 16, 32, 64)

tfds.disable_progress_bar()


def _arrays(n=N, width=WIDTH, seed=0):
  """Right-padded pairs with right-skewed lengths, like text; tokens encode (example, pos)."""
  rng = np.random.default_rng(seed)
  out = {
    "label": rng.uniform(size=n).astype(np.float32),
    "weight": rng.uniform(0.5, 2.0, size=n).astype(np.float32),
  }
  for key in ("chosen", "rejected"):
    lengths = np.minimum(rng.geometric(1 / 14, size=n), width)
    mask = np.arange(width)[None, :] < lengths[:, None]
    tokens = (np.arange(n)[:, None] * 1000 + np.arange(width)[None, :]).astype(np.int32)
    out[key] = np.where(mask, tokens, 0).astype(np.int32)
    out[f"{key}_mask"] = mask
  return out


def _take(it, k):
  return [next(it) for _ in range(k)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


SETTINGS = {
  "plain": dict(),
  "pad_remainder": dict(drop_remainder=False),
  "buckets": dict(bucket_lengths=BUCKETS, bucket_window=4),
  "buckets_pad": dict(bucket_lengths=BUCKETS, bucket_window=4, drop_remainder=False),
}


@pytest.mark.parametrize("name", SETTINGS)
def test_every_example_appears_exactly_once_per_epoch(name):
  kwargs = SETTINGS[name]
  data = _arrays()
  it = BatchIterator(data, batch_size=BATCH, seed=1, **kwargs)
  drop = kwargs.get("drop_remainder", True)
  assert it.batches_per_epoch == (N // BATCH if drop else -(-N // BATCH))
  for _ in range(2):
    batches = _take(it, it.batches_per_epoch)
    index = np.concatenate([b["index"] for b in batches])
    weight = np.concatenate([b["weight"] for b in batches])
    real = index[index >= 0]
    assert len(set(real.tolist())) == len(real) == (N // BATCH * BATCH if drop else N)
    assert (weight[index < 0] == 0).all() and (index < 0).sum() == len(index) - len(real)
    np.testing.assert_array_equal(weight[index >= 0], data["weight"][real])
    assert all(b["chosen"].shape[0] == BATCH for b in batches)


def test_pad_rows_are_zero_weight_copies_of_real_examples():
  data = _arrays()
  it = BatchIterator(data, batch_size=BATCH, seed=0, drop_remainder=False)
  last = _take(it, it.batches_per_epoch)[-1]
  pad = last["index"] < 0
  assert pad.sum() == BATCH - N % BATCH
  first = last["index"][0]
  np.testing.assert_array_equal(
    last["chosen"][pad], np.repeat(data["chosen"][first][None], pad.sum(), 0)
  )
  assert last["chosen_mask"][pad].any(axis=1).all()  # never an all-padding row
  assert (last["weight"][pad] == 0).all()


def test_batches_hold_the_indexed_examples():
  data = _arrays()
  it = BatchIterator(data, batch_size=BATCH, seed=2, bucket_lengths=BUCKETS, bucket_window=4)
  for batch in _take(it, 30):
    idx = batch["index"]
    length = batch["chosen"].shape[1]
    assert batch["rejected"].shape[1] == batch["chosen_mask"].shape[1] == length
    for key in ("chosen", "rejected"):
      np.testing.assert_array_equal(batch[key], data[key][idx, :length])
      np.testing.assert_array_equal(batch[f"{key}_mask"], data[f"{key}_mask"][idx, :length])
      assert not data[f"{key}_mask"][idx, length:].any()  # the crop dropped only padding
    np.testing.assert_array_equal(batch["label"], data["label"][idx])
    assert batch["weight"].dtype == np.float32 and batch["index"].dtype == np.int32


def test_same_seed_same_order_other_seed_or_epoch_other_order():
  data = _arrays()
  for kwargs in (SETTINGS["plain"], SETTINGS["buckets"]):
    first = lambda seed, kwargs=kwargs: np.concatenate(  # noqa: E731
      [
        b["index"]
        for b in _take(BatchIterator(data, batch_size=BATCH, seed=seed, **kwargs), 2 * (N // BATCH))
      ]
    )
    a, b, c = first(0), first(0), first(1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    epoch0, epoch1 = a[: len(a) // 2], a[len(a) // 2 :]
    assert not np.array_equal(epoch0, epoch1)


def test_bucketed_batches_differ_between_epochs_even_when_one_window_holds_all_data():
  data = _arrays(n=64)
  distinct = np.arange(64)[None, :] < np.arange(1, 65)[:, None]  # lengths 1..64, no ties
  data.update(chosen_mask=distinct, rejected_mask=distinct)
  it = BatchIterator(data, batch_size=BATCH, seed=0, bucket_lengths=BUCKETS, bucket_window=64)
  groups = [
    {frozenset(b["index"].tolist()) for b in _take(it, it.batches_per_epoch)} for _ in range(2)
  ]
  assert groups[0] != groups[1]


def test_bucketing_uses_only_allowed_lengths_and_cuts_padding():
  data = _arrays()

  def padded_positions(it):
    batches = _take(it, it.batches_per_epoch)
    lengths = {b["chosen"].shape[1] for b in batches}
    return sum(2 * b["chosen"].size for b in batches), lengths, batches

  plain, plain_lengths, _ = padded_positions(BatchIterator(data, batch_size=BATCH, seed=0))
  bucketed, lengths, batches = padded_positions(
    BatchIterator(data, batch_size=BATCH, seed=0, bucket_lengths=BUCKETS, bucket_window=8)
  )
  assert plain_lengths == {WIDTH}
  assert lengths <= set(BUCKETS) and len(lengths) > 1
  real = sum(int(b["chosen_mask"].sum() + b["rejected_mask"].sum()) for b in batches)
  assert bucketed < 0.85 * plain
  assert real <= bucketed
  for b in batches:  # each batch gets the smallest bucket that fits it
    longest = max(b["chosen_mask"].sum(1).max(), b["rejected_mask"].sum(1).max())
    assert b["chosen"].shape[1] == min(x for x in BUCKETS if x >= longest)


@pytest.mark.parametrize("name", SETTINGS)
@pytest.mark.parametrize("k", [0, 5, N // BATCH, N // BATCH + 3])
def test_resumed_iterator_continues_with_exactly_the_next_batches(name, k):
  kwargs = SETTINGS[name]
  data = _arrays()
  reference = _take(BatchIterator(data, batch_size=BATCH, seed=7, **kwargs), k + 30)
  it = BatchIterator(data, batch_size=BATCH, seed=7, **kwargs)
  _take(it, k)
  state = json.loads(json.dumps(it.get_state()))
  assert all(isinstance(v, int) for v in state.values())
  resumed = BatchIterator(data, batch_size=BATCH, seed=7, **kwargs)
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 30), reference[k:])


def test_set_state_rejects_state_of_other_data_or_settings():
  data = _arrays()
  state = BatchIterator(data, batch_size=BATCH, seed=0).get_state()
  with pytest.raises(ValueError, match="'seed'"):
    BatchIterator(data, batch_size=BATCH, seed=1).set_state(state)
  with pytest.raises(ValueError, match="'batch_size'"):
    BatchIterator(data, batch_size=2 * BATCH, seed=0).set_state(state)
  with pytest.raises(ValueError, match="'num_examples'"):
    BatchIterator(_arrays(n=N - 1), batch_size=BATCH, seed=0).set_state(state)
  with pytest.raises(ValueError, match="missing"):
    BatchIterator(data, batch_size=BATCH, seed=0).set_state({"epoch": 0})
  with pytest.raises(ValueError, match="out of range"):
    BatchIterator(data, batch_size=BATCH, seed=0).set_state({**state, "batch_in_epoch": 999})


@pytest.mark.parametrize(
  "damage, message",
  [
    ({"epoch": "1"}, r"state values must be integers, got \{'epoch': '1'\}"),
    ({"batch_in_epoch": None}, "state values must be integers"),
    ({"seed": 1.5}, "state values must be integers"),
    ({"epoch": True}, "state values must be integers"),
    ({"epoch": -1}, "out of range"),
  ],
)
def test_set_state_rejects_a_damaged_state_with_one_line(damage, message):
  data = _arrays()
  it = BatchIterator(data, batch_size=BATCH, seed=0)
  state = it.get_state()
  with pytest.raises(ValueError, match=message):
    it.set_state({**state, **damage})
  with pytest.raises(ValueError, match="state must be a dict from get_state"):
    it.set_state([0, 0, 0])
  assert it.get_state() == state  # a refused state leaves the position unchanged


def test_num_epochs_stops_iteration_and_shuffle_false_keeps_data_order():
  it = BatchIterator(_arrays(n=20), batch_size=4, seed=0, shuffle=False, num_epochs=2)
  batches = list(it)
  assert len(batches) == 10
  np.testing.assert_array_equal(
    np.concatenate([b["index"] for b in batches]), np.tile(np.arange(20), 2)
  )
  assert it.get_state()["epoch"] == 2


def test_processes_split_each_global_batch():
  data = _arrays()
  kwargs = dict(batch_size=BATCH, seed=3, bucket_lengths=BUCKETS, drop_remainder=False)
  full = _take(BatchIterator(data, **kwargs), 30)
  parts = [
    _take(BatchIterator(data, process_index=p, process_count=4, **kwargs), 30) for p in range(4)
  ]
  for step, batch in enumerate(full):
    for key in batch:
      np.testing.assert_array_equal(
        np.concatenate([parts[p][step][key] for p in range(4)]), batch[key]
      )


def test_arrays_without_weight_get_unit_weight():
  data = {k: v for k, v in _arrays().items() if k != "weight"}
  batch = next(BatchIterator(data, batch_size=BATCH, seed=0))
  np.testing.assert_array_equal(batch["weight"], np.ones(BATCH, np.float32))


def _sample_examples():
  return prefs.read_preference_files(SAMPLE, max_len=256)[0]


def test_record_source_batches_match_records():
  examples = _sample_examples()
  it = BatchIterator(
    examples, batch_size=BATCH, seed=0, bucket_lengths=iterator_lib.power_of_two_buckets(256)
  )
  assert it.subset_names == ("hh_rlhf_sample",)
  seen = []
  for batch in _take(it, it.batches_per_epoch):
    assert set(batch) == {
      "chosen",
      "chosen_mask",
      "rejected",
      "rejected_mask",
      "weight",
      "prompt_len",
      "subset_id",
      "index",
    }
    for row, i in enumerate(batch["index"]):
      e = examples[i]
      n = len(e.chosen)
      np.testing.assert_array_equal(batch["chosen"][row, :n], e.chosen)
      assert batch["chosen_mask"][row].sum() == n
      assert batch["rejected_mask"][row].sum() == len(e.rejected)
      assert batch["prompt_len"][row] == e.prompt_len and batch["subset_id"][row] == 0
    seen += batch["index"].tolist()
  assert sorted(seen) == list(range(64))


def test_tfds_data_source_feeds_the_iterator_and_resumes(tmp_path):
  builder = prefs.build_preference_dataset(SAMPLE, data_dir=tmp_path, max_len=256, name="it")
  source = builder.as_data_source(split="train")
  kwargs = dict(batch_size=BATCH, seed=5, bucket_lengths=(64, 128, 256), bucket_window=2)
  reference = _take(BatchIterator(source, **kwargs), 12)
  lengths = {b["chosen"].shape[1] for b in reference}
  assert lengths <= {64, 128, 256}
  for batch in reference[:3]:
    for row, i in enumerate(batch["index"]):
      record = source[int(i)]
      n = len(record["chosen"])
      np.testing.assert_array_equal(batch["chosen"][row, :n], record["chosen"])
  it = BatchIterator(source, **kwargs)
  _take(it, 9)
  resumed = BatchIterator(source, **kwargs)
  resumed.set_state(it.get_state())
  _assert_batches_equal(_take(resumed, 3), reference[9:])


def test_a_small_split_read_into_memory_gives_the_batches_of_its_tfds_source(tmp_path, monkeypatch):
  builder = prefs.build_preference_dataset(SAMPLE, data_dir=tmp_path, max_len=256, name="mem")
  source = builder.as_data_source(split="train")
  loaded = pairs.in_memory(source, max_len=256)
  assert isinstance(loaded, list) and len(loaded) == len(source) == 64
  train = dict(batch_size=BATCH, seed=3, bucket_lengths=(64, 128, 256), bucket_window=2)
  _assert_batches_equal(  # 10 batches of 8: into the second epoch
    _take(BatchIterator(loaded, **train), 10), _take(BatchIterator(source, **train), 10)
  )
  evaluate = dict(batch_size=5, seed=0, shuffle=False, drop_remainder=False, num_epochs=1)
  _assert_batches_equal(
    list(BatchIterator(loaded, **evaluate)), list(BatchIterator(source, **evaluate))
  )
  monkeypatch.setattr(pairs, "IN_MEMORY_TOKENS", 64 * 2 * 256 - 1)
  assert pairs.in_memory(source, max_len=256) is source
  # load_data reads a run's small splits into memory
  monkeypatch.undo()
  run = pairs.load_data(
    pairs.DataConfig(files=(SAMPLE,), test_fraction=0.25, max_len=128), tmp_path
  )
  assert isinstance(run.train, list) and isinstance(run.test, list)
  assert len(run.train) + len(run.test) == 64


def test_power_of_two_buckets():
  assert iterator_lib.power_of_two_buckets(512) == (32, 64, 128, 256, 512)
  assert iterator_lib.power_of_two_buckets(300, min_len=64) == (64, 128, 256, 300)
  assert iterator_lib.power_of_two_buckets(20) == (20,)
  with pytest.raises(ValueError, match="max_len"):
    iterator_lib.power_of_two_buckets(0)


@pytest.mark.parametrize(
  "kwargs,message",
  [
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=N + 1), "batch_size"),
    (dict(seed=-1), "seed"),
    (dict(bucket_lengths=(8, 16, 32)), "bucket_lengths"),
    (dict(bucket_lengths=(16, 8, 64)), "bucket_lengths"),
    (dict(max_len=32), "max_len"),
    (dict(process_count=3), "process_count"),
    (dict(process_count=2, process_index=2), "process_index"),
    (dict(num_epochs=0), "num_epochs"),
  ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, message):
  kwargs = {"batch_size": BATCH, "seed": 0, **kwargs}
  with pytest.raises(ValueError, match=message):
    BatchIterator(_arrays(), **kwargs)


def test_bad_data_raises_naming_the_key():
  data = _arrays()
  with pytest.raises(ValueError, match="'label'"):
    BatchIterator({**data, "label": data["label"][:5]}, batch_size=BATCH, seed=0)
  left = {**data, "chosen_mask": data["chosen_mask"][:, ::-1].copy()}
  with pytest.raises(ValueError, match="right-padded"):
    BatchIterator(left, batch_size=BATCH, seed=0, bucket_lengths=BUCKETS)
  # Left-padded arrays are fine when they are not re-padded.
  batch = next(BatchIterator(left, batch_size=BATCH, seed=0))
  np.testing.assert_array_equal(batch["chosen_mask"], left["chosen_mask"][batch["index"]])
