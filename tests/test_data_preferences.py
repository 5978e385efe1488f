"""Tests for jaxrm.data.preferences: JSONL parsing, truncation and the TFDS builder."""

import gzip
import json
import logging
import os
import pathlib
import re
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxrm.data import preferences as prefs
from jaxrm.data import tokenizer

SAMPLE = pathlib.Path(__file__).parent / "data" / "hh_rlhf_sample.jsonl.gz"
MARKER = "\n\nAssistant:"

tfds.disable_progress_bar()


def _write_lines(path, lines):
  """Writes str or bytes lines, newline-terminated, to path (gzipped if it ends in .gz)."""
  data = b"".join((l if isinstance(l, bytes) else l.encode("utf-8")) + b"\n" for l in lines)
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(data)
  return str(path)


def _sample_records():
  with gzip.open(SAMPLE, "rt", encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _reference_prompt(chosen, rejected):
  """Independent reference for the HH split: scan for the first differing character, then
  take the text up to the end of the last marker that ends at or before it."""
  diff = next(
    (i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected))
  )
  ends = [m.end() for m in re.finditer(re.escape(MARKER), chosen) if m.end() <= diff]
  return chosen[: ends[-1]] if ends else ""


# ------------------------------------------------------------------------------ parsing


def test_hh_form_splits_prompt_at_last_shared_assistant_turn():
  chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: Sure, a pun."
  rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: Sure, no."
  text = prefs.parse_preference_record({"chosen": chosen, "rejected": rejected})
  assert text.prompt == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant:"
  assert (text.chosen, text.rejected) == (" Sure, a pun.", " Sure, no.")
  assert text.prompt + text.chosen == chosen and text.prompt + text.rejected == rejected
  assert (text.subset, text.weight) == ("", 1.0)


def test_split_shared_prompt_without_shared_marker_gives_empty_prompt():
  assert prefs.split_shared_prompt("abc", "abd") == ("", "abc", "abd")
  # A marker that is only partly shared does not count.
  assert prefs.split_shared_prompt("x\n\nAssistant: a", "x\n\nAssist") == (
    "",
    "x\n\nAssistant: a",
    "x\n\nAssist",
  )


def test_prompt_form_with_strings_concatenates_verbatim():
  text = prefs.parse_preference_record(
    {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5", "subset": "math", "weight": 2}
  )
  assert text == prefs.PreferenceText("Q: 2+2?", " 4", " 5", "math", 2.0)


def test_render_messages_uses_the_hh_template():
  rendered = prefs.render_messages(
    [
      {"role": "system", "content": "Be nice."},
      {"role": "user", "content": "hi"},
      {"role": "Assistant", "content": "hello"},
      {"role": "human", "content": "bye"},
    ]
  )
  assert rendered == "\n\nSystem: Be nice.\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye"


def test_chat_lists_give_the_same_pair_as_the_hh_form():
  chat = {
    "prompt": [
      {"role": "user", "content": "hi"},
      {"role": "assistant", "content": "yo"},
      {"role": "user", "content": "name a colour"},
    ],
    "chosen": [{"role": "assistant", "content": "Blue."}],
    "rejected": [{"role": "assistant", "content": "No."}],
  }
  hh = {
    "chosen": "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: name a colour\n\nAssistant: Blue.",
    "rejected": "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: name a colour\n\nAssistant: No.",
  }
  a = prefs.parse_preference_record(chat)
  b = prefs.parse_preference_record(hh)
  assert a == b
  assert a.prompt.endswith(MARKER) and a.chosen == " Blue."
  pa = prefs.tokenize_pair(a.prompt, a.chosen, a.rejected, max_len=256)
  pb = prefs.tokenize_pair(b.prompt, b.chosen, b.rejected, max_len=256)
  np.testing.assert_array_equal(pa.chosen, pb.chosen)
  assert pa.prompt_len == pb.prompt_len == 1 + len(a.prompt.encode())


def test_hh_form_accepts_whole_dialogues_as_message_lists():
  text = prefs.parse_preference_record(
    {
      "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A"}],
      "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "B"}],
    }
  )
  assert (text.prompt, text.chosen, text.rejected) == ("\n\nHuman: hi" + MARKER, " A", " B")


