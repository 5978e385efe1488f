"""Preference records: parsing JSONL lines, rendering chat messages, byte tokenisation, truncation.

File format: one JSON object per line, plain or gzipped (a ``.gz`` suffix), in one of two forms.

* **HH-RLHF** ``{"chosen": C, "rejected": R}``: two whole dialogues that share their opening
  turns. The prompt is their longest common prefix, cut back to just after the last
  ``"\\n\\nAssistant:"`` inside it (so the responses start with the text after that turn
  header, usually ``" ..."``); if the common prefix holds no such header the prompt is empty.
* **Prompt/response** ``{"prompt": P, "chosen": C, "rejected": R}``: ``P`` is the prompt and
  ``C``, ``R`` the two responses. The sequence scored is ``P + C`` (resp. ``P + R``),
  concatenated verbatim, so the prompt is exactly ``P``. If both responses begin with
  ``"\\n\\nAssistant:"`` (as rendered chat lists do) that header is moved into the prompt, so a
  conversation gives the same tokens and prompt length in both forms.

Each of ``P``, ``C``, ``R`` (and the HH fields) is a string or a list of chat messages
``{"role": ..., "content": ...}``, rendered by :func:`render_messages` as
``"\\n\\n{Name}: {content}"`` per message with ``Name`` = ``Human`` (roles ``user``, ``human``),
``Assistant`` (``assistant``) or ``System`` (``system``); the HH-RLHF template.

Optional fields: ``"subset"`` (string, for per-subset accuracy; default: the file name without
``.jsonl``/``.json``/``.gz``) and ``"weight"`` (a number in ``[0, MAX_WEIGHT]``, the float32
range; default 1). Other fields are ignored.

Tokens: the byte tokenizer (:mod:`jaxrm.data.tokenizer`) or a run's subword tokenizer
(:mod:`jaxrm.data.run_tokenizer`; the ``tok`` argument). Each sequence is
``[BOS] + prompt + response + [EOS]`` (both on by default: BOS gives every sequence a
common first position, EOS a common read-out token for the reward head). The shared-prefix
length ``prompt_len`` counts BOS and the prompt bytes.

Truncation to ``max_len`` tokens (per sequence, specials included), when the prompt plus the
longer response does not fit: the prompt is cut from the left (its end, next to the response,
is kept) but keeps at least ``min(len(prompt), floor(min_prompt_fraction * budget))`` bytes,
where ``budget = max_len - #specials``; then both responses are cut from the right to the
space left. BOS and EOS are always kept. Truncated pairs are counted (:class:`ReadStats`).

Malformed lines (invalid JSON, not an object, missing field, wrong type, empty text, invalid
UTF-8 — raw bytes or lone-surrogate escapes —, unknown role, bad weight, chosen identical to
rejected) raise :class:`PreferenceDataError` naming ``file:line`` and the field. With
``skip_malformed=True`` they are skipped, counted per reason in :class:`ReadStats`, logged
with absl.logging and, in the TFDS builder, written to the dataset metadata. Blank lines are
not records; they are counted as ``blank_lines``.

Reading whole files is :mod:`jaxrm.data.preference_files`; the TFDS builder is
:mod:`jaxrm.data.preference_builder`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any, NamedTuple

import numpy as np

from jaxrm.data import tokenizer

ASSISTANT_MARKER = "\n\nAssistant:"
ROLE_NAMES = {"user": "Human", "human": "Human", "assistant": "Assistant", "system": "System"}
MALFORMED_REASONS = (
  "invalid_json",
  "not_an_object",
  "missing_field",
  "wrong_type",
  "empty_text",
  "invalid_utf8",
  "bad_role",
  "bad_weight",
  "identical_pair",
)
# File- and split-level problems: skipping lines cannot fix them, so skip_malformed never does.
FILE_REASONS = ("not_a_file", "empty_file", "corrupt_file", "too_few_pairs", "degenerate_split")
MAX_WEIGHT = float(np.finfo(np.float32).max)  # weights are stored as float32
_MAX_INT_DIGITS = 300  # longer JSON integers are read as floats (inf past ~308 digits)


class PreferenceDataError(ValueError):
  """A malformed preference record or data file, located by file, line and field.

  Attributes:
    detail: what is wrong.
    reason: one of ``MALFORMED_REASONS`` (a record; ``skip_malformed`` can skip it) or
      ``FILE_REASONS`` (a file or split; skipping lines cannot help).
    field: the offending field (``'chosen'``, ``'prompt[1].content'``, ...), or None for
      line-level errors (invalid JSON, not an object).
    path: the file, or None when parsing a record outside any file.
    line: the 1-based line number, or None.
  """

  def __init__(
    self,
    detail: str,
    *,
    reason: str,
    field: str | None = None,
    path: str | None = None,
    line: int | None = None,
  ):
    self.detail, self.reason, self.field, self.path, self.line = (detail, reason, field, path, line)
    location = "" if path is None else (f"{path}: " if line is None else f"{path}:{line}: ")
    where = f"field {field!r}: " if field else ""
    super().__init__(f"{location}{where}{detail} [{reason}]")

  @property
  def skippable(self) -> bool:
    """True for a malformed record that ``skip_malformed`` would skip."""
    return self.reason in MALFORMED_REASONS

  def with_location(self, path: str, line: int | None) -> PreferenceDataError:
    """Returns the same error located at ``path:line``."""
    return PreferenceDataError(
      self.detail, reason=self.reason, field=self.field, path=path, line=line
    )


class PreferenceText(NamedTuple):
  """A parsed record as text: the shared prompt and the two responses."""

  prompt: str
  chosen: str  # response only; the scored sequence is prompt + chosen
  rejected: str
  subset: str
  weight: float


class TokenizedPair(NamedTuple):
  """Output of :func:`tokenize_pair`."""

  chosen: np.ndarray  # [len_chosen] int32: [BOS] + prompt + chosen response + [EOS]
  rejected: np.ndarray  # [len_rejected] int32
  prompt_len: int  # tokens shared by both sequences (BOS + kept prompt bytes)
  truncated_prompt: bool
  truncated_response: bool


def _type_name(value: Any) -> str:
  return "null" if value is None else type(value).__name__


def _check_text(value: Any, field: str, *, allow_empty: bool = False) -> str:
  if not isinstance(value, str):
    raise PreferenceDataError(
      f"expected a string, got {_type_name(value)}", reason="wrong_type", field=field
    )
  if not allow_empty and not value.strip():
    raise PreferenceDataError("is empty", reason="empty_text", field=field)
  try:
    value.encode("utf-8")
  except UnicodeEncodeError as e:
    raise PreferenceDataError(
      f"is not valid UTF-8 (undecodable byte or lone surrogate at character {e.start})",
      reason="invalid_utf8",
      field=field,
    ) from None
  return value


def render_messages(messages: Any, *, field: str = "messages") -> str:
  """Renders a chat-message list as ``"\\n\\n{Name}: {content}"`` per message.

  Args:
    messages: a non-empty list of ``{"role": str, "content": str}`` dicts; role is one of
      ``ROLE_NAMES`` (case-insensitive).
    field: the name used in error messages (``'chosen'`` gives ``'chosen[2].role'``).

  Returns:
    The rendered text, e.g. ``"\\n\\nHuman: hi\\n\\nAssistant: hello"``.

  Raises:
    PreferenceDataError: naming the offending message field.
  """
  if not isinstance(messages, list):
    raise PreferenceDataError(
      f"expected a list of messages, got {_type_name(messages)}", reason="wrong_type", field=field
    )
  if not messages:
    raise PreferenceDataError("is an empty message list", reason="empty_text", field=field)
  parts = []
  for i, message in enumerate(messages):
    name = f"{field}[{i}]"
    if not isinstance(message, dict):
      raise PreferenceDataError(
        f"expected a {{role, content}} object, got {_type_name(message)}",
        reason="wrong_type",
        field=name,
      )
    for key in ("role", "content"):
      if key not in message:
        raise PreferenceDataError("is missing", reason="missing_field", field=f"{name}.{key}")
    role = message["role"]
    if not isinstance(role, str):
      raise PreferenceDataError(
        f"expected a string, got {_type_name(role)}", reason="wrong_type", field=f"{name}.role"
      )
    if role.lower() not in ROLE_NAMES:
      raise PreferenceDataError(
        f"unknown role {role!r}; expected one of {sorted(ROLE_NAMES)}",
        reason="bad_role",
        field=f"{name}.role",
      )
    content = _check_text(message["content"], f"{name}.content")
    parts.append(f"\n\n{ROLE_NAMES[role.lower()]}: {content}")
  return "".join(parts)


def _text_or_messages(value: Any, field: str, *, allow_empty: bool = False) -> str:
  if isinstance(value, list):
    return render_messages(value, field=field)
  if not isinstance(value, str):
    raise PreferenceDataError(
      f"expected a string or a list of messages, got {_type_name(value)}",
      reason="wrong_type",
      field=field,
    )
  return _check_text(value, field, allow_empty=allow_empty)


def split_shared_prompt(
  chosen: str, rejected: str, *, marker: str = ASSISTANT_MARKER
) -> tuple[str, str, str]:
  """Splits two whole dialogues into their shared prompt and the two responses.

  The prompt is the longest common prefix of ``chosen`` and ``rejected``, cut back to just
  after the last ``marker`` lying entirely inside it; empty if there is none.

  Args:
    chosen: the preferred dialogue.
    rejected: the other dialogue.
    marker: the turn header that ends a prompt.

  Returns:
    ``(prompt, chosen_response, rejected_response)`` with ``prompt + chosen_response ==
    chosen`` and ``prompt + rejected_response == rejected``.
  """
  common = len(os.path.commonprefix([chosen, rejected]))
  cut = chosen.rfind(marker, 0, common)
  end = cut + len(marker) if cut >= 0 else 0
  return chosen[:end], chosen[end:], rejected[end:]


def parse_preference_record(record: Any, *, default_subset: str = "") -> PreferenceText:
  """Validates one decoded JSON record and splits it into prompt and responses.

  Args:
    record: the decoded JSON value of one line (either form, see the module docstring).
    default_subset: the subset when the record has no ``"subset"`` field.

  Returns:
    A :class:`PreferenceText`.

  Raises:
    PreferenceDataError: naming the field (no file or line; the readers add them).
  """
  if not isinstance(record, dict):
    raise PreferenceDataError(
      f"expected a JSON object, got {_type_name(record)}", reason="not_an_object"
    )
  for key in ("chosen", "rejected"):
    if key not in record:
      raise PreferenceDataError("is missing", reason="missing_field", field=key)
  chosen = _text_or_messages(record["chosen"], "chosen")
  rejected = _text_or_messages(record["rejected"], "rejected")
  if "prompt" in record:
    prompt = _text_or_messages(record["prompt"], "prompt", allow_empty=True)
    if chosen.startswith(ASSISTANT_MARKER) and rejected.startswith(ASSISTANT_MARKER):
      prompt += ASSISTANT_MARKER
      chosen, rejected = chosen[len(ASSISTANT_MARKER) :], rejected[len(ASSISTANT_MARKER) :]
  else:
    prompt, chosen, rejected = split_shared_prompt(chosen, rejected)
  if chosen == rejected:
    raise PreferenceDataError("is identical to 'chosen'", reason="identical_pair", field="rejected")
  subset = _check_text(record.get("subset", default_subset), "subset", allow_empty=True)
  weight = record.get("weight", 1.0)
  if isinstance(weight, bool) or not isinstance(weight, (int, float)):
    raise PreferenceDataError(
      f"expected a number, got {_type_name(weight)}", reason="wrong_type", field="weight"
    )
  try:
    value = float(weight)
  except OverflowError:  # an integer too large for a float
    value = math.inf
  if not (math.isfinite(value) and 0 <= value <= MAX_WEIGHT):
    shown = f"{value:.6g}" if math.isfinite(value) else str(value)
    raise PreferenceDataError(
      f"must be a finite number >= 0 and at most {MAX_WEIGHT:.4g} (float32), got {shown}",
      reason="bad_weight",
      field="weight",
    )
  return PreferenceText(prompt, chosen, rejected, subset, value)


def _parse_int(digits: str) -> int | float:
  """JSON integers; absurdly long ones as floats (Python refuses > 4300 digits as int)."""
  return int(digits) if len(digits) <= _MAX_INT_DIGITS else float(digits)


def parse_preference_line(line: bytes | str, *, default_subset: str = "") -> PreferenceText:
  """Parses one JSONL line (bytes are decoded as UTF-8; invalid bytes name their field).

  Raises:
    PreferenceDataError: naming the field (the readers add file and line).
  """
  if isinstance(line, bytes):
    # surrogateescape keeps invalid bytes as lone surrogates, so that the field holding them
    # is found and named by the UTF-8 check in _check_text.
    line = line.decode("utf-8", errors="surrogateescape")
  try:
    record = json.loads(line, parse_int=_parse_int)
  except json.JSONDecodeError as e:
    raise PreferenceDataError(
      f"invalid JSON: {e.msg} at column {e.colno}", reason="invalid_json"
    ) from None
  except RecursionError:
    raise PreferenceDataError(
      "invalid JSON: nested too deeply to read", reason="invalid_json"
    ) from None
  except ValueError as e:  # e.g. a number the decoder cannot convert
    raise PreferenceDataError(f"invalid JSON: {e}", reason="invalid_json") from None
  return parse_preference_record(record, default_subset=default_subset)


def tokenize_pair(
  prompt: str,
  chosen: str,
  rejected: str,
  *,
  max_len: int,
  add_bos: bool = True,
  add_eos: bool = True,
  min_prompt_fraction: float = 0.5,
  tok: Any = None,
) -> TokenizedPair:
  """Tokenises a pair and truncates it to ``max_len`` by the module's rule.

  Args:
    prompt: shared prompt text.
    chosen: chosen response text.
    rejected: rejected response text.
    max_len: maximum tokens per sequence, BOS and EOS included.
    add_bos: start both sequences with ``BOS_ID``.
    add_eos: end both sequences with ``EOS_ID`` (kept even if the response is cut).
    min_prompt_fraction: the least share of the text budget the prompt keeps (or all of
      it, if shorter) when the pair must be truncated; in ``[0, 1]``.
    tok: the tokenizer (any object with ``encode``, ``bos_id``, ``eos_id``, e.g.
      :class:`jaxrm.data.hf_tokenizer.HFTokenizer`); None: the byte tokenizer. Prompt and
      responses are encoded separately and concatenated.

  Returns:
    A :class:`TokenizedPair`; both sequences start with the same ``prompt_len`` tokens.
  """
  num_special = int(add_bos) + int(add_eos)
  if not isinstance(max_len, (int, np.integer)) or max_len <= num_special:
    raise ValueError(
      f"max_len must be an int > {num_special} (the special tokens), got {max_len!r}"
    )
  if not 0.0 <= min_prompt_fraction <= 1.0:
    raise ValueError(f"min_prompt_fraction must be in [0, 1], got {min_prompt_fraction}")
  tok = tokenizer.ByteTokenizer() if tok is None else tok
  p, c, r = (tok.encode(t) for t in (prompt, chosen, rejected))
  budget = max_len - num_special
  longest = max(len(c), len(r))
  keep = len(p)
  if len(p) + longest > budget:
    keep = min(len(p), max(budget - longest, int(min_prompt_fraction * budget)))
  room = budget - keep
  head = [tok.bos_id] * add_bos + p[len(p) - keep :]
  tail = [tok.eos_id] * add_eos
  return TokenizedPair(
    chosen=np.asarray(head + c[:room] + tail, np.int32),
    rejected=np.asarray(head + r[:room] + tail, np.int32),
    prompt_len=len(head),
    truncated_prompt=keep < len(p),
    truncated_response=longest > room,
  )


def line_split(line: bytes, *, test_fraction: float, seed: int = 0) -> str:
  """Assigns a raw JSONL line to ``'train'`` or ``'test'`` by a seeded hash of its content.

  Deterministic, independent of file order, and duplicate lines share a split. Surrounding
  whitespace (e.g. ``\\r\\n``) is ignored.
  """
  if not 0.0 <= test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
  digest = hashlib.blake2b(
    int(seed).to_bytes(8, "little", signed=True) + line.strip(), digest_size=8
  ).digest()
  return "test" if int.from_bytes(digest, "little") / 2.0**64 < test_fraction else "train"
