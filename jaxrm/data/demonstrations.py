"""Demonstrations for supervised fine-tuning: JSONL files of prompt/response pairs.

One JSON object per line (plain or ``.gz``), in either form:

* a demonstration ``{"prompt": P, "response": R}``: the sequence learned is ``P + R``
  (``R``'s tokens carry the loss); if ``R`` starts with ``"\\n\\nAssistant:"`` that header
  moves into the prompt, as for preference files;
* a preference record (``{"chosen", "rejected"}`` HH-RLHF dialogues or
  ``{"prompt", "chosen", "rejected"}``, :mod:`jaxrm.data.preference_records`): its prompt and
  *chosen* response.

``P`` and ``R`` are strings or chat-message lists (rendered with the HH-RLHF template, as in
preference files). A malformed line raises :class:`PreferenceDataError` naming ``file:line``
and the field; ``line_split`` of the raw line assigns it to the train or test split, as for
preference data.
"""

from __future__ import annotations

from collections.abc import Iterable
import json
import os
from typing import NamedTuple

from jaxrm.data.preference_files import iter_lines
from jaxrm.data.preference_records import (
  ASSISTANT_MARKER,
  PreferenceDataError,
  _text_or_messages,
  line_split,
  parse_preference_record,
)


class Demonstration(NamedTuple):
  """One demonstration: ``prompt`` and ``response`` text, its ``source`` file and 1-based
  ``line``."""

  prompt: str
  response: str
  source: str
  line: int


def parse_demonstration(record: object) -> tuple[str, str]:
  """``(prompt, response)`` of one decoded JSON record (either form; module docstring).

  Raises:
    PreferenceDataError: naming the field (no location; :func:`read_demonstrations` adds it).
  """
  if isinstance(record, dict) and "response" in record:
    prompt = _text_or_messages(record.get("prompt", ""), "prompt", allow_empty=True)
    response = _text_or_messages(record["response"], "response")
    if response.startswith(ASSISTANT_MARKER):
      prompt, response = prompt + ASSISTANT_MARKER, response[len(ASSISTANT_MARKER) :]
    if not response:
      raise PreferenceDataError("is empty", reason="empty_text", field="response")
    return prompt, response
  if isinstance(record, dict) and "chosen" in record and "rejected" not in record:
    raise PreferenceDataError(
      "is missing (a demonstration needs 'response'; a preference record 'chosen' and 'rejected')",
      reason="missing_field",
      field="response",
    )
  text = parse_preference_record(record)
  return text.prompt, text.chosen


def read_demonstrations(
  paths: Iterable[str | os.PathLike], *, test_fraction: float = 0.0, split_seed: int = 0
) -> dict[str, list[Demonstration]]:
  """Reads demonstration (or preference) JSONL files into ``{'train': [...], 'test': [...]}``.

  Args:
    paths: JSONL(.gz) files.
    test_fraction: share of lines held out (by a seeded hash of each raw line).
    split_seed: the hash's seed.

  Raises:
    PreferenceDataError: ``file:line`` and field of the first malformed line; a file that
      is missing or holds no record.
  """
  out: dict[str, list[Demonstration]] = {"train": [], "test": []}
  for path in map(os.fspath, paths):
    if not os.path.isfile(path):
      raise PreferenceDataError("no such file", reason="not_a_file", path=path)
    records = 0
    for line_no, raw in iter_lines(path):
      if not raw.strip():
        continue
      try:
        record = json.loads(raw.decode("utf-8"))
        prompt, response = parse_demonstration(record)
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PreferenceDataError(
          f"invalid JSON: {e}", reason="invalid_json", path=path, line=line_no
        ) from None
      except PreferenceDataError as e:
        raise e.with_location(path, line_no) from None
      split = "train"
      if test_fraction > 0:
        split = line_split(raw, test_fraction=test_fraction, seed=split_seed)
      out[split].append(Demonstration(prompt, response, path, line_no))
      records += 1
    if records == 0:
      raise PreferenceDataError("holds no record", reason="empty_file", path=path)
  return out
