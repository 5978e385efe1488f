"""TFDS builder of tokenised preference pairs from local JSONL files (array_record output).

:class:`PreferencePairs` writes array_record files, read back with ``tfds.data_source`` or
``builder.as_data_source()``; neither writing nor reading needs TensorFlow.
:func:`build_preference_dataset` builds (or reuses) one under a data directory.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
import dataclasses
import gzip
import hashlib
import inspect
import json
import math
import os
import shutil
from typing import Any

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from jaxrm.data import dataset_cache
from jaxrm.data.preference_files import ReadStats, check_data_file, iter_preference_examples
from jaxrm.data.preference_records import PreferenceDataError, line_split
from jaxrm.io.files import atomic_write


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
    tokenizer_dir: a folder with ``tokenizer.json`` (:mod:`jaxrm.data.hf_tokenizer`), or
      empty for the byte tokenizer; its ``tokenizer.json`` is fingerprinted with the data
      files, so a dataset is never reused with another tokenizer.
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
  tokenizer_dir: str = ""

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


class _LocalDatasetInfo(tfds.core.DatasetInfo):
  """``DatasetInfo`` of a dataset built from local files only.

  TFDS looks a dataset without prepared files up on its public bucket
  (``initialize_from_bucket``); TFDS 4.9 makes a temporary directory for that first and never
  removes it, so every fresh build left an empty ``/tmp/tmp*tfds`` directory behind. These
  datasets are never on the bucket, so there is nothing to look up.
  """

  def initialize_from_bucket(self) -> None:
    pass


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
    return _LocalDatasetInfo(
      builder=self,
      description="Tokenised preference pairs (jaxrm.data.preferences).",
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
    self.info.metadata["files"] = _file_fingerprints(_fingerprinted_files(config))
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
    tok = None
    if config.tokenizer_dir:
      from jaxrm.data.hf_tokenizer import HFTokenizer  # pylint: disable=C0415

      tok = HFTokenizer.from_pretrained(config.tokenizer_dir)
    for e in iter_preference_examples(
      files,
      max_len=config.max_len,
      skip_malformed=config.skip_malformed,
      stats=stats,
      line_filter=line_filter,
      add_bos=config.add_bos,
      add_eos=config.add_eos,
      min_prompt_fraction=config.min_prompt_fraction,
      tok=tok,
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
    _check_split(split, files, stats, config)
    self.info.metadata["splits"][split] = stats.to_dict()
    _log_counts(config, split, stats.to_dict(), logging.INFO)


def _log_counts(config: PreferencePairsConfig, split: str, stats: dict[str, Any], level: int):
  """The build's summary line of a split, from its :class:`ReadStats` dict."""
  logging.log(
    level,
    "preference_pairs/%s %s: %d records, %d skipped %s, %d truncated",
    config.name,
    split,
    stats["records"],
    sum(stats["skipped"].values()),
    stats["skipped"],
    stats["truncated_pairs"],
  )


def _fingerprinted_files(config: PreferencePairsConfig) -> tuple[str, ...]:
  files = config.train_files + config.test_files
  if config.tokenizer_dir:
    for name in ("tokenizer.json", "tokenizer_config.json"):
      if name == "tokenizer.json" or os.path.isfile(os.path.join(config.tokenizer_dir, name)):
        files += (os.path.join(config.tokenizer_dir, name),)
  return files


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
  if not math.isfinite(config.test_fraction) or not 0.0 <= config.test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in [0, 1), got {config.test_fraction}")
  num_special = int(config.add_bos) + int(config.add_eos)
  if config.max_len <= num_special:
    raise ValueError(f"max_len must be > {num_special} (the special tokens), got {config.max_len}")
  if not 0.0 <= config.min_prompt_fraction <= 1.0:
    raise ValueError(f"min_prompt_fraction must be in [0, 1], got {config.min_prompt_fraction}")
  for path in files:
    check_data_file(path)


def _distinct_lines(files: Sequence[str]) -> tuple[int, int]:
  """(non-blank lines, distinct non-blank lines) of ``files``; for error messages only."""
  lines = set()
  count = 0
  for path in files:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
      for raw in f:
        if raw.strip():
          count += 1
          lines.add(hashlib.sha256(raw.strip()).digest())
  return count, len(lines)


def _check_split(
  split: str, files: Sequence[str], stats: ReadStats, config: PreferencePairsConfig
) -> None:
  """Refuses a split without pairs, or whose pairs the truncation made all identical."""
  names = ", ".join(files)
  if stats.records == 0:
    if stats.num_skipped:
      why = f"all {stats.num_skipped} of its lines were skipped as malformed {stats.skipped}"
    elif config.test_fraction > 0:
      total, distinct = _distinct_lines(files)
      other = "train" if split == "test" else "test"
      why = (
        f"test_fraction={config.test_fraction} sends whole lines by a hash of their content "
        f"and all {total} line(s) ({distinct} distinct; duplicate lines share a split) went "
        f"to {other}; give more pairs, another test_fraction or split_seed, or test_files"
      )
    else:
      why = "no line holds a record"
    raise PreferenceDataError(
      f"split {split!r} got no preference pairs: {why}", reason="too_few_pairs", path=names
    )
  if stats.identical_after_truncation == stats.records:
    raise PreferenceDataError(
      f"split {split!r}: truncation to max_len={config.max_len} tokens leaves chosen and "
      f"rejected identical in all {stats.records} pairs, so no pair can be learned or "
      "evaluated; raise max_len",
      reason="degenerate_split",
      path=names,
    )
  if stats.identical_after_truncation:
    _warn_identical(config, split, stats.identical_after_truncation, stats.records)


