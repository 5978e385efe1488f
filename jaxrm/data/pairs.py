"""The preference pairs of a reward-model run: local JSONL files or the synthetic world.

:class:`DataConfig` describes them; :func:`load_data` builds (or reuses) them under
``<workdir>/data``: JSONL files are tokenised once into a TFDS dataset
(:func:`jaxrm.data.build_preference_dataset`), the synthetic world's gold-labelled comparisons
are cached in ``synthetic.npz`` (:func:`synthetic_comparisons`, through the run directory's
one tree cache :func:`jaxrm.io.rundir.cached_tree`). :func:`make_iterator` wraps either kind
in the same resumable, length-bucketed :class:`jaxrm.data.BatchIterator`.

The synthetic world of a seed is :func:`world_for_seed` (``init_world(cfg, key(seed))``), the
same for the reward-model and policy loops, so a proxy trained on a world's comparisons and
a policy optimised in that world share it.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import os
from typing import Any, NamedTuple

from absl import logging
import jax
import numpy as np

from jaxrm.data import preference_files, synthetic
from jaxrm.io import rundir
from jaxrm.io.rundir import ConfigError
from jaxrm.steps.rl_config import RLConfig

SYNTHETIC_FILE = "synthetic.npz"
DATASET_NAME = "default"
# A split of at most this many token slots (pairs x 2 sequences x max_len; 256 MB as int32) is
# decoded once into memory by :func:`load_data`; larger splits are read from disk per batch.
IN_MEMORY_TOKENS = 1 << 26
SYNTHETIC_LABELS = ("deterministic", "bradley_terry")


@dataclasses.dataclass
class SyntheticConfig:
  """Gold-labelled comparisons of the synthetic world (:mod:`jaxrm.data.synthetic`).

  Attributes:
    world: the world (``pi_init``, gold, planted feature).
    seed: seed of the world (:func:`world_for_seed`) and of its comparisons.
    pairs: number of comparisons (before the held-out split).
    labels: ``'deterministic'`` or ``'bradley_terry'`` (see
      :func:`jaxrm.data.synthetic.make_comparisons`).
    label_noise: rate of flipped labels, in ``[0, 0.5]``.
  """

  world: synthetic.WorldConfig = dataclasses.field(default_factory=synthetic.WorldConfig)
  seed: int = 0
  pairs: int = 4096
  labels: str = "deterministic"
  label_noise: float = 0.0


@dataclasses.dataclass
class DataConfig:
  """Where a reward-model run's preference pairs come from and how they are batched.

  Attributes:
    files: JSONL(.gz) preference files; empty for the synthetic world (``synthetic``).
    test_files: held-out JSONL files (files only); when given, ``test_fraction`` is ignored.
    test_fraction: share of the pairs held out for evaluation (files: by a seeded hash of
      each line, :func:`jaxrm.data.line_split`; synthetic: the last pairs), in ``[0, 1)``.
    split_seed: seed of the hash split of files.
    max_len: tokens per sequence (files; pairs are truncated to fit) and the model's
      ``max_len``. The synthetic world fixes its own length (prompt + response).
    skip_malformed: skip and count malformed JSONL lines instead of failing.
    bucket: length bucketing (batches padded to the smallest power of two >= 32 that fits).
    synthetic: the synthetic world's comparisons (used when ``files`` is empty).
    tokenizer: files only: a folder with ``tokenizer.json`` (a Hugging Face checkpoint or
      tokenizer folder); empty: the model checkpoint's own tokenizer if the reward-model
      loop imports one that has a ``tokenizer.json``, else the byte tokenizer. The run
      stores the tokenizer it used (:mod:`jaxrm.data.run_tokenizer`).
  """

  files: tuple[str, ...] = ()
  test_files: tuple[str, ...] = ()
  test_fraction: float = 0.1
  split_seed: int = 0
  max_len: int = 512
  skip_malformed: bool = False
  bucket: bool = True
  synthetic: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)
  tokenizer: str = ""

  @property
  def is_synthetic(self) -> bool:
    return not self.files


def validate_world(world: Any, *, field: str) -> None:
  """Raises :class:`ConfigError` (``field``) unless ``world`` is a valid WorldConfig
  (re-running its checks after command-line overrides)."""
  if not isinstance(world, synthetic.WorldConfig):
    raise ConfigError(field, world, "must be a jaxrm.data.synthetic.WorldConfig")
  try:
    dataclasses.replace(world)
  except (TypeError, ValueError) as e:
    raise ConfigError(field, world, str(e)) from None


def validate_fixed_length_rl(rl: Any, world: synthetic.WorldConfig, *, field: str) -> None:
  """Raises :class:`ConfigError` (``field`` or ``field.<name>``) unless ``rl`` is a valid
  :class:`jaxrm.steps.rl.RLConfig` (re-running its checks after command-line overrides) for
  ``world``'s fixed-length responses: ``max_new_tokens == world.response_len``, no EOS."""
  if not isinstance(rl, RLConfig):
    raise ConfigError(field, rl, "must be a jaxrm.steps.rl.RLConfig")
  try:
    dataclasses.replace(rl)
  except (TypeError, ValueError) as e:
    raise ConfigError(field, rl, str(e)) from None
  if rl.max_new_tokens != world.response_len:
    raise ConfigError(
      f"{field}.max_new_tokens",
      rl.max_new_tokens,
      f"must equal world.response_len={world.response_len} (fixed-length responses)",
    )
  if rl.eos_id is not None:
    raise ConfigError(f"{field}.eos_id", rl.eos_id, "must be None (fixed-length responses)")