def test_sample_shared_prefix_length_matches_reference():
  records = _sample_records()
  examples, stats = prefs.read_preference_files(SAMPLE, max_len=100_000)
  assert len(examples) == len(records) == stats.records == 64
  assert stats.truncated_pairs == 0 and stats.num_skipped == 0
  for record, e in zip(records, examples):
    prompt = _reference_prompt(record["chosen"], record["rejected"])
    assert prompt.endswith(MARKER)
    assert e.prompt_len == 1 + len(prompt.encode("utf-8"))
    np.testing.assert_array_equal(e.chosen[: e.prompt_len], e.rejected[: e.prompt_len])
    assert e.chosen[0] == tokenizer.BOS_ID and e.chosen[-1] == tokenizer.EOS_ID
    assert tokenizer.decode(e.chosen) == record["chosen"]
    assert tokenizer.decode(e.rejected) == record["rejected"]
    assert tokenizer.decode(e.chosen[: e.prompt_len]) == prompt
    assert (e.subset, e.weight, e.source, e.truncated) == (
      "hh_rlhf_sample",
      1.0,
      str(SAMPLE),
      False,
    )
  assert [e.line for e in examples] == list(range(1, 65))


def test_gzip_and_plain_files_give_the_same_examples(tmp_path):
  lines = [
    '{"prompt": "p", "chosen": "a", "rejected": "b", "subset": "s"}',
    '{"chosen": "x\\n\\nAssistant: 1", "rejected": "x\\n\\nAssistant: 2"}',
  ]
  plain, _ = prefs.read_preference_files(_write_lines(tmp_path / "d.jsonl", lines), max_len=32)
  gz, _ = prefs.read_preference_files(_write_lines(tmp_path / "d.jsonl.gz", lines), max_len=32)
  assert len(plain) == len(gz) == 2
  for a, b in zip(plain, gz):
    np.testing.assert_array_equal(a.chosen, b.chosen)
    np.testing.assert_array_equal(a.rejected, b.rejected)
    assert (a.prompt_len, a.subset, a.line) == (b.prompt_len, b.subset, b.line)
  assert plain[0].subset == "s" and plain[1].subset == "d"  # default: the file stem


# ------------------------------------------------------------------------------ malformed

GOOD = '{"prompt": "p", "chosen": "a", "rejected": "b"}'
MALFORMED = [
  # (line, reason, field)
  ('{"chosen": "a", "rejected": ', "invalid_json", None),
  ("[1, 2]", "not_an_object", None),
  ('{"chosen": "a"}', "missing_field", "rejected"),
  ('{"rejected": "a", "prompt": "p"}', "missing_field", "chosen"),
  ('{"chosen": 3, "rejected": "b"}', "wrong_type", "chosen"),
  ('{"prompt": 7, "chosen": "a", "rejected": "b"}', "wrong_type", "prompt"),
  ('{"chosen": "", "rejected": "b"}', "empty_text", "chosen"),
  ('{"prompt": "p", "chosen": "a", "rejected": "  "}', "empty_text", "rejected"),
  ('{"prompt": "p", "chosen": [], "rejected": "b"}', "empty_text", "chosen"),
  (b'{"prompt": "p", "chosen": "a\xff\xfe", "rejected": "b"}', "invalid_utf8", "chosen"),
  ('{"prompt": "\\ud800", "chosen": "a", "rejected": "b"}', "invalid_utf8", "prompt"),
  (
    '{"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}',
    "missing_field",
    "prompt[0].content",
  ),
  (
    '{"prompt": "p", "chosen": [{"role": "robot", "content": "x"}], "rejected": "b"}',
    "bad_role",
    "chosen[0].role",
  ),
  ('{"prompt": "p", "chosen": ["hi"], "rejected": "b"}', "wrong_type", "chosen[0]"),
  ('{"prompt": "p", "chosen": "a", "rejected": "b", "weight": "1"}', "wrong_type", "weight"),
  ('{"prompt": "p", "chosen": "a", "rejected": "b", "weight": -1}', "bad_weight", "weight"),
  ('{"prompt": "p", "chosen": "a", "rejected": "b", "weight": NaN}', "bad_weight", "weight"),
  ('{"prompt": "p", "chosen": "a", "rejected": "b", "subset": 3}', "wrong_type", "subset"),
  ('{"chosen": "same", "rejected": "same"}', "identical_pair", "rejected"),
  # Weights past float32 (would become inf), and integers too long for a float or for int().
  ('{"prompt": "p", "chosen": "a", "rejected": "b", "weight": 1e300}', "bad_weight", "weight"),
  ('{"prompt": "p", "chosen": "a", "rejected": "b", "weight": 1e400}', "bad_weight", "weight"),
  (
    '{"prompt": "p", "chosen": "a", "rejected": "b", "weight": 1' + "0" * 399 + "}",
    "bad_weight",
    "weight",
  ),
  (
    '{"prompt": "p", "chosen": "a", "rejected": "b", "weight": 9' + "9" * 4999 + "}",
    "bad_weight",
    "weight",
  ),
  ("[" * 100_000 + "]" * 100_000, "invalid_json", None),  # nested past the recursion limit
]


