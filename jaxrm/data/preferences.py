"""Preference pairs from local JSONL files: one namespace for the three modules that read them.

* :mod:`jaxrm.data.preference_records`: the file format, parsing of one line or record,
  chat-message rendering, byte tokenisation and truncation, the train/test line split;
* :mod:`jaxrm.data.preference_files`: reading whole files (``.gz`` too) into tokenised
  examples with file, line and counts, and loading random-access sources into arrays;
* :mod:`jaxrm.data.preference_builder`: the TFDS builder (array_record) and
  :func:`build_preference_dataset`.

Every name is re-exported here, so ``jaxrm.data.preferences.parse_preference_line`` and
``jaxrm.data.parse_preference_line`` keep working.
"""

from jaxrm.data.preference_builder import (
  PreferencePairs,
  PreferencePairsConfig,
  build_preference_dataset,
)
from jaxrm.data.preference_files import (
  PreferenceExample,
  ReadStats,
  example_from_record,
  get_examples,
  iter_preference_examples,
  load_preference_arrays,
  read_preference_files,
)
from jaxrm.data.preference_records import (
  ASSISTANT_MARKER,
  MALFORMED_REASONS,
  ROLE_NAMES,
  PreferenceDataError,
  PreferenceText,
  TokenizedPair,
  line_split,
  parse_preference_line,
  parse_preference_record,
  render_messages,
  split_shared_prompt,
  tokenize_pair,
)

__all__ = [
  "ASSISTANT_MARKER",
  "MALFORMED_REASONS",
  "ROLE_NAMES",
  "PreferenceDataError",
  "PreferenceExample",
  "PreferencePairs",
  "PreferencePairsConfig",
  "PreferenceText",
  "ReadStats",
  "TokenizedPair",
  "build_preference_dataset",
  "example_from_record",
  "get_examples",
  "iter_preference_examples",
  "line_split",
  "load_preference_arrays",
  "parse_preference_line",
  "parse_preference_record",
  "read_preference_files",
  "render_messages",
  "split_shared_prompt",
  "tokenize_pair",
]
