"""Preference pairs from local JSONL files: parsing, byte tokenisation, truncation, TFDS builder.

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
``.jsonl``/``.json``/``.gz``) and ``"weight"`` (finite number >= 0; default 1). Other fields are
ignored.

Tokens: the byte tokenizer (:mod:`jaxrm.data.tokenizer`). Each sequence is
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

The TFDS builder :class:`PreferencePairs` writes array_record files, read back with
``tfds.data_source`` or ``builder.as_data_source()``; neither writing nor reading needs
TensorFlow.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
import dataclasses
import gzip
import hashlib
import inspect
import json
import math
import os
from typing import Any, NamedTuple
import zlib

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

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
_MAX_LOGGED_SKIPS = 20  # per file; the rest are counted and summarised
_MAX_RECORDED_SKIPS = 100  # locations kept in ReadStats / the dataset metadata


class PreferenceDataError(ValueError):
  """A malformed preference record, located by file, line and field.

  Attributes:
    detail: what is wrong.
    reason: one of ``MALFORMED_REASONS`` (or ``'corrupt_file'``).
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


class PreferenceExample(NamedTuple):
  """One tokenised preference pair and where it came from."""

  chosen: np.ndarray  # [len_chosen] int32
  rejected: np.ndarray  # [len_rejected] int32
  prompt_len: int
  subset: str
  weight: float
  source: str  # file path
  line: int  # 1-based line number in source
  truncated: bool