@pytest.mark.parametrize(
  "line,reason,field", MALFORMED, ids=[f"{i}-{r}-{f}" for i, (_, r, f) in enumerate(MALFORMED)]
)
def test_malformed_line_raises_with_file_line_and_field(tmp_path, line, reason, field):
  path = _write_lines(tmp_path / "bad.jsonl", [GOOD, line, GOOD])
  with pytest.raises(prefs.PreferenceDataError) as info:
    prefs.read_preference_files(path, max_len=64)
  err = info.value
  assert (err.path, err.line, err.reason, err.field) == (path, 2, reason, field)
  assert str(err).startswith(f"{path}:2: ") and "\n" not in str(err) and len(str(err)) < 300
  assert err.skippable
  if field is not None:
    assert repr(field) in str(err)
  assert isinstance(err, ValueError)


def test_skip_malformed_counts_each_reason_and_logs(tmp_path, caplog):
  lines = [GOOD] + [line for line, _, _ in MALFORMED] + ["", GOOD]
  path = _write_lines(tmp_path / "mixed.jsonl", lines)
  with caplog.at_level(logging.WARNING):
    examples, stats = prefs.read_preference_files(path, max_len=64, skip_malformed=True)
  expected = {}
  for _, reason, _ in MALFORMED:
    expected[reason] = expected.get(reason, 0) + 1
  assert stats.skipped == expected
  assert stats.records == len(examples) == 2
  assert [e.line for e in examples] == [1, len(lines)]
  assert stats.blank_lines == 1
  assert stats.lines == len(lines) == stats.records + stats.blank_lines + stats.num_skipped
  assert len(stats.skipped_locations) == len(MALFORMED)
  assert stats.skipped_locations[0].startswith(f"{path}:2: ")
  logged = caplog.text
  assert f"{path}:4: field 'rejected': is missing" in logged
  assert f"skipped {len(MALFORMED)} malformed lines" in logged


def test_corrupt_gzip_raises_naming_the_file(tmp_path):
  path = tmp_path / "cut.jsonl.gz"
  data = gzip.compress(("\n".join([GOOD] * 200) + "\n").encode())
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(prefs.PreferenceDataError, match=re.escape(str(path))):
    prefs.read_preference_files(path, max_len=64, skip_malformed=True)


# ------------------------------------------------------------------------------ truncation


def _text(pair, key):
  return tokenizer.decode(getattr(pair, key))


def test_pair_that_fits_is_not_truncated():
  pair = prefs.tokenize_pair("PP", "cc", "rrr", max_len=7)
  np.testing.assert_array_equal(pair.chosen, [1] + tokenizer.encode("PPcc") + [2])
  np.testing.assert_array_equal(pair.rejected, [1] + tokenizer.encode("PPrrr") + [2])
  assert (pair.prompt_len, pair.truncated_prompt, pair.truncated_response) == (3, False, False)