def _warn_identical(config: PreferencePairsConfig, split: str, identical: int, records: int):
  logging.warning(
    "preference_pairs/%s %s: truncation to max_len=%d leaves %d of %d pairs identical",
    config.name,
    split,
    config.max_len,
    identical,
    records,
  )


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
  tokenizer_dir: str | os.PathLike = "",
  overwrite: bool = False,
  cache: bool = False,
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
      min_prompt_fraction, tokenizer_dir: see :class:`PreferencePairsConfig`.
    overwrite: rebuild a dataset of this name that was built differently.
    cache: use the enabled dataset cache (:mod:`jaxrm.data.dataset_cache`): a dataset missing
      from ``data_dir`` is copied from it when it holds one of the same settings, files and
      code, and a dataset built here is stored in it. No effect when the cache is off.

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
    tokenizer_dir=os.path.abspath(os.fspath(tokenizer_dir)) if tokenizer_dir else "",
  )
  _validate_config(config)
  data_dir = os.fspath(data_dir)
  if os.path.exists(data_dir) and not os.path.isdir(data_dir):
    raise ValueError(f"data_dir {data_dir} is not a directory")
  created = _missing_dirs(data_dir, name)
  builder = PreferencePairs(config=config, data_dir=data_dir, file_format="array_record")
  build = not builder.is_prepared()
  cache = cache and dataset_cache.directory() is not None
  current = {}
  if cache or not build:
    current = {
      "settings": config.settings(),
      "files": _file_fingerprints(_fingerprinted_files(config)),
    }
  entry = dataset_cache.key(_portable(current, config.tokenizer_dir)) if cache else ""
  if entry and build and dataset_cache.fetch(entry, builder.data_path):
    try:
      _adopt_metadata(builder.data_path, current)
      builder = PreferencePairs(config=config, data_dir=data_dir, file_format="array_record")
      _log_cached(builder, dataset_cache.directory())
      build = False
    except Exception as e:  # pylint: disable=broad-except  (an entry damaged on disk)
      logging.warning("dataset cache entry %s is damaged (%r); building the dataset", entry, e)
      shutil.rmtree(builder.data_path, ignore_errors=True)
      builder = PreferencePairs(config=config, data_dir=data_dir, file_format="array_record")
  mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
  if not build:
    stored = dict(builder.info.metadata)
    if any(stored.get(k) != v for k, v in current.items()):
      if not overwrite:
        raise ValueError(
          f"{builder.data_path} was built from other files or settings; pass "
          f"overwrite=True to rebuild it or choose another name"
        )
      mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD
      build = True
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
  except BaseException:
    _remove_failed_build(data_dir, name, created)
    raise
  if build and entry:
    dataset_cache.store(entry, builder.data_path)
  return builder


_TOKENIZER_DIR = "<tokenizer_dir>"


def _portable(current: dict[str, Any], tokenizer_dir: str) -> dict[str, Any]:
  """``current`` (settings and fingerprints) with the tokenizer's folder, which a run keeps
  in its own workdir, named by a placeholder: the same tokenizer files in another run's folder
  give the same cache entry."""
  if not tokenizer_dir:
    return current
  prefix = tokenizer_dir + os.sep
  return {
    "settings": {**current["settings"], "tokenizer_dir": _TOKENIZER_DIR},
    "files": {
      (_TOKENIZER_DIR + os.sep + p[len(prefix) :] if p.startswith(prefix) else p): v
      for p, v in current["files"].items()
    },
  }


def _adopt_metadata(data_path: Any, current: dict[str, Any]) -> None:
  """Records this build's settings and fingerprints (``current``; equal to the copied ones
  but for the tokenizer's folder, :func:`_portable`) in a dataset copied from the cache."""
  path = os.path.join(os.fspath(data_path), "metadata.json")
  with open(path) as f:
    metadata = json.load(f)
  atomic_write(path, json.dumps({**metadata, **current}))


def _log_cached(builder: PreferencePairs, cache_dir: str | None) -> None:
  """The build's log lines for a dataset copied from the cache (from its recorded counts)."""
  config = builder.builder_config
  logging.info("preference_pairs/%s: copied from the dataset cache %s", config.name, cache_dir)
  for split, stats in builder.info.metadata.get("splits", {}).items():
    _log_counts(config, split, stats, logging.WARNING if stats["skipped"] else logging.INFO)
    if stats["identical_after_truncation"]:
      _warn_identical(config, split, stats["identical_after_truncation"], stats["records"])


def _missing_dirs(data_dir: str, name: str) -> list[str]:
  """The directories a build of ``name`` would create under ``data_dir``, deepest first."""
  dataset = os.path.join(data_dir, PreferencePairs.name)
  candidates = [os.path.join(dataset, name), dataset, os.path.join(data_dir, "downloads"), data_dir]
  return [d for d in candidates if not os.path.exists(d)]


def _remove_failed_build(data_dir: str, name: str, created: Sequence[str]) -> None:
  """Removes what a failed build left, so that the corrected call starts clean.

  TFDS writes into ``incomplete.*`` directories and renames them only when complete; those
  are removed, and so are the directories this build created if they hold no file.
  """
  config_dir = os.path.join(data_dir, PreferencePairs.name, name)
  if os.path.isdir(config_dir):
    for entry in os.listdir(config_dir):
      if entry.startswith("incomplete."):
        shutil.rmtree(os.path.join(config_dir, entry), ignore_errors=True)
  for directory in created:
    has_files = any(files for _, _, files in os.walk(directory))
    if os.path.isdir(directory) and not has_files:
      shutil.rmtree(directory, ignore_errors=True)
  logging.info("Removed the partial preference dataset %s after a failed build", config_dir)