@dataclasses.dataclass
class ReadStats:
  """Counts from reading preference files; ``lines == records + blank_lines + skipped``."""

  lines: int = 0
  records: int = 0
  blank_lines: int = 0
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> count
  skipped_locations: list[str] = dataclasses.field(default_factory=list)  # first 100
  truncated_pairs: int = 0
  truncated_prompts: int = 0
  truncated_responses: int = 0
  identical_after_truncation: int = 0  # kept, but the cut removed every difference

  @property
  def num_skipped(self) -> int:
    return sum(self.skipped.values())

  def record_skip(self, error: PreferenceDataError) -> None:
    """Counts a skipped record under its reason and remembers its location."""
    self.skipped[error.reason] = self.skipped.get(error.reason, 0) + 1
    if len(self.skipped_locations) < _MAX_RECORDED_SKIPS:
      self.skipped_locations.append(str(error))

  def to_dict(self) -> dict[str, Any]:
    """A JSON-serialisable copy."""
    return dataclasses.asdict(self)


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
  if not math.isfinite(weight) or weight < 0:
    raise PreferenceDataError(
      f"must be finite and >= 0, got {weight}", reason="bad_weight", field="weight"
    )
  return PreferenceText(prompt, chosen, rejected, subset, float(weight))


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
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise PreferenceDataError(
      f"invalid JSON: {e.msg} at column {e.colno}", reason="invalid_json"
    ) from None
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
) -> TokenizedPair:
  """Byte-tokenises a pair and truncates it to ``max_len`` by the module's rule.

  Args:
    prompt: shared prompt text.
    chosen: chosen response text.
    rejected: rejected response text.
    max_len: maximum tokens per sequence, BOS and EOS included.
    add_bos: start both sequences with ``BOS_ID``.
    add_eos: end both sequences with ``EOS_ID`` (kept even if the response is cut).
    min_prompt_fraction: the least share of the text budget the prompt keeps (or all of
      it, if shorter) when the pair must be truncated; in ``[0, 1]``.

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
  p, c, r = (tokenizer.encode(t) for t in (prompt, chosen, rejected))
  budget = max_len - num_special
  longest = max(len(c), len(r))
  keep = len(p)
  if len(p) + longest > budget:
    keep = min(len(p), max(budget - longest, int(min_prompt_fraction * budget)))
  room = budget - keep
  head = [tokenizer.BOS_ID] * add_bos + p[len(p) - keep :]
  tail = [tokenizer.EOS_ID] * add_eos
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


def _file_stem(path: str) -> str:
  name = os.path.basename(path)
  for suffix in (".gz", ".jsonl", ".json"):
    name = name[: -len(suffix)] if name.endswith(suffix) else name
  return name


def _iter_lines(path: str) -> Iterator[tuple[int, bytes]]:
  opener = gzip.open if path.endswith(".gz") else open
  line_no = 0
  with opener(path, "rb") as f:
    try:
      for line_no, raw in enumerate(f, start=1):
        if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte-order mark
          raw = raw[3:]
        yield line_no, raw
    except (OSError, EOFError, zlib.error) as e:
      raise PreferenceDataError(
        f"unreadable after line {line_no}: {e}", reason="corrupt_file", path=path
      ) from e


def iter_preference_examples(
  paths: str | os.PathLike | Iterable[str | os.PathLike],
  *,
  max_len: int,
  skip_malformed: bool = False,
  stats: ReadStats | None = None,
  line_filter: Callable[[bytes], bool] | None = None,
  add_bos: bool = True,
  add_eos: bool = True,
  min_prompt_fraction: float = 0.5,
) -> Iterator[PreferenceExample]:
  """Streams tokenised pairs from JSONL files (``.gz`` decompressed), in file order.

  Args:
    paths: one path or several.
    max_len: maximum tokens per sequence (see :func:`tokenize_pair`).
    skip_malformed: skip (count, log) malformed lines instead of raising.
    stats: a :class:`ReadStats` updated in place while iterating.
    line_filter: if given, only raw lines with ``line_filter(line)`` True are read (the
      others are not counted); used to split one file into train and test.
    add_bos, add_eos, min_prompt_fraction: see :func:`tokenize_pair`.

  Yields:
    :class:`PreferenceExample` per record.

  Raises:
    PreferenceDataError: ``file:line`` and field of the first malformed line, unless
      ``skip_malformed``.
  """
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  stats = ReadStats() if stats is None else stats
  for path in map(os.fspath, paths):
    subset = _file_stem(path)
    skipped_here: dict[str, int] = {}
    for line_no, raw in _iter_lines(path):
      if line_filter is not None and not line_filter(raw):
        continue
      stats.lines += 1
      if not raw.strip():
        stats.blank_lines += 1
        continue
      try:
        text = parse_preference_line(raw, default_subset=subset)
      except PreferenceDataError as e:
        error = e.with_location(path, line_no)
        if not skip_malformed:
          raise error from None
        stats.record_skip(error)
        skipped_here[error.reason] = skipped_here.get(error.reason, 0) + 1
        if sum(skipped_here.values()) <= _MAX_LOGGED_SKIPS:
          logging.warning("Skipping malformed preference record: %s", error)
        continue
      pair = tokenize_pair(
        text.prompt,
        text.chosen,
        text.rejected,
        max_len=max_len,
        add_bos=add_bos,
        add_eos=add_eos,
        min_prompt_fraction=min_prompt_fraction,
      )
      truncated = pair.truncated_prompt or pair.truncated_response
      stats.records += 1
      stats.truncated_pairs += truncated
      stats.truncated_prompts += pair.truncated_prompt
      stats.truncated_responses += pair.truncated_response
      stats.identical_after_truncation += bool(np.array_equal(pair.chosen, pair.rejected))
      yield PreferenceExample(
        pair.chosen,
        pair.rejected,
        pair.prompt_len,
        text.subset,
        text.weight,
        path,
        line_no,
        truncated,
      )
    if skipped_here:
      logging.warning(
        "%s: skipped %d malformed lines: %s", path, sum(skipped_here.values()), skipped_here
      )


def read_preference_files(
  paths: str | os.PathLike | Iterable[str | os.PathLike],
  *,
  max_len: int,
  skip_malformed: bool = False,
  **kwargs,
) -> tuple[list[PreferenceExample], ReadStats]:
  """Reads JSONL preference files into memory; see :func:`iter_preference_examples`.

  Returns:
    ``(examples, stats)``.
  """
  stats = ReadStats()
  examples = list(
    iter_preference_examples(
      paths, max_len=max_len, skip_malformed=skip_malformed, stats=stats, **kwargs
    )
  )
  return examples, stats


def _as_str(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def example_from_record(record: Any) -> PreferenceExample:
  """Converts a data-source record (a TFDS dict, bytes for text) to a PreferenceExample.

  Dicts need only ``'chosen'`` and ``'rejected'``; missing fields default to
  ``prompt_len=0, subset='', weight=1, source='', line=0, truncated=False``.
  """
  if isinstance(record, PreferenceExample):
    return record
  return PreferenceExample(
    chosen=np.asarray(record["chosen"], np.int32),
    rejected=np.asarray(record["rejected"], np.int32),
    prompt_len=int(record.get("prompt_len", 0)),
    subset=_as_str(record.get("subset", "")),
    weight=float(record.get("weight", 1.0)),
    source=_as_str(record.get("source", "")),
    line=int(record.get("line", 0)),
    truncated=bool(record.get("truncated", False)),
  )


def get_examples(source: Sequence[Any], indices: Sequence[int]) -> list[PreferenceExample]:
  """Reads ``source[i]`` for each index (one batched read where the source supports it)."""
  indices = [int(i) for i in indices]
  getitems = getattr(source, "__getitems__", None)
  records = getitems(indices) if getitems is not None else [source[i] for i in indices]
  return [example_from_record(r) for r in records]


def load_preference_arrays(
  source: Sequence[Any],
  *,
  max_len: int | None = None,
  chunk_size: int = 1024,
) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
  """Reads a whole random-access source into right-padded numpy arrays.

  Args:
    source: a ``tfds`` data source, a list of :class:`PreferenceExample`, or any sequence of
      record dicts.
    max_len: the padded length; default: the longest sequence in ``source``.
    chunk_size: records per batched read.

  Returns:
    ``(arrays, subset_names)``: ``arrays`` holds ``'chosen'``, ``'rejected'`` ``[n, max_len]``
    int32, ``'chosen_mask'``, ``'rejected_mask'`` ``[n, max_len]`` bool, ``'weight'`` ``[n]``
    float32, ``'prompt_len'``, ``'subset_id'``, ``'line'`` ``[n]`` int32; ``subset_id`` indexes
    the sorted ``subset_names``.
  """
  examples = []
  for start in range(0, len(source), chunk_size):
    examples += get_examples(source, range(start, min(start + chunk_size, len(source))))
  longest = max((max(len(e.chosen), len(e.rejected)) for e in examples), default=1)
  if max_len is None:
    max_len = longest
  elif longest > max_len:
    raise ValueError(f"max_len={max_len} is shorter than the longest sequence ({longest})")
  n = len(examples)
  subset_names = tuple(sorted({e.subset for e in examples}))
  subset_index = {name: i for i, name in enumerate(subset_names)}
  arrays = {
    "chosen": np.zeros((n, max_len), np.int32),
    "chosen_mask": np.zeros((n, max_len), np.bool_),
    "rejected": np.zeros((n, max_len), np.int32),
    "rejected_mask": np.zeros((n, max_len), np.bool_),
    "weight": np.asarray([e.weight for e in examples], np.float32).reshape(n),
    "prompt_len": np.asarray([e.prompt_len for e in examples], np.int32).reshape(n),
    "subset_id": np.asarray([subset_index[e.subset] for e in examples], np.int32).reshape(n),
    "line": np.asarray([e.line for e in examples], np.int32).reshape(n),
  }
  for i, e in enumerate(examples):
    for key, tokens in (("chosen", e.chosen), ("rejected", e.rejected)):
      arrays[key][i, : len(tokens)] = tokens
      arrays[f"{key}_mask"][i, : len(tokens)] = True
  return arrays, subset_names


# ----------------------------------------------------------------------------- TFDS builder


@dataclasses.dataclass(eq=False)
class PreferencePairsConfig(tfds.core.BuilderConfig):
  """Configuration of :class:`PreferencePairs`; ``name`` names the output directory.

  Attributes:
    train_files: JSONL(.gz) files for the train split.
    test_files: JSONL(.gz) files for the test split (exclusive with ``test_fraction``).
    test_fraction: share of ``train_files`` lines sent to test by :func:`line_split`.
    split_seed: seed of that hash split.
    max_len, add_bos, add_eos, min_prompt_fraction: see :func:`tokenize_pair`.
    skip_malformed: skip and count malformed lines instead of failing.
  """

  train_files: tuple[str, ...] = ()
  test_files: tuple[str, ...] = ()
  test_fraction: float = 0.0
  split_seed: int = 0
  max_len: int = 512
  skip_malformed: bool = False
  add_bos: bool = True
  add_eos: bool = True
  min_prompt_fraction: float = 0.5

  def settings(self) -> dict[str, Any]:
    """The data settings as a JSON-serialisable dict (recorded in the metadata)."""
    return {
      f.name: (list(getattr(self, f.name)) if f.name.endswith("_files") else getattr(self, f.name))
      for f in dataclasses.fields(PreferencePairsConfig)
      if f.name not in {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
    }


def _file_fingerprints(paths: Iterable[str]) -> dict[str, dict[str, Any]]:
  out = {}
  for path in paths:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    out[path] = {"bytes": os.path.getsize(path), "sha256": digest.hexdigest()}
  return out


class PreferencePairs(tfds.core.GeneratorBasedBuilder):
  """TFDS builder for tokenised preference pairs from local JSONL files.

  Features per example: ``chosen``, ``rejected`` (``[None]`` int32 tokens), ``prompt_len``
  (int32), ``subset`` (text), ``weight`` (float32), ``source`` (text), ``line`` (int32),
  ``truncated`` (bool). Metadata (``builder.info.metadata``): ``settings`` (the config),
  ``files`` (size and sha256 of each input) and ``splits`` (a :class:`ReadStats` dict per
  split: records, skipped per reason with locations, truncation counts).

  Use :func:`build_preference_dataset`, or directly::

    builder = PreferencePairs(config=PreferencePairsConfig(name="hh", train_files=(...,)),
                              data_dir=workdir, file_format="array_record")
    builder.download_and_prepare()
    train = builder.as_data_source(split="train")
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    """This file. Overridden because TFDS 4.9.x computes it, for builders defined inside a
    package, with ``importlib_resources``, which it declares only for Python < 3.9
    (tensorflow/datasets#11212): without this, ``download_and_prepare`` fails with
    ``ModuleNotFoundError: importlib_resources``."""
    return epath.Path(inspect.getfile(cls))

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="Byte-tokenised preference pairs (jaxrm.data.preferences).",
      features=tfds.features.FeaturesDict(
        {
          "chosen": tfds.features.Tensor(shape=(None,), dtype=np.int32),
          "rejected": tfds.features.Tensor(shape=(None,), dtype=np.int32),
          "prompt_len": tfds.features.Scalar(dtype=np.int32),
          "subset": tfds.features.Text(),
          "weight": tfds.features.Scalar(dtype=np.float32),
          "source": tfds.features.Text(),
          "line": tfds.features.Scalar(dtype=np.int32),
          "truncated": tfds.features.Scalar(dtype=np.bool_),
        }
      ),
      metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # local files only
    config = self.builder_config
    _validate_config(config)
    self.info.metadata["settings"] = config.settings()
    self.info.metadata["files"] = _file_fingerprints(config.train_files + config.test_files)
    self.info.metadata["splits"] = {}
    if config.test_files:
      return {
        "train": self._generate_examples(config.train_files, "train", None),
        "test": self._generate_examples(config.test_files, "test", None),
      }
    if config.test_fraction > 0:

      def in_split(split):
        return lambda line: (
          line_split(line, test_fraction=config.test_fraction, seed=config.split_seed) == split
        )

      return {
        "train": self._generate_examples(config.train_files, "train", in_split("train")),
        "test": self._generate_examples(config.train_files, "test", in_split("test")),
      }
    return {"train": self._generate_examples(config.train_files, "train", None)}

  def _generate_examples(self, files, split, line_filter):
    config = self.builder_config
    file_index = {path: i for i, path in enumerate(files)}
    stats = ReadStats()
    for e in iter_preference_examples(
      files,
      max_len=config.max_len,
      skip_malformed=config.skip_malformed,
      stats=stats,
      line_filter=line_filter,
      add_bos=config.add_bos,
      add_eos=config.add_eos,
      min_prompt_fraction=config.min_prompt_fraction,
    ):
      yield (
        f"{file_index[e.source]}:{e.line}",
        {
          "chosen": e.chosen,
          "rejected": e.rejected,
          "prompt_len": e.prompt_len,
          "subset": e.subset,
          "weight": e.weight,
          "source": e.source,
          "line": e.line,
          "truncated": e.truncated,
        },
      )
    self.info.metadata["splits"][split] = stats.to_dict()
    logging.info(
      "preference_pairs/%s %s: %d records, %d skipped %s, %d truncated",
      config.name,
      split,
      stats.records,
      stats.num_skipped,
      stats.skipped,
      stats.truncated_pairs,
    )


