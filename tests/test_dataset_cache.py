"""Tests for jaxrm.data.dataset_cache: prepared datasets copied between runs instead of rebuilt."""

import gzip
import json
import logging
import os
import pathlib
import re
import shutil

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxrm.data import dataset_cache, pairs, preference_builder, run_tokenizer
from jaxrm.data import preferences as prefs
from jaxrm.io import compile_cache, program_cache

SAMPLE = pathlib.Path(__file__).parent / "data" / "hh_rlhf_sample.jsonl.gz"
TOKENIZER = pathlib.Path(__file__).parent / "data" / "hf" / "tokenizer"

tfds.disable_progress_bar()


@pytest.fixture
def cache(tmp_path):
  """The dataset cache enabled in ``tmp_path/cache`` for one test (off before and after)."""
  path = tmp_path / "cache"
  dataset_cache.enable(str(path))
  yield path
  dataset_cache.enable(None)


@pytest.fixture
def sample(tmp_path):
  """A copy of the HH sample this test may edit."""
  path = tmp_path / "sample.jsonl.gz"
  shutil.copy(SAMPLE, path)
  return path


class _Builds:
  """Counts the builder's generator calls (one per split of a build, none for a copy)."""

  def __init__(self, monkeypatch):
    self.count = 0
    generate = preference_builder.PreferencePairs._generate_examples

    def counted(builder, *args):
      self.count += 1
      return generate(builder, *args)

    monkeypatch.setattr(preference_builder.PreferencePairs, "_generate_examples", counted)


def _build(path, data_dir, *, cache=True, max_len=64):
  return prefs.build_preference_dataset(
    [path], data_dir=data_dir, max_len=max_len, test_fraction=0.25, cache=cache
  )


def _records(builder):
  out = {}
  for split in ("train", "test"):
    source = builder.as_data_source(split=split)
    out[split] = [source[i] for i in range(len(source))]
  return out


def _assert_same_records(a, b):
  assert a.keys() == b.keys()
  for split in a:
    assert len(a[split]) == len(b[split]) > 0
    for x, y in zip(a[split], b[split]):
      assert x.keys() == y.keys()
      for k in x:
        np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _entries(cache):
  return sorted(os.listdir(cache)) if os.path.isdir(cache) else []


def test_a_second_build_elsewhere_is_copied_from_the_cache_with_the_same_records(
  cache, sample, tmp_path, monkeypatch, caplog
):
  builds = _Builds(monkeypatch)
  first = _build(sample, tmp_path / "a")
  assert builds.count == 2 and len(_entries(cache)) == 1  # train and test generated, stored
  with caplog.at_level(logging.INFO):
    second = _build(sample, tmp_path / "b")
  assert builds.count == 2  # copied, not generated
  assert os.fspath(second.data_path).startswith(os.fspath(tmp_path / "b"))  # its own copy
  assert dict(second.info.metadata) == dict(first.info.metadata)
  _assert_same_records(_records(first), _records(second))
  assert "copied from the dataset cache" in caplog.text
  assert re.search(r"preference_pairs/default train: \d+ records", caplog.text)
  assert len(_entries(cache)) == 1


def test_other_contents_or_settings_build_again_under_another_entry(
  cache, sample, tmp_path, monkeypatch
):
  builds = _Builds(monkeypatch)
  _build(sample, tmp_path / "a")
  _build(sample, tmp_path / "b", max_len=48)  # another setting
  assert builds.count == 4 and len(_entries(cache)) == 2
  with open(sample, "rb") as f:
    lines = gzip.decompress(f.read()).splitlines(keepends=True)
  with open(sample, "wb") as f:  # the same path, other contents: all lines but the last
    f.write(gzip.compress(b"".join(lines[:-1])))
  rebuilt = _build(sample, tmp_path / "c")
  assert builds.count == 6 and len(_entries(cache)) == 3
  assert (
    sum(rebuilt.info.metadata["splits"][s]["records"] for s in ("train", "test")) == len(lines) - 1
  )


def test_nothing_is_stored_or_copied_with_the_cache_off(sample, tmp_path, monkeypatch):
  builds = _Builds(monkeypatch)
  assert dataset_cache.directory() is None
  _build(sample, tmp_path / "a")
  _build(sample, tmp_path / "b")
  assert builds.count == 4
  dataset_cache.enable(str(tmp_path / "cache"))
  try:
    _build(sample, tmp_path / "c", cache=False)  # enabled, but this build does not use it
    assert builds.count == 6 and _entries(tmp_path / "cache") == []
  finally:
    dataset_cache.enable(None)


def test_a_failed_build_stores_nothing(cache, tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"chosen": "a", "rejected": "b"}\n{"chosen": 3}\n')
  with pytest.raises(prefs.PreferenceDataError, match="bad.jsonl"):
    prefs.build_preference_dataset([bad], data_dir=tmp_path / "a", max_len=32)
  with pytest.raises(prefs.PreferenceDataError, match="bad.jsonl"):
    prefs.build_preference_dataset([bad], data_dir=tmp_path / "b", max_len=32, cache=True)
  assert _entries(cache) == []


