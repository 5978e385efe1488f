"""Reading preference JSONL(.gz) files: tokenised examples with their file, line and counts.

:func:`iter_preference_examples` streams :class:`PreferenceExample` records from files in the
format of :mod:`jaxrm.data.preference_records`, counting lines, blank lines, skipped malformed
records and truncations in a :class:`ReadStats`. :func:`load_preference_arrays` reads any
random-access source (a TFDS data source, a list of examples) into right-padded arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
import dataclasses
import gzip
import os
import stat
from typing import Any, NamedTuple
import zlib

from absl import logging
import numpy as np

from jaxrm.data.preference_records import (
  PreferenceDataError,
  parse_preference_line,
  tokenize_pair,
)

_MAX_LOGGED_SKIPS = 20  # per file; the rest are counted and summarised
_MAX_RECORDED_SKIPS = 100  # locations kept in ReadStats / the dataset metadata


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


def _file_stem(path: str) -> str:
  name = os.path.basename(path)
  for suffix in (".gz", ".jsonl", ".json"):
    name = name[: -len(suffix)] if name.endswith(suffix) else name
  return name


def check_data_file(path: str | os.PathLike) -> str:
  """Returns ``path`` as a string if it names a readable regular file.

  Raises:
    FileNotFoundError: nothing exists at ``path``.
    PreferenceDataError: ``path`` is a directory, a FIFO, a device (``/dev/null``), a socket
      or unreadable (reason ``'not_a_file'``).
  """
  path = os.fspath(path)
  try:
    mode = os.stat(path).st_mode
  except FileNotFoundError:
    raise FileNotFoundError(f"preference file not found: {path}") from None
  except OSError as e:
    raise PreferenceDataError(
      f"cannot be read: {e.strerror or e}", reason="not_a_file", path=path
    ) from None
  if not stat.S_ISREG(mode):
    kind = next(
      (name for test, name in _FILE_KINDS if test(mode)), f"not a regular file (mode {mode:o})"
    )
    raise PreferenceDataError(
      f"is {kind}, not a JSONL(.gz) data file", reason="not_a_file", path=path
    )
  if not os.access(path, os.R_OK):
    raise PreferenceDataError("is not readable (permission denied)", reason="not_a_file", path=path)
  return path


_FILE_KINDS = (
  (stat.S_ISDIR, "a directory"),
  (stat.S_ISFIFO, "a FIFO (named pipe)"),
  (stat.S_ISCHR, "a character device"),
  (stat.S_ISBLK, "a block device"),
  (stat.S_ISSOCK, "a socket"),
)


def iter_lines(path: str) -> Iterator[tuple[int, bytes]]:
  """``(line number, raw line)`` of a JSONL(.gz) file (a leading UTF-8 byte-order mark
  dropped).

  Raises:
    FileNotFoundError, PreferenceDataError: as :func:`check_data_file`; a ``.gz`` file that is
      not gzip data, is truncated or corrupt (reason ``'corrupt_file'``, naming the last line
      read).
  """
  check_data_file(path)
  gzipped = path.endswith(".gz")
  opener = gzip.open if gzipped else open
  line_no = 0
  with opener(path, "rb") as f:
    try:
      for line_no, raw in enumerate(f, start=1):
        if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte-order mark
          raw = raw[3:]
        yield line_no, raw
    except gzip.BadGzipFile as e:
      raise PreferenceDataError(
        f"is not gzip data ({e}); a .gz name must hold a gzip file: decompress or rename it",
        reason="corrupt_file",
        path=path,
      ) from None
    except EOFError:
      raise PreferenceDataError(
        f"the gzip data is truncated (it ends after line {line_no}); the file is incomplete",
        reason="corrupt_file",
        path=path,
      ) from None
    except (OSError, zlib.error) as e:
      what = "corrupt gzip data" if gzipped else "a read error"
      raise PreferenceDataError(
        f"{what} after line {line_no}: {e}", reason="corrupt_file", path=path
      ) from None


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
  tok: Any = None,
) -> Iterator[PreferenceExample]:
  """Streams tokenised pairs from JSONL files (``.gz`` decompressed), in file order.

  Args:
    paths: one path or several.
    max_len: maximum tokens per sequence (see :func:`tokenize_pair`).
    skip_malformed: skip (count, log) malformed lines instead of raising.
    stats: a :class:`ReadStats` updated in place while iterating.
    line_filter: if given, only raw lines with ``line_filter(line)`` True are read (the
      others are not counted); used to split one file into train and test.
    add_bos, add_eos, min_prompt_fraction, tok: see :func:`tokenize_pair`.

  Yields:
    :class:`PreferenceExample` per record.

  Raises:
    PreferenceDataError: ``file:line`` and field of the first malformed line, unless
      ``skip_malformed``; whatever ``skip_malformed``, a file that is not a regular file, is
      corrupt or truncated (``.gz``), or holds no non-blank line, naming the file.
    FileNotFoundError: a path does not exist.
  """
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  stats = ReadStats() if stats is None else stats
  for path in map(os.fspath, paths):
    subset = _file_stem(path)
    skipped_here: dict[str, int] = {}
    lines = blank = 0  # in the whole file, before line_filter
    for line_no, raw in iter_lines(path):
      lines, blank = line_no, blank + (not raw.strip())
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
        tok=tok,
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
    if lines == blank:
      what = "is empty" if lines == 0 else f"holds only {lines} blank line(s)"
      if lines == 0 and path.endswith(".gz"):
        what = "decompresses to nothing"
      raise PreferenceDataError(f"{what}: no preference records", reason="empty_file", path=path)
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