def _validate_config(config: PreferencePairsConfig) -> None:
  if not config.train_files:
    raise ValueError("train_files must name at least one file")
  files = list(config.train_files) + list(config.test_files)
  if len(set(files)) != len(files):
    raise ValueError(f"train_files and test_files must not repeat a file, got {files}")
  if config.test_files and config.test_fraction:
    raise ValueError("give test_files or test_fraction, not both")
  if not 0.0 <= config.test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in [0, 1), got {config.test_fraction}")
  for path in files:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"preference file not found: {path}")


def build_preference_dataset(
  train_files: str | os.PathLike | Sequence[str | os.PathLike],
  *,
  data_dir: str | os.PathLike,
  max_len: int,
  name: str = "default",
  test_files: Sequence[str | os.PathLike] = (),
  test_fraction: float = 0.0,
  split_seed: int = 0,
  skip_malformed: bool = False,
  add_bos: bool = True,
  add_eos: bool = True,
  min_prompt_fraction: float = 0.5,
  overwrite: bool = False,
) -> PreferencePairs:
  """Builds (or reuses) array_record files under ``data_dir/preference_pairs/name/1.0.0``.

  An existing dataset is reused only if it was built with the same settings from files with
  the same contents (sha256); otherwise this raises, or rebuilds if ``overwrite``.

  Args:
    train_files: JSONL(.gz) file(s) for the train split.
    data_dir: the TFDS data directory (e.g. the run's workdir).
    max_len: maximum tokens per sequence.
    name: the config name (a sub-directory).
    test_files, test_fraction, split_seed, skip_malformed, add_bos, add_eos,
      min_prompt_fraction: see :class:`PreferencePairsConfig`.
    overwrite: rebuild a dataset of this name that was built differently.

  Returns:
    The prepared builder; ``builder.as_data_source(split=...)`` gives random-access splits
    and ``builder.info.metadata`` the counts. ``tfds.data_source(f"preference_pairs/{name}",
    data_dir=data_dir, split=...)`` reads the same files.
  """
  if isinstance(train_files, (str, os.PathLike)):
    train_files = [train_files]
  config = PreferencePairsConfig(
    name=name,
    train_files=tuple(os.path.abspath(os.fspath(p)) for p in train_files),
    test_files=tuple(os.path.abspath(os.fspath(p)) for p in test_files),
    test_fraction=float(test_fraction),
    split_seed=int(split_seed),
    max_len=int(max_len),
    skip_malformed=bool(skip_malformed),
    add_bos=bool(add_bos),
    add_eos=bool(add_eos),
    min_prompt_fraction=float(min_prompt_fraction),
  )
  _validate_config(config)
  builder = PreferencePairs(config=config, data_dir=os.fspath(data_dir), file_format="array_record")
  mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
  if builder.is_prepared():
    stored = dict(builder.info.metadata)
    current = {
      "settings": config.settings(),
      "files": _file_fingerprints(config.train_files + config.test_files),
    }
    if any(stored.get(k) != v for k, v in current.items()):
      if not overwrite:
        raise ValueError(
          f"{builder.data_path} was built from other files or settings; pass "
          f"overwrite=True to rebuild it or choose another name"
        )
      mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
  return builder
