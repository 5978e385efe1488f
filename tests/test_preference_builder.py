"""Bad data files and splits for jaxrm.data.preference_files / preference_builder.

Every case is generated here: each must end in one PreferenceDataError line naming the file
(never a TFDS AssertionError, OverflowError or "file not found" for a file that exists), and a
failed build must leave nothing that blocks the corrected call.
"""

import gzip
import json
import os
import re
import tempfile

import pytest
import tensorflow_datasets as tfds

from jaxrm.data import preferences as prefs

tfds.disable_progress_bar()

GOOD = '{"prompt": "p", "chosen": "a", "rejected": "b"}'


def _pairs(n, *, start=0):
  return "".join(
    json.dumps({"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}) + "\n"
    for i in range(start, start + n)
  )


def _write(path, data: bytes | str):
  path.write_bytes(data.encode() if isinstance(data, str) else data)
  return str(path)


def _assert_one_line(err, path, reason):
  message = str(err)
  assert isinstance(err, prefs.PreferenceDataError) and err.reason == reason
  assert str(path) in message and "\n" not in message
  assert not err.skippable  # skip_malformed cannot help, so the loops must not suggest it


def _build(train, data_dir, **kwargs):
  return prefs.build_preference_dataset(train, data_dir=data_dir, max_len=32, **kwargs)


EMPTY_FILES = [
  ("empty.jsonl", b"", "is empty: no preference records"),
  ("blank.jsonl", b"\n  \n\t\n", "holds only 3 blank line(s): no preference records"),
  ("empty.jsonl.gz", gzip.compress(b""), "decompresses to nothing: no preference records"),
  ("blank.jsonl.gz", gzip.compress(b"\n\n"), "holds only 2 blank line(s)"),
]


@pytest.mark.parametrize("name, data, message", EMPTY_FILES, ids=[e[0] for e in EMPTY_FILES])
@pytest.mark.parametrize("skip_malformed", [False, True])
def test_empty_and_blank_files_raise_naming_the_file(tmp_path, name, data, message, skip_malformed):
  path = _write(tmp_path / name, data)
  with pytest.raises(prefs.PreferenceDataError, match=re.escape(message)) as info:
    prefs.read_preference_files(path, max_len=32, skip_malformed=skip_malformed)
  _assert_one_line(info.value, path, "empty_file")
  with pytest.raises(prefs.PreferenceDataError, match=re.escape(message)):
    _build(path, tmp_path / "data", skip_malformed=skip_malformed)
  assert not (tmp_path / "data").exists()  # the failed build left nothing behind


def test_empty_file_is_named_among_good_files(tmp_path):
  good = _write(tmp_path / "good.jsonl", _pairs(4))
  empty = _write(tmp_path / "empty.jsonl", b"")
  with pytest.raises(prefs.PreferenceDataError, match=f"^{re.escape(empty)}: is empty") as info:
    prefs.read_preference_files([good, empty], max_len=32)
  _assert_one_line(info.value, empty, "empty_file")


BAD_GZIP = [
  ("plain.jsonl.gz", lambda: (GOOD + "\n").encode(), "is not gzip data"),
  ("cut.jsonl.gz", lambda: gzip.compress(_pairs(300).encode())[:400], "gzip data is truncated"),
  ("garbage.jsonl.gz", lambda: gzip.compress(b"")[:10] + b"\x00" * 64, "gzip"),
]


@pytest.mark.parametrize("name, make, message", BAD_GZIP, ids=[b[0] for b in BAD_GZIP])
def test_non_gzip_or_truncated_gz_raises_corrupt_file_even_when_skipping(
  tmp_path, name, make, message
):
  path = _write(tmp_path / name, make())
  with pytest.raises(prefs.PreferenceDataError, match=message) as info:
    prefs.read_preference_files(path, max_len=32, skip_malformed=True)
  _assert_one_line(info.value, path, "corrupt_file")
  with pytest.raises(prefs.PreferenceDataError, match=message):
    _build(path, tmp_path / "data", skip_malformed=True)
  assert not (tmp_path / "data").exists()


def _directory(tmp_path):
  path = tmp_path / "a_dir.jsonl"
  path.mkdir()
  return str(path)


def _fifo(tmp_path):
  path = tmp_path / "pipe.jsonl"
  os.mkfifo(path)
  return str(path)


NOT_FILES = [
  (_directory, "is a directory, not a JSONL"),
  (_fifo, r"is a FIFO \(named pipe\), not a JSONL"),
  (lambda _: os.devnull, "is a character device, not a JSONL"),
]


@pytest.mark.parametrize("make, message", NOT_FILES, ids=["directory", "fifo", "dev_null"])
def test_directory_fifo_and_dev_null_are_named_as_such_not_as_missing(tmp_path, make, message):
  path = make(tmp_path)
  with pytest.raises(prefs.PreferenceDataError, match=message) as info:
    prefs.read_preference_files(path, max_len=32)  # a FIFO must not block the reader
  _assert_one_line(info.value, path, "not_a_file")
  good = _write(tmp_path / "good.jsonl", _pairs(4))
  with pytest.raises(prefs.PreferenceDataError, match=message):
    _build(good, tmp_path / "data", test_files=[path])
  assert not (tmp_path / "data").exists()


def test_a_missing_file_is_still_file_not_found(tmp_path):
  with pytest.raises(FileNotFoundError, match="preference file not found: .*missing.jsonl"):
    _build(str(tmp_path / "missing.jsonl"), tmp_path / "data")


def test_too_few_pairs_for_a_held_out_split_names_split_files_and_counts(tmp_path):
  train = _write(tmp_path / "tiny.jsonl", _pairs(3))
  data_dir = tmp_path / "data"
  # With seed 0, the hash split sends all 3 lines to train at test_fraction=0.01.
  assert all(
    prefs.line_split(line.encode(), test_fraction=0.01) == "train"
    for line in _pairs(3).splitlines()
  )
  with pytest.raises(prefs.PreferenceDataError) as info:
    _build(train, data_dir, test_fraction=0.01)
  _assert_one_line(info.value, train, "too_few_pairs")
  assert "split 'test' got no preference pairs" in str(info.value)
  assert "all 3 line(s) (3 distinct" in str(info.value)
  assert not data_dir.exists()
  # The corrected command runs in the same data directory (nothing half-built blocks it).
  builder = _build(train, data_dir)
  assert len(builder.as_data_source(split="train")) == 3


def test_duplicate_lines_that_collapse_into_one_split_are_reported(tmp_path):
  line = json.dumps({"prompt": "q", "chosen": "yes", "rejected": "no"}) + "\n"
  train = _write(tmp_path / "dups.jsonl", line * 16)
  empty_split = "test" if prefs.line_split(line.encode(), test_fraction=0.5) == "train" else "train"
  with pytest.raises(prefs.PreferenceDataError) as info:
    _build(train, tmp_path / "data", test_fraction=0.5)
  _assert_one_line(info.value, train, "too_few_pairs")
  message = str(info.value)
  assert f"split {empty_split!r} got no preference pairs" in message
  assert "all 16 line(s) (1 distinct; duplicate lines share a split)" in message


def test_a_split_whose_lines_were_all_skipped_is_an_error(tmp_path):
  train = _write(tmp_path / "train.jsonl", _pairs(4))
  test = _write(tmp_path / "test.jsonl", '{"chosen": "a"}\n')
  with pytest.raises(prefs.PreferenceDataError) as info:
    _build(train, tmp_path / "data", test_files=[test], skip_malformed=True)
  _assert_one_line(info.value, test, "too_few_pairs")
  assert "all 1 of its lines were skipped as malformed {'missing_field': 1}" in str(info.value)


def test_truncation_that_makes_every_pair_identical_is_an_error(tmp_path):
  # max_len=4: BOS + 1 prompt byte + 1 response byte + EOS; both responses start with "a".
  lines = "".join(
    json.dumps({"prompt": "p" * 20, "chosen": f"a{i}", "rejected": f"a{i + 1}"}) + "\n"
    for i in range(4)
  )
  train = _write(tmp_path / "short.jsonl", lines)
  with pytest.raises(prefs.PreferenceDataError) as info:
    prefs.build_preference_dataset(train, data_dir=tmp_path / "data", max_len=4)
  _assert_one_line(info.value, train, "degenerate_split")
  assert "max_len=4" in str(info.value) and "identical in all 4 pairs" in str(info.value)
  assert not (tmp_path / "data").exists()
  builder = prefs.build_preference_dataset(train, data_dir=tmp_path / "data", max_len=32)
  assert len(builder.as_data_source(split="train")) == 4


def test_a_failed_build_keeps_what_the_data_directory_held_before(tmp_path):
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  (data_dir / "notes.txt").write_text("keep me")
  good = _write(tmp_path / "good.jsonl", _pairs(4))
  _build(good, data_dir, name="first")
  bad = _write(tmp_path / "bad.jsonl", _pairs(3))
  with pytest.raises(prefs.PreferenceDataError):
    _build(bad, data_dir, name="second", test_fraction=0.01)
  assert (data_dir / "notes.txt").read_text() == "keep me"
  assert sorted(os.listdir(data_dir / "preference_pairs")) == ["first"]
  assert len(_build(good, data_dir, name="first").as_data_source(split="train")) == 4


def test_a_fresh_build_leaves_nothing_in_the_temporary_directory(tmp_path, monkeypatch):
  # TFDS 4.9 makes a temporary directory to look an unprepared dataset up on its bucket and
  # never removes it: one empty /tmp/tmp*tfds per fresh build without the override.
  tmp = tmp_path / "tmp"
  tmp.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(tmp))
  train = _write(tmp_path / "train.jsonl", _pairs(4))
  assert len(_build(train, tmp_path / "data").as_data_source(split="train")) == 4
  assert os.listdir(tmp) == []


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"max_len": 2}, "max_len must be > 2"),
    ({"test_fraction": float("nan")}, "test_fraction must be in"),
    ({"min_prompt_fraction": 1.5}, "min_prompt_fraction must be in"),
  ],
)
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, kwargs, message):
  train = _write(tmp_path / "good.jsonl", _pairs(4))
  kwargs = {"max_len": 32, **kwargs}
  with pytest.raises(ValueError, match=message):
    prefs.build_preference_dataset(train, data_dir=tmp_path / "data", **kwargs)
  assert not (tmp_path / "data").exists()