def _not_a_file(path: str) -> str:
  """Why ``path`` is no data file: missing, a directory or a special file (FIFO, device)."""
  if not os.path.exists(path):
    return "file not found"
  if os.path.isdir(path):
    return "is a directory, not a data file"
  return "is not a regular file (a FIFO or device?)"


MAX_LEN_LIMIT = 1 << 16  # the model's position table has max_len rows; larger is a typo


def validate_data_config(c: DataConfig, *, prefix: str = "data") -> None:
  """Raises :class:`ConfigError` naming the first bad field (``data.max_len``, ...)."""

  def need(ok: bool, name: str, message: str) -> None:
    if not ok:
      obj = c.synthetic if name.startswith("synthetic.") else c
      raise ConfigError(f"{prefix}.{name}", getattr(obj, name.split(".")[-1]), message)

  need(isinstance(c.files, (tuple, list)) and all(c.files), "files", "must be a tuple of paths")
  need(isinstance(c.test_files, (tuple, list)), "test_files", "must be a tuple of paths")
  need(isinstance(c.tokenizer, str), "tokenizer", "must be a folder path or ''")
  if c.tokenizer:
    need(
      os.path.isfile(os.path.join(c.tokenizer, "tokenizer.json")),
      "tokenizer",
      f"{c.tokenizer} has no tokenizer.json",
    )
  if c.is_synthetic:
    need(not c.test_files, "test_files", "must be empty for the synthetic world (no files)")
    need(not c.tokenizer, "tokenizer", "must be empty for the synthetic world (no files)")
  else:
    for name in ("files", "test_files"):
      for path in getattr(c, name):
        need(os.path.isfile(path), name, f"{_not_a_file(path)}: {path}")
    need(
      len(set(c.files) | set(c.test_files)) == len(c.files) + len(c.test_files),
      "test_files",
      "must not repeat a data file",
    )
  need(
    rundir.is_num(c.test_fraction) and 0 <= c.test_fraction < 1,
    "test_fraction",
    "must be in [0, 1)",
  )
  need(rundir.is_int(c.split_seed) and c.split_seed >= 0, "split_seed", "must be an int >= 0")
  need(
    rundir.is_int(c.max_len) and 8 <= c.max_len <= MAX_LEN_LIMIT,
    "max_len",
    f"must be an int in [8, {MAX_LEN_LIMIT}] (tokens per sequence and the model's positions)",
  )
  s = c.synthetic
  need(rundir.is_int(s.pairs) and s.pairs >= 2, "synthetic.pairs", "must be an int >= 2")
  need(rundir.is_int(s.seed) and s.seed >= 0, "synthetic.seed", "must be an int >= 0")
  need(s.labels in SYNTHETIC_LABELS, "synthetic.labels", f"must be one of {list(SYNTHETIC_LABELS)}")
  need(
    rundir.is_num(s.label_noise) and 0 <= s.label_noise <= 0.5,
    "synthetic.label_noise",
    "must be in [0, 0.5]",
  )
  validate_world(s.world, field=f"{prefix}.synthetic.world")