def test_long_prompt_is_cut_from_the_left_and_responses_kept():
  # budget = 12 - 2 = 10; longest response 3 -> prompt keeps its last 7 bytes.
  pair = prefs.tokenize_pair("0123456789ABC", "xy", "xyz", max_len=12)
  assert _text(pair, "chosen") == "6789ABCxy" and _text(pair, "rejected") == "6789ABCxyz"
  assert len(pair.rejected) == 12 and pair.prompt_len == 8
  assert (pair.truncated_prompt, pair.truncated_response) == (True, False)
  assert pair.chosen[-1] == tokenizer.EOS_ID and pair.chosen[0] == tokenizer.BOS_ID


def test_long_response_keeps_half_the_budget_for_the_prompt_then_cuts_responses_right():
  # budget = 10, prompt keeps floor(0.5 * 10) = 5 of its 8 bytes, responses cut to 5.
  pair = prefs.tokenize_pair("01234567", "abcdefghij", "ABC", max_len=12)
  assert _text(pair, "chosen") == "34567abcde" and _text(pair, "rejected") == "34567ABC"
  assert pair.prompt_len == 6 and len(pair.chosen) == 12
  assert (pair.truncated_prompt, pair.truncated_response) == (True, True)
  # A prompt shorter than its share is kept whole.
  pair = prefs.tokenize_pair("012", "abcdefghij", "ABC", max_len=12)
  assert _text(pair, "chosen") == "012abcdefg" and pair.prompt_len == 4
  assert (pair.truncated_prompt, pair.truncated_response) == (False, True)


def test_min_prompt_fraction_zero_gives_the_whole_budget_to_responses():
  pair = prefs.tokenize_pair("01234567", "abcdefghijkl", "A", max_len=12, min_prompt_fraction=0.0)
  assert _text(pair, "chosen") == "abcdefghij" and pair.prompt_len == 1
  pair = prefs.tokenize_pair(
    "01234567", "abc", "A", max_len=6, add_bos=False, add_eos=False, min_prompt_fraction=0.0
  )
  np.testing.assert_array_equal(pair.chosen, tokenizer.encode("567abc"))
  assert pair.prompt_len == 3


@pytest.mark.parametrize(
  "kwargs,argument",
  [
    (dict(max_len=2), "max_len"),
    (dict(max_len=0, add_bos=False, add_eos=False), "max_len"),
    (dict(max_len=16, min_prompt_fraction=1.5), "min_prompt_fraction"),
  ],
)
def test_tokenize_pair_bad_arguments_raise(kwargs, argument):
  with pytest.raises(ValueError, match=argument):
    prefs.tokenize_pair("p", "a", "b", **kwargs)


def test_reader_counts_truncated_pairs(tmp_path):
  lines = [
    json.dumps({"prompt": "P" * 4, "chosen": "a", "rejected": "b"}),
    json.dumps({"prompt": "P" * 40, "chosen": "a", "rejected": "b"}),
    json.dumps({"prompt": "P" * 4, "chosen": "a" * 40, "rejected": "b"}),
    json.dumps({"prompt": "P" * 4, "chosen": "x" * 40 + "a", "rejected": "x" * 40}),
  ]
  examples, stats = prefs.read_preference_files(
    _write_lines(tmp_path / "t.jsonl", lines), max_len=16
  )
  assert [e.truncated for e in examples] == [False, True, True, True]
  assert all(max(len(e.chosen), len(e.rejected)) <= 16 for e in examples)
  assert (stats.truncated_pairs, stats.truncated_prompts, stats.truncated_responses) == (3, 1, 2)
  assert stats.identical_after_truncation == 1  # the last pair differs only past the cut


# ------------------------------------------------------------------------------ splits, arrays


