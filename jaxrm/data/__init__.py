"""Data layer: tokenizers, the synthetic world, preference JSONL files, their TFDS builder and
resumable batch iterators.

``jaxrm.data.tokenizer`` and ``jaxrm.data.synthetic`` are light; the names below are imported
from their modules on first use, so importing ``jaxrm.data.synthetic`` (or parsing records with
``jaxrm.data.parse_preference_line``) does not import TensorFlow Datasets; only the builder
(``jaxrm.data.preference_builder``) does.
"""

import importlib

_MODULES = (
  "demonstrations",
  "iterator",
  "packing",
  "preference_builder",
  "preference_files",
  "preference_records",
  "preferences",
  "run_tokenizer",
  "synthetic",
  "tokenizer",
)
_LAZY = {
  "BatchIterator": "iterator",
  "power_of_two_buckets": "iterator",
  "build_preference_dataset": "preference_builder",
  "example_from_record": "preference_files",
  "get_examples": "preference_files",
  "iter_preference_examples": "preference_files",
  "line_split": "preference_records",
  "pack_pairs": "packing",
  "load_preference_arrays": "preference_files",
  "parse_preference_line": "preference_records",
  "parse_preference_record": "preference_records",
  "PreferenceDataError": "preference_records",
  "PreferenceExample": "preference_files",
  "PreferencePairs": "preference_builder",
  "PreferencePairsConfig": "preference_builder",
  "PreferenceText": "preference_records",
  "read_preference_files": "preference_files",
  "ReadStats": "preference_files",
  "read_demonstrations": "demonstrations",
  "render_messages": "preference_records",
  "RunTokenizer": "run_tokenizer",
  "split_shared_prompt": "preference_records",
  "tokenize_pair": "preference_records",
  "TokenizedPair": "preference_records",
}


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(f"jaxrm.data.{_LAZY[name]}"), name)
  if name in _MODULES:
    return importlib.import_module(f"jaxrm.data.{name}")
  raise AttributeError(f"module 'jaxrm.data' has no attribute {name!r}")


def __dir__():
  return sorted(list(_LAZY) + list(_MODULES))