def test_a_cache_that_cannot_be_written_costs_only_the_build(sample, tmp_path, caplog):
  blocked = tmp_path / "a_file"
  blocked.write_text("not a directory")
  dataset_cache.enable(str(blocked / "cache"))
  try:
    with caplog.at_level(logging.WARNING):
      built = _build(sample, tmp_path / "a")
  finally:
    dataset_cache.enable(None)
  assert sum(built.info.metadata["splits"][s]["records"] for s in ("train", "test")) > 0
  assert "dataset cache: could not store" in caplog.text


@pytest.mark.parametrize("damaged", ["metadata.json", "dataset_info.json"])
def test_a_damaged_entry_costs_only_the_build(
  cache, sample, tmp_path, monkeypatch, caplog, damaged
):
  builds = _Builds(monkeypatch)
  first = _build(sample, tmp_path / "a")
  (entry,) = _entries(cache)
  (cache / entry / damaged).write_text('{"settings": ')  # cut short
  with caplog.at_level(logging.WARNING):
    second = _build(sample, tmp_path / "b")
  assert builds.count == 4 and "is damaged" in caplog.text
  _assert_same_records(_records(first), _records(second))


def test_a_run_in_a_fresh_workdir_loads_the_same_pairs_from_the_cache(
  cache, sample, tmp_path, monkeypatch
):
  builds = _Builds(monkeypatch)
  config = pairs.DataConfig(files=(str(sample),), test_fraction=0.25, max_len=64)
  first = pairs.load_data(config, tmp_path / "run1")
  second = pairs.load_data(config, tmp_path / "run2")
  assert builds.count == 2 and len(_entries(cache)) == 1
  assert second.info["dataset"] == pairs.dataset_dir(tmp_path / "run2")
  assert os.path.isdir(second.info["dataset"])  # the run keeps its own copy
  _assert_same_pairs(first, second)


def _assert_same_pairs(first, second):
  for split in ("train", "test"):
    a, b = getattr(first, split), getattr(second, split)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
      for field in x._fields:
        np.testing.assert_array_equal(getattr(x, field), getattr(y, field), err_msg=field)


def test_a_subword_tokenizer_in_another_workdir_shares_the_entry_and_another_one_does_not(
  cache, sample, tmp_path, monkeypatch
):
  builds = _Builds(monkeypatch)
  config = pairs.DataConfig(files=(str(sample),), test_fraction=0.25, max_len=64)
  tok = run_tokenizer.RunTokenizer.from_source(TOKENIZER)
  first = pairs.load_data(config, tmp_path / "run1", tok=tok)
  second = pairs.load_data(config, tmp_path / "run2", tok=tok)
  assert builds.count == 2 and len(_entries(cache)) == 1
  _assert_same_pairs(first, second)
  assert first.tokenizer == second.tokenizer and first.tokenizer.startswith("hf:")
  # The copy records this run's tokenizer folder, so the run's own check accepts it.
  settings = prefs.PreferencePairs(
    config=prefs.PreferencePairsConfig(name=pairs.DATASET_NAME),
    data_dir=tmp_path / "run2" / "data",
  ).info.metadata["settings"]
  assert settings["tokenizer_dir"] == str(tmp_path / "run2" / "tokenizer")
  pairs.load_data(config, tmp_path / "run2", tok=tok)  # reused as it is
  assert builds.count == 2
  other = tmp_path / "other_tokenizer"
  shutil.copytree(TOKENIZER, other)
  spec = json.loads((other / "tokenizer.json").read_text())
  spec["added_tokens"].append({**spec["added_tokens"][-1], "id": 10**6, "content": "<x>"})
  (other / "tokenizer.json").write_text(json.dumps(spec))
  pairs.load_data(config, tmp_path / "run3", tok=run_tokenizer.RunTokenizer.from_source(other))
  assert builds.count == 4 and len(_entries(cache)) == 2


def test_the_key_follows_every_part():
  parts = {"settings": {"max_len": 64}, "files": {"/a": {"sha256": "0" * 64, "bytes": 3}}}
  assert dataset_cache.key(parts) == dataset_cache.key(dict(parts))
  assert dataset_cache.key(parts) != dataset_cache.key({**parts, "settings": {"max_len": 65}})
  other = {"/a": {"sha256": "1" * 64, "bytes": 3}}
  assert dataset_cache.key(parts) != dataset_cache.key({**parts, "files": other})


def test_the_scripts_cache_keeps_datasets_beside_the_programs(tmp_path):
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  saved = {n: jax.config.values[n] for n in names}
  saved_programs = program_cache._directory
  try:
    compile_cache.enable_compilation_cache(str(tmp_path))
    assert dataset_cache.directory() == os.path.join(str(tmp_path), "datasets")
  finally:
    for n, v in saved.items():
      jax.config.update(n, v)
    program_cache.enable(saved_programs)
    dataset_cache.enable(None)