def world_for_seed(world_cfg: synthetic.WorldConfig, seed: int) -> synthetic.World:
  """The synthetic world of the reward-model and policy loops: ``init_world(cfg, key(seed))``."""
  return synthetic.init_world(world_cfg, jax.random.key(seed))


def synthetic_comparisons(
  config: SyntheticConfig, workdir: str | os.PathLike
) -> dict[str, np.ndarray]:
  """The synthetic world's gold-labelled comparisons of a run, cached in the workdir.

  ``<workdir>/data/synthetic.npz`` is reused when it was made with the same
  :class:`SyntheticConfig`, otherwise (re)made: :func:`world_for_seed` and
  ``make_comparisons(..., fold_in(key(seed), 1), num=pairs)``.

  Returns:
    ``chosen``, ``rejected`` ``[n, seq_len]`` int32, ``mask`` ``[n, seq_len]`` bool,
    ``gold_chosen``, ``gold_rejected`` ``[n]`` float32.
  """
  path = os.path.join(os.fspath(workdir), rundir.DATA_DIR, SYNTHETIC_FILE)

  def make():
    world = world_for_seed(config.world, config.seed)
    comps = synthetic.make_comparisons(
      world,
      config.world,
      jax.random.fold_in(jax.random.key(config.seed), 1),
      num=config.pairs,
      labels=config.labels,
      label_noise=config.label_noise,
    )
    return {
      "chosen": comps.chosen.astype(np.int32),
      "rejected": comps.rejected.astype(np.int32),
      "mask": comps.mask.astype(bool),
      "gold_chosen": comps.gold_chosen.astype(np.float32),
      "gold_rejected": comps.gold_rejected.astype(np.float32),
    }

  tree, _ = rundir.cached_tree(path, make, rundir.fingerprint(config))
  return {k: np.asarray(v) for k, v in tree.items()}


class RunData(NamedTuple):
  """The pairs of a run and what the model needs to know about them."""

  train: Any  # dict of [n, ...] arrays (synthetic), or a random-access record source (TFDS; a
  # list of PreferenceExample when small: in_memory)
  test: Any  # the same kind, or None without a held-out split
  tokenizer: str  # 'synthetic', 'byte' or 'hf:<digest>' (jaxrm.data.run_tokenizer)
  vocab_size: int
  max_len: int  # the model's max_len and the longest batch
  info: dict[str, Any]  # JSON description (source, per-split counts) for config and report


def _synthetic_split(
  arrays: Mapping[str, np.ndarray], sl: slice, prompt_len: int
) -> dict[str, np.ndarray]:
  n = arrays["chosen"][sl].shape[0]
  return {
    "chosen": arrays["chosen"][sl],
    "chosen_mask": arrays["mask"][sl],
    "rejected": arrays["rejected"][sl],
    "rejected_mask": arrays["mask"][sl],
    "prompt_len": np.full((n,), prompt_len, np.int32),
    "gold_chosen": arrays["gold_chosen"][sl],
    "gold_rejected": arrays["gold_rejected"][sl],
  }


def dataset_dir(workdir: str | os.PathLike) -> str:
  """Where :func:`load_data` keeps the TFDS dataset of a run's JSONL files."""
  from jaxrm.data import preferences  # pylint: disable=import-outside-toplevel

  return os.path.join(
    os.fspath(workdir),
    rundir.DATA_DIR,
    "preference_pairs",
    DATASET_NAME,
    str(preferences.PreferencePairs.VERSION),
  )