def test_line_split_is_deterministic_seeded_and_whitespace_blind():
  lines = [f'{{"i": {i}}}'.encode() for i in range(2000)]
  a = [prefs.line_split(l, test_fraction=0.2, seed=0) for l in lines]
  assert a == [prefs.line_split(l + b"\r\n", test_fraction=0.2, seed=0) for l in lines]
  b = [prefs.line_split(l, test_fraction=0.2, seed=1) for l in lines]
  assert a != b
  assert 0.17 < a.count("test") / len(a) < 0.23
  assert all(prefs.line_split(l, test_fraction=0.0) == "train" for l in lines[:50])
  with pytest.raises(ValueError, match="test_fraction"):
    prefs.line_split(b"x", test_fraction=1.0)


def test_load_preference_arrays_pads_examples_on_the_right():
  examples, _ = prefs.read_preference_files(SAMPLE, max_len=300)
  arrays, names = prefs.load_preference_arrays(examples)
  assert names == ("hh_rlhf_sample",)
  assert arrays["chosen"].shape == arrays["rejected_mask"].shape == (64, 300)
  assert arrays["chosen"].dtype == np.int32 and arrays["chosen_mask"].dtype == np.bool_
  for i, e in enumerate(examples):
    n = len(e.chosen)
    np.testing.assert_array_equal(arrays["chosen"][i, :n], e.chosen)
    assert arrays["chosen_mask"][i, :n].all() and not arrays["chosen_mask"][i, n:].any()
    assert (arrays["chosen"][i, n:] == tokenizer.PAD_ID).all()
    assert arrays["prompt_len"][i] == e.prompt_len and arrays["line"][i] == e.line
  np.testing.assert_array_equal(arrays["weight"], np.ones(64, np.float32))
  np.testing.assert_array_equal(arrays["subset_id"], np.zeros(64, np.int32))
  with pytest.raises(ValueError, match="max_len"):
    prefs.load_preference_arrays(examples, max_len=100)


def test_example_from_record_decodes_bytes_and_fills_defaults():
  e = prefs.example_from_record(
    {"chosen": [1, 5, 2], "rejected": np.array([1, 6, 2]), "subset": b"helpful"}
  )
  np.testing.assert_array_equal(e.chosen, [1, 5, 2])
  assert e.chosen.dtype == np.int32
  assert (e.prompt_len, e.subset, e.weight, e.source, e.line, e.truncated) == (
    0,
    "helpful",
    1.0,
    "",
    0,
    False,
  )


# ------------------------------------------------------------------------------ TFDS builder


def _assert_same_example(record, expected):
  got = prefs.example_from_record(record)
  np.testing.assert_array_equal(got.chosen, expected.chosen)
  np.testing.assert_array_equal(got.rejected, expected.rejected)
  assert got._replace(chosen=None, rejected=None) == expected._replace(chosen=None, rejected=None)


