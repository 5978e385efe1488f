"""Data layer: tokenizers, the synthetic world, preference JSONL files, their TFDS builder and
resumable batch iterators.

``jaxrm.data.tokenizer`` and ``jaxrm.data.synthetic`` are light; the TFDS-backed names below
(builder, iterator) are imported on first use, so importing ``jaxrm.data.synthetic`` does not
import TensorFlow Datasets.
"""

import importlib

_LAZY = {
  "BatchIterator": "iterator",
  "power_of_two_buckets": "iterator",
  "build_preference_dataset": "preferences",
  "example_from_record": "preferences",
  "get_examples": "preferences",
  "iter_preference_examples": "preferences",
  "line_split": "preferences",
  "load_preference_arrays": "preferences",
  "parse_preference_line": "preferences",
  "parse_preference_record": "preferences",
  "PreferenceDataError": "preferences",
  "PreferenceExample": "preferences",
  "PreferencePairs": "preferences",
  "PreferencePairsConfig": "preferences",
  "PreferenceText": "preferences",
  "read_preference_files": "preferences",
  "ReadStats": "preferences",
  "render_messages": "preferences",
  "split_shared_prompt": "preferences",
  "tokenize_pair": "preferences",
  "TokenizedPair": "preferences",
}


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(f"jaxrm.data.{_LAZY[name]}"), name)
  if name in ("iterator", "preferences", "synthetic", "tokenizer"):
    return importlib.import_module(f"jaxrm.data.{name}")
  raise AttributeError(f"module 'jaxrm.data' has no attribute {name!r}")


def __dir__():
  return sorted(list(_LAZY) + ["iterator", "preferences", "synthetic", "tokenizer"])