def load_data(
  config: DataConfig, workdir: str | os.PathLike, *, prepare: bool = True, tok: Any = None
) -> RunData:
  """Builds (or reuses) the run's train and held-out pairs.

  Args:
    config: the run's data settings.
    workdir: the run directory; the data lives under ``<workdir>/data``.
    prepare: build the TFDS dataset if needed (training; copied from the enabled dataset
      cache when it holds the same one: :mod:`jaxrm.data.dataset_cache`).
      False (reports) reads the prepared dataset as it is, so the source files need not exist
      any more.
    tok: files only: the run's :class:`jaxrm.data.run_tokenizer.RunTokenizer` (None: the
      byte tokenizer; with ``prepare=False``, the tokenizer stored with the run). It is saved
      under ``<workdir>/tokenizer`` (once; a run keeps its tokenizer) and the dataset is
      tokenised with that copy.

  Returns:
    A :class:`RunData`.
  """
  workdir = os.fspath(workdir)
  if config.is_synthetic:
    s = config.synthetic
    arrays = synthetic_comparisons(s, workdir)
    n = arrays["chosen"].shape[0]
    n_test = int(round(config.test_fraction * n)) if config.test_fraction > 0 else 0
    if config.test_fraction > 0:
      n_test = min(max(n_test, 1), n - 1)
    prompt_len = s.world.prompt_len
    train = _synthetic_split(arrays, slice(0, n - n_test), prompt_len)
    test = _synthetic_split(arrays, slice(n - n_test, n), prompt_len) if n_test else None
    info = {
      "source": "synthetic",
      "train_pairs": n - n_test,
      "test_pairs": n_test,
      "synthetic": rundir.config_to_json(s),
    }
    return RunData(train, test, "synthetic", s.world.vocab_size, s.world.seq_len, info)

  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  from jaxrm.data import (
    preferences,  # pylint: disable=import-outside-toplevel
    run_tokenizer,  # pylint: disable=C0415
  )

  stored = os.path.join(workdir, run_tokenizer.TOKENIZER_DIR, run_tokenizer.CONVENTION_FILE)
  if tok is None and not prepare and os.path.isfile(stored):
    tok = run_tokenizer.RunTokenizer.load(workdir)  # a report of a finished run
  tok = run_tokenizer.RunTokenizer.from_source(None) if tok is None else tok
  data_dir = os.path.join(workdir, rundir.DATA_DIR)
  if prepare:
    saved = tok.save(workdir)
    tokenizer_dir = saved if tok.kind == "hf" else ""
    try:
      builder = preferences.build_preference_dataset(
        list(config.files),
        data_dir=data_dir,
        max_len=config.max_len,
        name=DATASET_NAME,
        test_files=list(config.test_files),
        test_fraction=0.0 if config.test_files else config.test_fraction,
        split_seed=config.split_seed,
        skip_malformed=config.skip_malformed,
        add_bos=tok.add_bos,
        add_eos=tok.add_eos,
        min_prompt_fraction=tok.min_prompt_fraction,
        tokenizer_dir=tokenizer_dir,
        # A run refused before its first checkpoint must not block the corrected command:
        # with no checkpoint, nothing depends on the old dataset and it is rebuilt.
        overwrite=not _has_checkpoint(workdir),
        cache=True,
      )
    except ValueError as e:
      if "was built from other files or settings" in str(e):
        raise ConfigError(
          "data.files",
          config.files,
          f"{data_dir} holds a dataset built from other files or settings; use another --workdir",
        ) from None
      raise
  else:
    builder = tfds.builder_from_directory(dataset_dir(workdir))
  splits = set(builder.info.splits.keys())
  train = in_memory(builder.as_data_source(split="train"), max_len=config.max_len)
  test = builder.as_data_source(split="test") if "test" in splits else None
  test = None if test is None else in_memory(test, max_len=config.max_len)
  if test is not None and len(test) == 0:
    logging.warning("The held-out split is empty; training without evaluation")
    test = None
  metadata = dict(builder.info.metadata)
  info = {
    "source": "jsonl",
    "files": list(config.files),
    "test_files": list(config.test_files),
    "dataset": dataset_dir(workdir),
    "train_pairs": len(train),
    "test_pairs": 0 if test is None else len(test),
    "read_stats": metadata.get("splits", {}),
  }
  info["tokenizer"] = tok.name
  return RunData(train, test, tok.name, tok.vocab_size, config.max_len, info)


def in_memory(source: Any, *, max_len: int) -> Any:
  """A small record source's pairs decoded once: a list of
  :class:`jaxrm.data.preference_files.PreferenceExample` in source order (the same records, so
  every batch is the same); a source of more than :data:`IN_MEMORY_TOKENS` token slots
  (``len(source) * 2 * max_len``) is returned as it is.

  A TFDS data source decodes a record's features on every read (about 0.15 ms a pair on the
  2-core CPU), and a run reads each training pair once per epoch and each held-out pair at every
  evaluation: half a second of host time in the README's HH run (BUILD_NOTES.md, session 36).
  """
  if len(source) * 2 * max_len > IN_MEMORY_TOKENS:
    return source
  return preference_files.get_examples(source, range(len(source)))