@pytest.fixture(scope="module")
def built_sample(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  builder = prefs.build_preference_dataset(
    SAMPLE, data_dir=data_dir, max_len=384, name="hh_sample", test_fraction=0.25, split_seed=3
  )
  return builder, data_dir


def test_builder_round_trips_the_sample_through_array_record(built_sample):
  builder, data_dir = built_sample
  expected = {e.line: e for e in prefs.read_preference_files(SAMPLE.resolve(), max_len=384)[0]}
  assert sum(e.truncated for e in expected.values()) > 0  # the rule is exercised
  files = sorted(p.name for p in (data_dir / "preference_pairs" / "hh_sample" / "1.0.0").iterdir())
  assert any(".array_record-" in f for f in files)
  seen = []
  for split in ("train", "test"):
    source = tfds.data_source("preference_pairs/hh_sample", data_dir=str(data_dir), split=split)
    assert len(source) == len(builder.as_data_source(split=split))
    for i in range(len(source)):
      record = source[i]
      _assert_same_example(record, expected[int(record["line"])])
      seen.append(int(record["line"]))
  assert sorted(seen) == list(range(1, 65))  # train and test partition the lines
  # TFDS wrote and read without importing TensorFlow (where TF is not installed, as in CI,
  # the round trip above is itself the proof).
  assert "tensorflow" not in sys.modules


def test_builder_splits_by_line_hash_and_records_counts(built_sample):
  builder, _ = built_sample
  raw = gzip.decompress(SAMPLE.read_bytes()).splitlines()
  expected_test = [
    i + 1
    for i, line in enumerate(raw)
    if prefs.line_split(line, test_fraction=0.25, seed=3) == "test"
  ]
  test_lines = sorted(int(r["line"]) for r in builder.as_data_source(split="test"))
  assert test_lines == expected_test and 0 < len(test_lines) < 64
  meta = builder.info.metadata
  assert meta["settings"]["max_len"] == 384 and meta["settings"]["test_fraction"] == 0.25
  for split in ("train", "test"):
    stats = meta["splits"][split]
    assert stats["records"] == builder.info.splits[split].num_examples
    assert stats["skipped"] == {}
  truncated = sum(meta["splits"][s]["truncated_pairs"] for s in ("train", "test"))
  assert truncated == sum(
    bool(r["truncated"]) for s in ("train", "test") for r in builder.as_data_source(split=s)
  )
  assert meta["files"][str(SAMPLE.resolve())]["bytes"] == SAMPLE.stat().st_size


def test_builder_reuses_identical_build_and_refuses_a_different_one(built_sample):
  _, data_dir = built_sample
  again = prefs.build_preference_dataset(
    SAMPLE, data_dir=data_dir, max_len=384, name="hh_sample", test_fraction=0.25, split_seed=3
  )
  assert again.info.splits["test"].num_examples > 0
  with pytest.raises(ValueError, match="overwrite=True"):
    prefs.build_preference_dataset(
      SAMPLE, data_dir=data_dir, max_len=128, name="hh_sample", test_fraction=0.25, split_seed=3
    )


def test_builder_with_test_files_and_skip_malformed_records_skips_in_metadata(tmp_path):
  train = _write_lines(tmp_path / "train.jsonl", [GOOD, "{oops", GOOD.replace('"a"', '"c"')])
  test = _write_lines(tmp_path / "test.jsonl.gz", [GOOD, '{"chosen": 1, "rejected": "b"}'])
  builder = prefs.build_preference_dataset(
    train,
    test_files=[test],
    data_dir=tmp_path / "dd",
    max_len=32,
    skip_malformed=True,
    name="small",
  )
  assert builder.info.splits["train"].num_examples == 2
  assert builder.info.splits["test"].num_examples == 1
  meta = builder.info.metadata["splits"]
  assert meta["train"]["skipped"] == {"invalid_json": 1}
  assert meta["test"]["skipped"] == {"wrong_type": 1}
  assert meta["test"]["skipped_locations"][0].startswith(f"{os.path.abspath(test)}:2: ")
  # The metadata is stored with the dataset and read back from files alone.
  reread = tfds.builder_from_directory(str(builder.data_path))
  assert reread.info.metadata["splits"]["train"]["skipped"] == {"invalid_json": 1}
  (record,) = reread.as_data_source(split="test")
  assert tokenizer.decode(record["chosen"]) == "pa" and record["subset"] == b"test"


def test_builder_fails_on_malformed_line_by_default(tmp_path):
  train = _write_lines(tmp_path / "train.jsonl", [GOOD, '{"chosen": "a"}'])
  with pytest.raises(prefs.PreferenceDataError, match=r"train.jsonl:2: field 'rejected'"):
    prefs.build_preference_dataset(train, data_dir=tmp_path / "dd", max_len=32)


@pytest.mark.parametrize(
  "kwargs,message",
  [
    (dict(test_fraction=0.2, test_files=["x"]), "not both"),
    (dict(test_fraction=1.0), "test_fraction"),
  ],
)
def test_build_preference_dataset_rejects_bad_split_settings(tmp_path, kwargs, message):
  train = _write_lines(tmp_path / "train.jsonl", [GOOD])
  if "test_files" in kwargs:
    kwargs["test_files"] = [_write_lines(tmp_path / "x.jsonl", [GOOD])]
  with pytest.raises(ValueError, match=message):
    prefs.build_preference_dataset(train, data_dir=tmp_path / "dd", max_len=32, **kwargs)