def _has_checkpoint(workdir: str) -> bool:
  directory = os.path.join(workdir, rundir.CHECKPOINT_DIR)
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def num_examples(data: Any) -> int:
  """Pairs in arrays or a record source."""
  return data["chosen"].shape[0] if isinstance(data, Mapping) else len(data)


def make_iterator(
  data: Any, *, batch_size: int, seed: int, bucket: bool, max_len: int, train: bool
) -> Any:
  """The training iterator (shuffled, endless) or an evaluation pass (data order, padded).

  Returns:
    A :class:`jaxrm.data.BatchIterator`.

  Raises:
    ConfigError: (``batch_size``) if a training batch exceeds the pairs.
  """
  from jaxrm.data import iterator  # pylint: disable=import-outside-toplevel

  shape = (
    {"bucket_lengths": iterator.power_of_two_buckets(max_len)} if bucket else {"max_len": max_len}
  )
  if train:
    try:
      return iterator.BatchIterator(data, batch_size=batch_size, seed=seed, **shape)
    except ValueError as e:
      if "exceeds the number of examples" in str(e):
        raise ConfigError(
          "batch_size", batch_size, f"exceeds the {num_examples(data)} training pairs"
        ) from None
      raise
  return iterator.BatchIterator(
    data,
    batch_size=batch_size,
    seed=0,
    shuffle=False,
    drop_remainder=False,
    num_epochs=1,
    **shape,
  )


def train_iterator(config: Any, data: RunData) -> Any:
  """The run's training iterator: ``config.batch_size`` pairs per batch, shuffled with
  ``config.seed``, bucketed as ``config.data.bucket`` says (a reward-model or DPO config)."""
  return make_iterator(
    data.train,
    batch_size=config.batch_size,
    seed=config.seed,
    bucket=config.data.bucket,
    max_len=data.max_len,
    train=True,
  )


def pair_lengths(data: Any) -> dict[str, np.ndarray]:
  """``chosen``, ``rejected`` (sequence lengths) and ``prompt`` (shared prefix) ``[n]``."""
  if isinstance(data, Mapping):
    n = data["chosen"].shape[0]
    prompt = data.get("prompt_len", np.zeros((n,), np.int32))
    return {
      "chosen": data["chosen_mask"].sum(1),
      "rejected": data["rejected_mask"].sum(1),
      "prompt": np.asarray(prompt),
    }
  from jaxrm.data import preferences  # pylint: disable=import-outside-toplevel

  out = {"chosen": [], "rejected": [], "prompt": []}
  for start in range(0, len(data), 1024):
    for e in preferences.get_examples(data, range(start, min(start + 1024, len(data)))):
      out["chosen"].append(len(e.chosen))
      out["rejected"].append(len(e.rejected))
      out["prompt"].append(e.prompt_len)
  return {k: np.asarray(v, np.int64) for k, v in out.items()}


def _length_summary(x: np.ndarray) -> dict[str, float]:
  x = np.asarray(x, np.float64)
  if x.size == 0:
    return {}
  return {
    "mean": float(x.mean()),
    "median": float(np.median(x)),
    "p95": float(np.quantile(x, 0.95)),
    "min": float(x.min()),
    "max": float(x.max()),
  }


def split_statistics(data: Any, read_stats: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Pairs, length statistics and (files) skipped/truncated counts of one split."""
  lengths = pair_lengths(data)
  seq = np.concatenate([lengths["chosen"], lengths["rejected"]])
  response = np.concatenate(
    [lengths["chosen"] - lengths["prompt"], lengths["rejected"] - lengths["prompt"]]
  )
  out = {
    "pairs": int(lengths["chosen"].shape[0]),
    "sequence_length": _length_summary(seq),
    "prompt_length": _length_summary(lengths["prompt"]),
    "response_length": _length_summary(response),
  }
  if read_stats:
    out.update(
      {
        "lines": read_stats.get("lines"),
        "blank_lines": read_stats.get("blank_lines"),
        "skipped": sum((read_stats.get("skipped") or {}).values()),
        "skipped_reasons": read_stats.get("skipped") or {},
        "truncated_pairs": read_stats.get("truncated_pairs"),
        "truncated_prompts": read_stats.get("truncated_prompts"),
        "truncated_responses": read_stats.get("truncated_responses"),
        "identical_after_truncation": read_stats.get("identical_after_truncation"),
      }
    )
  return out
