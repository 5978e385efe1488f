"""Reward-model training loop: preference pairs in; metrics, checkpoints and a report out.

:func:`train_and_evaluate` trains a :class:`jaxrm.models.reward_model.RewardModel` on preference
pairs from local JSONL files (tokenised once into a TFDS dataset under ``<workdir>/data`` by
:func:`jaxrm.data.build_preference_dataset`) or on the gold-labelled comparisons of the
synthetic world (:mod:`jaxrm.data.synthetic`, cached in ``<workdir>/data/synthetic.npz``). Both
kinds of data go through the same resumable, length-bucketed
:class:`jaxrm.data.BatchIterator` and the same step, :func:`jaxrm.steps.rm_step.reward_model_step`
launched by :func:`jaxrm.steps.parallel.make_parallel_step` (``'jit'``, ``'shard_map'`` or
``'pmap'``).

Everything about a run lives under ``workdir``:

* ``config.json``: the :class:`TrainConfig`, the model configuration and the data summary;
* ``metrics.jsonl``: one JSON object per line. ``{"split": "train", "step": s, ...}`` every
  ``log_every`` steps holds the means of loss, accuracy, margin and gradient norm over the
  steps since the previous row (or since the process started), the learning rate, pairs/s and
  the ETA; ``{"split": "eval", "step": s, ...}`` holds the held-out metrics of
  :func:`jaxrm.io.report.heldout_metrics` (accuracy, log-loss, Brier, ECE, margins);
* ``checkpoints/<step>``: :class:`jaxrm.io.checkpoint.CheckpointManager` checkpoints, the last
  ``keep_checkpoints`` plus the best by held-out accuracy. ``state`` is the
  :class:`jaxrm.steps.train_state.TrainState`; the JSON ``extra`` holds ``config`` (this
  :class:`TrainConfig`), ``model_config`` (:func:`jaxrm.io.rm_io.config_to_json`), ``pooling``,
  ``tokenizer`` (``'byte'`` or ``'synthetic'``), ``preset``, ``data`` (the training
  iterator's position) and ``metrics`` (the held-out and training metrics at that step);
* ``rm_report.json``, ``rm_report.md``, ``reliability.png``, ``reward_histogram.png``: the
  report of the final model (:func:`write_run_report` writes one for any checkpoint).

Held-out evaluation runs every ``eval_every`` steps and at every checkpoint, so that each
checkpoint records a fresh held-out accuracy for the choice of the best one. Without a
held-out split nothing is evaluated during training and the report describes the training
pairs (it says so).

Resuming: if ``<workdir>/checkpoints`` holds a checkpoint, the newest readable one is
restored (a damaged newest checkpoint is reported and the previous one used; see
:meth:`jaxrm.io.checkpoint.CheckpointManager.restore_latest`), the iterator continues with
exactly the batch an uninterrupted run would have taken next, and rows of ``metrics.jsonl``
after the restored step are removed (they belong to the interrupted part, which is re-run),
so the file never holds a step twice. A resumed run ends with parameters bitwise identical to
an uninterrupted one (same machine, same mode). Settings that change the trained parameters
(data, model, loss, optimiser, ``steps``, ``seed``, ...) must equal the checkpointed run's;
``eval_every``, ``log_every``, ``checkpoint_every``, ``keep_checkpoints``, ``parallel``,
``nonfinite`` and ``report`` may change.

Randomness: the parameters are initialised from ``fold_in(key(seed), 0)``; the step keys
come from the train state (``fold_in(key, step)``); the data order is a function of
``seed`` and the epoch (:class:`jaxrm.data.BatchIterator`).

Example::

  config = TrainConfig(data=("synthetic",), model="tiny", steps=500, batch_size=64)
  summary = train_and_evaluate(config, "runs/rm")
  print(summary["eval"]["accuracy"])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import functools
import json
import logging as std_logging
import math
import os
import time
from typing import Any, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tensorflow_datasets as tfds

from jaxrm import data as data_lib
from jaxrm.data import synthetic, tokenizer
from jaxrm.io import checkpoint as checkpoint_lib
from jaxrm.io import report as report_lib
from jaxrm.io import rm_io
from jaxrm.math import preference
from jaxrm.models import presets
from jaxrm.models.reward_model import RewardModel
from jaxrm.steps import parallel, rm_step
from jaxrm.steps import train_state as train_state_lib

SYNTHETIC = "synthetic"
PARALLEL_MODES = ("auto", "jit", "shard_map", "pmap")
POOLINGS = ("last", "mean")
SYNTHETIC_LABELS = ("deterministic", "bradley_terry")
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
DATA_DIR = "data"
SYNTHETIC_FILE = "synthetic.npz"
BEST_METRIC = "eval_accuracy"
DATASET_NAME = "default"

_STEP_KEYS = ("chosen", "chosen_mask", "rejected", "rejected_mask", "weight", "label")
_SCORE_KEYS = ("chosen", "chosen_mask", "rejected", "rejected_mask")
# Settings that do not change the trained parameters: they may differ on resume.
_CHANGEABLE_ON_RESUME = frozenset(
  {
    "eval_every",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "parallel",
    "nonfinite",
    "report",
  }
)


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Settings of a reward-model training run; each field is a flag of the training script.

  Attributes:
    data: JSONL(.gz) preference files, or ``('synthetic',)`` for the synthetic world.
    test_data: held-out JSONL files (files only); when given, ``test_fraction`` is ignored.
    test_fraction: share of the pairs held out for evaluation (files: by a seeded hash of
      each line, :func:`jaxrm.data.line_split`; synthetic: the last pairs), in ``[0, 1)``.
    split_seed: seed of the hash split of files.
    max_len: tokens per sequence (files; pairs are truncated to fit) and the model's
      ``max_len``. The synthetic world fixes its own length (prompt + response).
    skip_malformed: skip and count malformed JSONL lines instead of failing.
    bucket: length bucketing (batches padded to the smallest power of two >= 32 that fits).
    synthetic_pairs: number of gold-labelled comparisons (before the held-out split).
    synthetic_seed: seed of the world and its comparisons.
    synthetic_labels: ``'deterministic'`` or ``'bradley_terry'`` (see
      :func:`jaxrm.data.synthetic.make_comparisons`).
    synthetic_label_noise: rate of flipped labels, in ``[0, 0.5]``.
    synthetic_world: overrides of :class:`jaxrm.data.synthetic.WorldConfig` fields.
    model: preset name (:data:`jaxrm.models.presets.PRESETS`).
    pooling: ``'last'`` or ``'mean'`` (:class:`jaxrm.models.reward_model.RewardModel`).
    loss: a name of :func:`jaxrm.math.preference.get_loss`.
    margin: the loss's margin (None: the loss's default, 0 or 1 for the hinge).
    label_smoothing: in ``[0, 1]``.
    center_coef: coefficient of :func:`jaxrm.math.preference.reward_centering_penalty` on the
      batch's rewards (computed per device shard under ``shard_map``/``pmap``).
    batch_size: pairs per step (global; divisible by the devices in multi-device modes).
    steps: optimizer steps.
    learning_rate: peak AdamW learning rate (linear warm-up, cosine decay to 10%).
    warmup_steps: linear warm-up steps.
    weight_decay: AdamW decoupled weight decay on matrices (not on biases, norms).
    grad_clip: global-norm gradient clipping (0: none).
    eval_every: held-out evaluation period in steps (also at every checkpoint and the end).
    log_every: training-row period in steps.
    checkpoint_every: checkpoint period in steps (also at the last step).
    keep_checkpoints: most recent checkpoints kept (the best one is kept besides).
    seed: seed of the initialisation, the step keys and the data order.
    parallel: ``'auto'``, ``'jit'``, ``'shard_map'`` or ``'pmap'``
      (:func:`jaxrm.steps.parallel.make_parallel_step`).
    nonfinite: ``'skip'`` a step with a non-finite loss or gradient, or ``'raise'``.
    report: write the report at the end of training.
  """

  data: tuple[str, ...] = (SYNTHETIC,)
  test_data: tuple[str, ...] = ()
  test_fraction: float = 0.1
  split_seed: int = 0
  max_len: int = 512
  skip_malformed: bool = False
  bucket: bool = True
  synthetic_pairs: int = 4096
  synthetic_seed: int = 0
  synthetic_labels: str = "deterministic"
  synthetic_label_noise: float = 0.0
  synthetic_world: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  model: str = "tiny"
  pooling: str = "last"
  loss: str = "bradley_terry"
  margin: float | None = None
  label_smoothing: float = 0.0
  center_coef: float = 0.0
  batch_size: int = 32
  steps: int = 1000
  learning_rate: float = 3e-4
  warmup_steps: int = 50
  weight_decay: float = 0.01
  grad_clip: float = 1.0
  eval_every: int = 100
  log_every: int = 10
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  seed: int = 0
  parallel: str = "auto"
  nonfinite: str = "skip"
  report: bool = True

  @property
  def is_synthetic(self) -> bool:
    return tuple(self.data) == (SYNTHETIC,)

  def to_json(self) -> dict[str, Any]:
    """The fields as a JSON-serialisable dict (tuples as lists)."""
    out = {}
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      out[f.name] = (
        list(value)
        if isinstance(value, tuple)
        else dict(value)
        if isinstance(value, Mapping)
        else value
      )
    return out

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> TrainConfig:
    """Inverse of :meth:`to_json`; unknown keys raise ``ValueError``."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown TrainConfig fields {unknown}")
    d = dict(d)
    for key in ("data", "test_data"):
      if key in d:
        d[key] = tuple(d[key])
    return cls(**d)


class ConfigError(ValueError):
  """A bad setting; ``field`` is the :class:`TrainConfig` field, i.e. the script's flag."""

  def __init__(self, field: str, value: Any, message: str):
    self.field, self.value, self.message = field, value, message
    super().__init__(f"{field}={value!r}: {message}")

  def flag_message(self) -> str:
    """One line naming the flag: ``flag --batch_size=0: must be >= 1``."""
    value = self.value
    if isinstance(value, (tuple, list)):
      value = ",".join(map(str, value))
    elif isinstance(value, Mapping):
      value = ",".join(f"{k}={v}" for k, v in value.items())
    return f"flag --{self.field}={value}: {self.message}"


def _world_field_types() -> dict[str, type]:
  return {f.name: type(f.default) for f in dataclasses.fields(synthetic.WorldConfig)}


def parse_world_overrides(text: str) -> dict[str, Any]:
  """Parses ``'policy_layers=1,gold_width=32'`` into WorldConfig overrides (typed).

  Raises:
    ConfigError: for a malformed item, an unknown field or a value of the wrong type.
  """
  try:
    return synthetic.parse_world_overrides(text)
  except ValueError as e:
    raise ConfigError("synthetic_world", text, str(e)) from None


def validate_config(config: TrainConfig, *, num_devices: int | None = None) -> None:
  """Checks every setting; raises :class:`ConfigError` naming the first bad one.

  Args:
    config: the settings.
    num_devices: devices of the multi-device modes (default: ``jax.device_count()``),
      which must divide ``batch_size``.
  """
  c = config

  def need(ok: bool, field: str, message: str) -> None:
    if not ok:
      raise ConfigError(field, getattr(c, field), message)

  def is_int(x):
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

  def is_num(x):
    return isinstance(x, (int, float, np.number)) and not isinstance(x, bool) and math.isfinite(x)

  need(
    isinstance(c.data, tuple) and len(c.data) > 0 and all(c.data),
    "data",
    "must name at least one JSONL file, or be 'synthetic'",
  )
  if SYNTHETIC in c.data:
    need(c.is_synthetic, "data", "'synthetic' cannot be mixed with files")
    need(
      not c.test_data,
      "test_data",
      "must be empty with --data=synthetic (the held-out pairs come from --test_fraction)",
    )
  else:
    for path in c.data:
      need(os.path.isfile(path), "data", f"file not found: {path}")
    for path in c.test_data:
      need(os.path.isfile(path), "test_data", f"file not found: {path}")
    need(
      len(set(c.data + c.test_data)) == len(c.data) + len(c.test_data),
      "test_data",
      "must not repeat a --data file",
    )
  need(
    is_num(c.test_fraction) and 0.0 <= c.test_fraction < 1.0, "test_fraction", "must be in [0, 1)"
  )
  need(is_int(c.split_seed) and c.split_seed >= 0, "split_seed", "must be an int >= 0")
  need(is_int(c.max_len) and c.max_len >= 8, "max_len", "must be an int >= 8")
  need(
    is_int(c.synthetic_pairs) and c.synthetic_pairs >= 2, "synthetic_pairs", "must be an int >= 2"
  )
  need(is_int(c.synthetic_seed) and c.synthetic_seed >= 0, "synthetic_seed", "must be an int >= 0")
  need(
    c.synthetic_labels in SYNTHETIC_LABELS,
    "synthetic_labels",
    f"must be one of {list(SYNTHETIC_LABELS)}",
  )
  need(
    is_num(c.synthetic_label_noise) and 0.0 <= c.synthetic_label_noise <= 0.5,
    "synthetic_label_noise",
    "must be in [0, 0.5]",
  )
  types = _world_field_types()
  for key in dict(c.synthetic_world):
    need(key in types, "synthetic_world", f"unknown WorldConfig field {key!r}")
  if c.is_synthetic:
    try:
      synthetic.WorldConfig(**c.synthetic_world)
    except (TypeError, ValueError) as e:
      raise ConfigError("synthetic_world", c.synthetic_world, str(e)) from None
  need(c.model in presets.PRESETS, "model", f"must be one of {sorted(presets.PRESETS)}")
  need(c.pooling in POOLINGS, "pooling", f"must be one of {list(POOLINGS)}")
  need(c.loss in preference.LOSS_NAMES, "loss", f"must be one of {list(preference.LOSS_NAMES)}")
  need(c.margin is None or is_num(c.margin), "margin", "must be a finite number")
  need(
    is_num(c.label_smoothing) and 0.0 <= c.label_smoothing <= 1.0,
    "label_smoothing",
    "must be in [0, 1]",
  )
  need(is_num(c.center_coef) and c.center_coef >= 0, "center_coef", "must be >= 0")
  need(is_int(c.batch_size) and c.batch_size >= 1, "batch_size", "must be an int >= 1")
  need(is_int(c.steps) and c.steps >= 1, "steps", "must be an int >= 1")
  need(is_num(c.learning_rate) and c.learning_rate > 0, "learning_rate", "must be > 0")
  need(is_int(c.warmup_steps) and c.warmup_steps >= 0, "warmup_steps", "must be an int >= 0")
  need(is_num(c.weight_decay) and c.weight_decay >= 0, "weight_decay", "must be >= 0")
  need(is_num(c.grad_clip) and c.grad_clip >= 0, "grad_clip", "must be >= 0 (0: no clipping)")
  for name in ("eval_every", "log_every", "checkpoint_every", "keep_checkpoints"):
    need(is_int(getattr(c, name)) and getattr(c, name) >= 1, name, "must be an int >= 1")
  need(is_int(c.seed) and c.seed >= 0, "seed", "must be an int >= 0")
  need(c.parallel in PARALLEL_MODES, "parallel", f"must be one of {list(PARALLEL_MODES)}")
  need(
    c.nonfinite in train_state_lib.NONFINITE_MODES,
    "nonfinite",
    f"must be one of {list(train_state_lib.NONFINITE_MODES)}",
  )
  n = jax.device_count() if num_devices is None else num_devices
  mode = c.parallel if c.parallel != "auto" else ("shard_map" if n > 1 else "jit")
  if mode in ("shard_map", "pmap"):
    need(
      c.batch_size % n == 0,
      "batch_size",
      f"must be divisible by the {n} devices of --parallel={mode}",
    )


def _resolve_paths(config: TrainConfig) -> TrainConfig:
  if config.is_synthetic:
    return config
  return dataclasses.replace(
    config,
    data=tuple(os.path.abspath(p) for p in config.data),
    test_data=tuple(os.path.abspath(p) for p in config.test_data),
  )


def check_resumable(saved: Mapping[str, Any], config: TrainConfig, workdir: str) -> None:
  """Raises :class:`ConfigError` if a setting that shapes the parameters differs from
  ``saved`` (the ``config`` of the checkpoint being resumed)."""
  current = config.to_json()
  for key, value in current.items():
    if key in _CHANGEABLE_ON_RESUME or key not in saved:
      continue
    if saved[key] != value:
      raise ConfigError(
        key,
        getattr(config, key),
        f"differs from the checkpointed run in {workdir} ({saved[key]!r}); "
        f"resume with the same value or use another --workdir",
      )


# ----------------------------------------------------------------------------- data


class RunData(NamedTuple):
  """The pairs of a run and what the model needs to know about them."""

  train: Any  # dict of [n, ...] arrays (synthetic) or a random-access record source (TFDS)
  test: Any  # the same kind, or None without a held-out split
  tokenizer: str  # 'byte' or 'synthetic'
  vocab_size: int
  max_len: int  # the model's max_len and the longest batch
  info: dict[str, Any]  # JSON description (source, per-split counts) for config and report


def _synthetic_fingerprint(config: TrainConfig, world_cfg: synthetic.WorldConfig) -> str:
  return json.dumps(
    {
      "world": dataclasses.asdict(world_cfg),
      "seed": config.synthetic_seed,
      "pairs": config.synthetic_pairs,
      "labels": config.synthetic_labels,
      "label_noise": config.synthetic_label_noise,
    },
    sort_keys=True,
  )


def synthetic_comparisons(config: TrainConfig, workdir: str | os.PathLike) -> dict[str, np.ndarray]:
  """The synthetic world's gold-labelled comparisons of a run, cached in the workdir.

  ``<workdir>/data/synthetic.npz`` is reused when it was made with the same world and
  comparison settings, otherwise (re)made: ``init_world(WorldConfig(**synthetic_world),
  key(synthetic_seed))`` and ``make_comparisons(..., fold_in(key, 1), num=synthetic_pairs)``.

  Returns:
    ``chosen``, ``rejected`` ``[n, seq_len]`` int32, ``mask`` ``[n, seq_len]`` bool,
    ``gold_chosen``, ``gold_rejected`` ``[n]`` float32.
  """
  world_cfg = synthetic.WorldConfig(**config.synthetic_world)
  fingerprint = _synthetic_fingerprint(config, world_cfg)
  path = os.path.join(os.fspath(workdir), DATA_DIR, SYNTHETIC_FILE)
  keys = ("chosen", "rejected", "mask", "gold_chosen", "gold_rejected")
  if os.path.exists(path):
    try:
      with np.load(path) as z:
        if str(z["fingerprint"]) == fingerprint:
          return {k: z[k] for k in keys}
      logging.info("%s was made with other settings; making it again", path)
    except (OSError, ValueError, KeyError) as e:  # e.g. a torn file
      logging.warning("Could not read %s (%s); making it again", path, e)
  start = time.time()
  key = jax.random.key(config.synthetic_seed)
  world = synthetic.init_world(world_cfg, key)
  comps = synthetic.make_comparisons(
    world,
    world_cfg,
    jax.random.fold_in(key, 1),
    num=config.synthetic_pairs,
    labels=config.synthetic_labels,
    label_noise=config.synthetic_label_noise,
  )
  arrays = {
    "chosen": np.asarray(comps.chosen, np.int32),
    "rejected": np.asarray(comps.rejected, np.int32),
    "mask": np.asarray(comps.mask, np.bool_),
    "gold_chosen": np.asarray(comps.gold_chosen, np.float32),
    "gold_rejected": np.asarray(comps.gold_rejected, np.float32),
  }
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    np.savez(f, fingerprint=np.asarray(fingerprint), **arrays)
  os.replace(tmp, path)
  logging.info(
    "Made %d synthetic comparisons in %.1f s (%s)",
    config.synthetic_pairs,
    time.time() - start,
    path,
  )
  return arrays


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


def _dataset_dir(workdir: str) -> str:
  return os.path.join(
    workdir, DATA_DIR, "preference_pairs", DATASET_NAME, str(data_lib.PreferencePairs.VERSION)
  )


def load_data(config: TrainConfig, workdir: str | os.PathLike, *, prepare: bool = True) -> RunData:
  """Builds (or reuses) the run's train and held-out pairs.

  Args:
    config: the run's settings.
    workdir: the run directory; the data lives under ``<workdir>/data``.
    prepare: build the TFDS dataset if needed (training). False (reports) reads the
      prepared dataset as it is, so the source files need not exist any more.

  Returns:
    A :class:`RunData`.
  """
  workdir = os.fspath(workdir)
  if config.is_synthetic:
    world_cfg = synthetic.WorldConfig(**config.synthetic_world)
    arrays = synthetic_comparisons(config, workdir)
    n = arrays["chosen"].shape[0]
    n_test = int(round(config.test_fraction * n)) if config.test_fraction > 0 else 0
    if config.test_fraction > 0:
      n_test = min(max(n_test, 1), n - 1)
    train = _synthetic_split(arrays, slice(0, n - n_test), world_cfg.prompt_len)
    test = _synthetic_split(arrays, slice(n - n_test, n), world_cfg.prompt_len) if n_test else None
    info = {
      "source": SYNTHETIC,
      "train_pairs": n - n_test,
      "test_pairs": n_test,
      "synthetic": {
        **dataclasses.asdict(world_cfg),
        "seed": config.synthetic_seed,
        "pairs": config.synthetic_pairs,
        "labels": config.synthetic_labels,
        "label_noise": config.synthetic_label_noise,
      },
    }
    return RunData(train, test, SYNTHETIC, world_cfg.vocab_size, world_cfg.seq_len, info)

  data_dir = os.path.join(workdir, DATA_DIR)
  if prepare:
    try:
      builder = data_lib.build_preference_dataset(
        list(config.data),
        data_dir=data_dir,
        max_len=config.max_len,
        name=DATASET_NAME,
        test_files=list(config.test_data),
        test_fraction=0.0 if config.test_data else config.test_fraction,
        split_seed=config.split_seed,
        skip_malformed=config.skip_malformed,
      )
    except ValueError as e:
      if "was built from other files or settings" in str(e):
        raise ConfigError(
          "data",
          config.data,
          f"{data_dir} holds a dataset built from other files or settings; use another --workdir",
        ) from None
      raise
  else:
    builder = tfds.builder_from_directory(_dataset_dir(workdir))
  splits = set(builder.info.splits.keys())
  train = builder.as_data_source(split="train")
  test = builder.as_data_source(split="test") if "test" in splits else None
  if test is not None and len(test) == 0:
    logging.warning("The held-out split is empty; training without evaluation")
    test = None
  metadata = dict(builder.info.metadata)
  info = {
    "source": "jsonl",
    "files": list(config.data),
    "test_files": list(config.test_data),
    "dataset": _dataset_dir(workdir),
    "train_pairs": len(train),
    "test_pairs": 0 if test is None else len(test),
    "read_stats": metadata.get("splits", {}),
  }
  return RunData(train, test, "byte", tokenizer.VOCAB_SIZE, config.max_len, info)


def make_iterator(
  data: Any, config: TrainConfig, max_len: int, *, train: bool
) -> data_lib.BatchIterator:
  """The training iterator (shuffled, endless) or an evaluation pass (data order, padded)."""
  if config.bucket:
    shape = {"bucket_lengths": data_lib.power_of_two_buckets(max_len)}
  else:
    shape = {"max_len": max_len}
  if train:
    try:
      return data_lib.BatchIterator(data, batch_size=config.batch_size, seed=config.seed, **shape)
    except ValueError as e:
      if "exceeds the number of examples" in str(e):
        raise ConfigError(
          "batch_size", config.batch_size, f"exceeds the {_num_examples(data)} training pairs"
        ) from None
      raise
  return data_lib.BatchIterator(
    data,
    batch_size=config.batch_size,
    seed=0,
    shuffle=False,
    drop_remainder=False,
    num_epochs=1,
    **shape,
  )


def _num_examples(data: Any) -> int:
  return data["chosen"].shape[0] if isinstance(data, Mapping) else len(data)


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
  out = {"chosen": [], "rejected": [], "prompt": []}
  for start in range(0, len(data), 1024):
    for e in data_lib.get_examples(data, range(start, min(start + 1024, len(data)))):
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


# ----------------------------------------------------------------------------- model, steps


def make_optimizer(config: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with linear warm-up and cosine decay to 10%, global-norm clipping first.

  Returns:
    ``(optimizer, learning_rate_schedule)``.
  """
  warmup = min(config.warmup_steps, config.steps)
  schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=config.learning_rate,
    warmup_steps=warmup,
    decay_steps=max(config.steps, warmup + 1),
    end_value=0.1 * config.learning_rate,
  )
  decay_mask = lambda params: jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)
  parts = [optax.clip_by_global_norm(config.grad_clip)] if config.grad_clip > 0 else []
  parts.append(optax.adamw(schedule, weight_decay=config.weight_decay, mask=decay_mask))
  return optax.chain(*parts), schedule


def make_loss_fn(config: TrainConfig):
  """The pairwise loss of ``config`` plus the reward-centring penalty (if ``center_coef``)."""
  kwargs = {"label_smoothing": config.label_smoothing}
  if config.margin is not None:
    kwargs["margin"] = config.margin
  base = preference.get_loss(config.loss, **kwargs)
  if not config.center_coef:
    return base

  def loss_fn(rewards_chosen, rewards_rejected, *, weights=None, labels=None):
    return base(
      rewards_chosen, rewards_rejected, weights=weights, labels=labels
    ) + preference.reward_centering_penalty(
      rewards_chosen, rewards_rejected, coef=config.center_coef
    )

  return loss_fn


@functools.lru_cache(maxsize=8)
def _jitted_init(model: RewardModel):
  # One compiled initialiser per architecture and process (a fresh jax.jit would recompile).
  return jax.jit(model.init)


def init_state(
  config: TrainConfig, model: RewardModel, optimizer: optax.GradientTransformation, max_len: int
) -> train_state_lib.TrainState:
  """The step-0 train state: parameters from ``fold_in(key(seed), 0)``, step keys from
  ``fold_in(key(seed), 1)``."""
  root = jax.random.key(config.seed)
  tokens = jnp.zeros((1, min(max_len, 8)), jnp.int32)
  mask = jnp.ones(tokens.shape, bool)
  params = _jitted_init(model)(jax.random.fold_in(root, 0), tokens, mask)
  return train_state_lib.create_train_state(params, optimizer, jax.random.fold_in(root, 1))


def abstract_state(
  config: TrainConfig, model: RewardModel, optimizer: optax.GradientTransformation, max_len: int
) -> Any:
  """Shapes, dtypes and a default-device sharding of :func:`init_state` (nothing computed);
  a restore template."""
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shapes = jax.eval_shape(lambda: init_state(config, model, optimizer, max_len))
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def _to_host(state: Any) -> Any:
  """NumPy copy of a state (typed PRNG keys as their key data) for a fast checkpoint write.

  Replicated multi-device arrays are slow to hand to orbax (seconds for the first save);
  the checkpoint manager restores key data into typed keys from the template.
  """

  def leaf(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(jax.device_get(x))

  return jax.tree.map(leaf, state)


def _eval_body(params, batch, *, apply_fn, axis_name):
  return rm_step.reward_model_eval_step(params, batch, apply_fn=apply_fn, axis_name=axis_name)


def make_eval_step(apply_fn, *, mode: str) -> parallel.ParallelStep:
  """``peval(params, batch) -> {'rewards_chosen', 'rewards_rejected'}`` for ``mode``."""
  return parallel.make_parallel_step(
    functools.partial(_eval_body, apply_fn=apply_fn), mode=mode, donate=False
  )


def score_pairs(
  peval: parallel.ParallelStep, params: Any, data: Any, config: TrainConfig, max_len: int
) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
  """Rewards of every pair of ``data``, in data order.

  Args:
    peval: from :func:`make_eval_step`.
    params: placed for ``peval``'s mode (e.g. the train state's params).
    data: arrays or a record source.
    config: gives the batch size and bucketing.
    max_len: the longest batch.

  Returns:
    ``(arrays, subset_names)``: ``arrays`` holds ``rewards_chosen``, ``rewards_rejected``
    ``[n]`` float32; ``chosen_len``, ``rejected_len``, ``prompt_len`` ``[n]`` int; and, when
    the data has them, ``subset_id`` (into ``subset_names``), ``gold_chosen``,
    ``gold_rejected`` ``[n]``.
  """
  parts: dict[str, list[np.ndarray]] = {}
  iterator = make_iterator(data, config, max_len, train=False)
  for batch in iterator:
    valid = batch["index"] >= 0
    out = peval(params, peval.shard_batch({k: batch[k] for k in _SCORE_KEYS}))
    out = jax.device_get(peval.unreplicate(out))
    cols = {
      "index": batch["index"],
      "rewards_chosen": out["rewards_chosen"],
      "rewards_rejected": out["rewards_rejected"],
      "chosen_len": batch["chosen_mask"].sum(1),
      "rejected_len": batch["rejected_mask"].sum(1),
    }
    for key in ("prompt_len", "subset_id", "gold_chosen", "gold_rejected"):
      if key in batch:
        cols[key] = batch[key]
    for key, value in cols.items():
      parts.setdefault(key, []).append(np.asarray(value)[valid])
  arrays = {k: np.concatenate(v) for k, v in parts.items()}
  order = np.argsort(arrays.pop("index"), kind="stable")
  arrays = {k: v[order] for k, v in arrays.items()}
  arrays.setdefault("prompt_len", np.zeros_like(arrays["chosen_len"]))
  return arrays, iterator.subset_names


# ----------------------------------------------------------------------------- metrics file


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The rows of a ``metrics.jsonl`` (a torn last line is ignored)."""
  rows = []
  if not os.path.exists(path):
    return rows
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(row, dict) and "step" in row:
        rows.append(row)
  return rows


def truncate_metrics(path: str | os.PathLike, *, max_step: int) -> int:
  """Drops the rows after ``max_step`` (and torn lines); returns how many were dropped."""
  path = os.fspath(path)
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = f.readlines()
  kept = [json.dumps(r) + "\n" for r in read_metrics(path) if int(r["step"]) <= max_step]
  if len(kept) == len(lines):
    return 0
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.writelines(kept)
  os.replace(tmp, path)
  logging.info("Removed %d rows after step %d from %s", len(lines) - len(kept), max_step, path)
  return len(lines) - len(kept)


class _MetricsWriter:
  """Appends JSON rows, flushed at once (a killed process loses at most a torn line)."""

  def __init__(self, path: str):
    self._file = open(path, "a")

  def write(self, row: Mapping[str, Any]) -> None:
    self._file.write(json.dumps(report_lib.to_json(row), allow_nan=False) + "\n")
    self._file.flush()

  def close(self) -> None:
    self._file.close()


def _write_json(path: str, value: Any) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(report_lib.to_json(value), f, indent=2)
    f.write("\n")
  os.replace(tmp, path)


class _DropLibraryInfo(std_logging.Filter):
  """Drops INFO/DEBUG records logged from orbax (tens of lines per checkpoint)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def quiet_orbax_logging() -> None:
  """Hides orbax's INFO logging on the absl handler (warnings and errors still show).

  For scripts: call it once after ``absl.app.run`` has installed the handler.
  """
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _DropLibraryInfo) for f in handler.filters):
    handler.addFilter(_DropLibraryInfo())


def _format_duration(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# ----------------------------------------------------------------------------- the loop


def _run_description(config: TrainConfig, model_config, data: RunData) -> dict[str, Any]:
  return {
    "config": config.to_json(),
    "model_config": rm_io.config_to_json(model_config),
    "pooling": config.pooling,
    "tokenizer": data.tokenizer,
    "preset": config.model,
    "dataset": {k: v for k, v in data.info.items() if k != "read_stats"},
  }


def train_and_evaluate(config: TrainConfig, workdir: str | os.PathLike) -> dict[str, Any]:
  """Trains (or resumes training) a reward model; see the module docstring.

  Args:
    config: the run's settings (validated with :func:`validate_config`).
    workdir: the run directory (created if needed).

  Returns:
    A summary: ``step`` (the final step), ``resumed_from`` (the restored step or None),
    ``eval`` (the last held-out metrics or None), ``train`` (the last training row or
    None), ``pairs_per_sec`` (throughput of this process, compilation excluded where
    possible) and ``report`` (the written report paths, or None).

  Raises:
    ConfigError: for a bad setting, naming it.
    jaxrm.data.PreferenceDataError: for a malformed data line (file, line, field).
    FloatingPointError: with ``nonfinite='raise'``, at the first non-finite step.
  """
  workdir = os.path.abspath(os.fspath(workdir))
  config = _resolve_paths(config)
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  data = load_data(config, workdir)
  model_config = presets.preset(config.model, vocab_size=data.vocab_size, max_len=data.max_len)
  model = RewardModel(model_config, pooling=config.pooling)
  optimizer, schedule = make_optimizer(config)
  train_iter = make_iterator(data.train, config, data.max_len, train=True)
  host_state = init_state(config, model, optimizer, data.max_len)
  description = _run_description(config, model_config, data)
  metrics_path = os.path.join(workdir, METRICS_FILE)
  has_test = data.test is not None

  with checkpoint_lib.CheckpointManager(
    os.path.join(workdir, CHECKPOINT_DIR),
    max_to_keep=config.keep_checkpoints,
    best_metric=BEST_METRIC if has_test else None,
  ) as ckpt:
    restored = ckpt.restore_latest(template=host_state)
    start, last_eval = 0, None
    if restored is not None:
      host_state, extra, start = restored
      check_resumable(extra.get("config", {}), config, workdir)
      train_iter.set_state(extra["data"])
      saved = extra.get("metrics") or {}
      last_eval = {k[len("eval_") :]: v for k, v in saved.items() if k.startswith("eval_")}
      last_eval = last_eval or None
      logging.info("Resuming from the checkpoint at step %d in %s", start, ckpt.directory)
    truncate_metrics(metrics_path, max_step=start)
    _write_json(os.path.join(workdir, CONFIG_FILE), description)

    step_fn = functools.partial(
      rm_step.reward_model_step,
      apply_fn=model.apply,
      loss_fn=make_loss_fn(config),
      optimizer=optimizer,
      nonfinite=config.nonfinite,
    )
    pstep = parallel.make_parallel_step(step_fn, mode=config.parallel)
    peval = make_eval_step(model.apply, mode=pstep.mode)
    state = pstep.put_state(host_state)
    del host_state
    logging.info(
      "Training %s (%s parameters, %s pooling, %s) for %d steps on %d pairs, "
      "batch %d, mode %s on %d device(s); workdir %s",
      config.model,
      f"{presets.param_count(model_config):,}",
      config.pooling,
      config.loss,
      config.steps,
      _num_examples(data.train),
      config.batch_size,
      pstep.mode,
      pstep.num_devices,
      workdir,
    )

    writer = _MetricsWriter(metrics_path)
    step, last_row = start, None
    pending: list[dict[str, jax.Array]] = []
    intervals: list[tuple[int, float]] = []  # (pairs, seconds) per training row
    t_interval, excluded = time.time(), 0.0
    try:
      while step < config.steps:
        batch = next(train_iter)
        state, step_metrics = pstep(
          state, pstep.shard_batch({k: batch[k] for k in _STEP_KEYS if k in batch})
        )
        step += 1
        pending.append(step_metrics)
        if config.nonfinite == "raise":
          train_state_lib.raise_if_nonfinite(pstep.unreplicate(step_metrics), step=step - 1)

        if step % config.log_every == 0 or step == config.steps:
          fetched = jax.device_get([pstep.unreplicate(m) for m in pending])
          seconds = max(time.time() - t_interval - excluded, 1e-9)
          intervals.append((len(fetched) * config.batch_size, seconds))
          rate = len(fetched) * config.batch_size / seconds
          mean = lambda key, rows=fetched: float(np.mean([float(m[key]) for m in rows]))
          last_row = {
            "split": "train",
            "step": step,
            "epoch": train_iter.get_state()["epoch"],
            "loss": mean("loss"),
            "accuracy": mean("accuracy"),
            "margin": mean("margin"),
            "grad_norm": mean("grad_norm"),
            "nonfinite_steps": int(sum(bool(m["nonfinite"]) for m in fetched)),
            "num_skipped": int(fetched[-1]["num_skipped"]),
            "learning_rate": float(schedule(step - 1)),
            "steps_in_row": len(fetched),
            "pairs_per_sec": rate,
            "eta_sec": (config.steps - step) * config.batch_size / rate,
          }
          writer.write(last_row)
          logging.info(
            "step %d/%d | loss %.4f | accuracy %.3f | %.1f pairs/s | ETA %s",
            step,
            config.steps,
            last_row["loss"],
            last_row["accuracy"],
            rate,
            _format_duration(last_row["eta_sec"]),
          )
          pending, t_interval, excluded = [], time.time(), 0.0

        checkpoint_now = step % config.checkpoint_every == 0 or step == config.steps
        if has_test and (step % config.eval_every == 0 or checkpoint_now):
          jax.block_until_ready(state)
          t0 = time.time()
          scores, _ = score_pairs(peval, state.params, data.test, config, data.max_len)
          last_eval = report_lib.heldout_metrics(
            scores["rewards_chosen"], scores["rewards_rejected"]
          )
          writer.write({"split": "eval", "step": step, **last_eval})
          logging.info(
            "eval at step %d | accuracy %.4f (± %.4f) | log-loss %.4f | ECE %.4f | %d pairs",
            step,
            last_eval["accuracy"],
            last_eval["accuracy_stderr"],
            last_eval["log_loss"],
            last_eval["ece"],
            last_eval["num_pairs"],
          )
          excluded += time.time() - t0
        if checkpoint_now:
          jax.block_until_ready(state)
          t0 = time.time()
          saved_metrics = {"step": step}
          if last_row is not None:
            saved_metrics.update({f"train_{k}": last_row[k] for k in ("loss", "accuracy")})
          if has_test:
            saved_metrics.update({f"eval_{k}": v for k, v in last_eval.items()})
          ckpt.save(
            step,
            _to_host(pstep.unreplicate(state)),
            {**description, "data": train_iter.get_state(), "metrics": saved_metrics},
            metrics={BEST_METRIC: last_eval["accuracy"]} if has_test else None,
          )
          excluded += time.time() - t0
    finally:
      writer.close()

    steady = intervals[1:] or intervals
    pairs_per_sec = (sum(p for p, _ in steady) / sum(s for _, s in steady)) if steady else None
    summary = {
      "workdir": workdir,
      "step": step,
      "resumed_from": start if restored else None,
      "eval": last_eval,
      "train": last_row,
      "pairs_per_sec": pairs_per_sec,
      "report": None,
    }
    if config.report:
      num_params = sum(np.size(x) for x in jax.tree.leaves(pstep.unreplicate(state).params))
      summary["report"] = _write_report(
        workdir,
        workdir,
        config=config,
        data=data,
        model_config=model_config,
        params=state.params,
        num_params=num_params,
        peval=peval,
        step=step,
        best_step=ckpt.best_step() if has_test else None,
        checkpoint_steps=ckpt.all_steps(),
      )
  logging.info(
    "Done: step %d%s",
    step,
    "" if last_eval is None else f", held-out accuracy {last_eval['accuracy']:.4f}",
  )
  return summary


# ----------------------------------------------------------------------------- report


def _training_section(config: TrainConfig, workdir: str, step: int) -> dict[str, Any]:
  rows = [r for r in read_metrics(os.path.join(workdir, METRICS_FILE)) if r["step"] <= step]
  train = [r for r in rows if r.get("split") == "train"]
  evals = [r for r in rows if r.get("split") == "eval"]
  rates = [r["pairs_per_sec"] for r in train[1:]] or [r["pairs_per_sec"] for r in train]
  # Ties go to the later step, as in the checkpoint manager's choice of the best.
  best = max(evals, key=lambda r: (r["accuracy"], r["step"])) if evals else None
  loss_kwargs = {"margin": config.margin} if config.margin is not None else {}
  return {
    "loss": config.loss,
    "margin": loss_kwargs.get("margin", "loss default"),
    "label_smoothing": config.label_smoothing,
    "center_coef": config.center_coef,
    "optimizer": "AdamW, linear warm-up, cosine decay to 10%",
    "learning_rate": config.learning_rate,
    "warmup_steps": config.warmup_steps,
    "weight_decay": config.weight_decay,
    "grad_clip": config.grad_clip,
    "batch_size": config.batch_size,
    "steps": config.steps,
    "seed": config.seed,
    "parallel": config.parallel,
    "bucket": config.bucket,
    "final_train_loss": train[-1]["loss"] if train else None,
    "final_train_accuracy": train[-1]["accuracy"] if train else None,
    "pairs_per_sec_median": float(np.median(rates)) if rates else None,
    "best_eval_step": best["step"] if best else None,
    "best_eval_accuracy": best["accuracy"] if best else None,
  }


def _write_report(
  workdir: str,
  out_dir: str,
  *,
  config: TrainConfig,
  data: RunData,
  model_config,
  params: Any,
  num_params: int,
  peval: parallel.ParallelStep,
  step: int,
  best_step: int | None,
  checkpoint_steps: Sequence[int],
) -> dict[str, str]:
  """Scores the held-out pairs with ``params`` (placed for ``peval``) and writes the report."""
  eval_data, split = (data.test, "test") if data.test is not None else (data.train, "train")
  scores, subset_names = score_pairs(peval, params, eval_data, config, data.max_len)
  read_stats = data.info.get("read_stats", {})
  splits = {"train": split_statistics(data.train, read_stats.get("train"))}
  if data.test is not None:
    splits["test"] = split_statistics(data.test, read_stats.get("test"))
  data_section = {k: v for k, v in data.info.items() if k != "read_stats"}
  data_section["splits"] = splits
  sections = {
    "run": {
      "workdir": workdir,
      "step": step,
      "best_checkpoint_step": best_step,
      "checkpoint_steps": list(checkpoint_steps),
      "evaluated_on": split,
    },
    "model": {
      "preset": config.model,
      "pooling": config.pooling,
      "tokenizer": data.tokenizer,
      "num_params": int(num_params),
      "config": rm_io.config_to_json(model_config),
    },
    "data": data_section,
    "training": _training_section(config, workdir, step),
  }
  gold = (scores["gold_chosen"], scores["gold_rejected"]) if "gold_chosen" in scores else None
  report = report_lib.build_report(
    scores["rewards_chosen"],
    scores["rewards_rejected"],
    response_lengths=(
      scores["chosen_len"] - scores["prompt_len"],
      scores["rejected_len"] - scores["prompt_len"],
    ),
    subset_ids=scores.get("subset_id"),
    subset_names=subset_names,
    gold=gold,
    sections=sections,
  )
  paths = report_lib.write_report(
    report,
    out_dir,
    rewards_chosen=scores["rewards_chosen"],
    rewards_rejected=scores["rewards_rejected"],
  )
  logging.info(
    "Wrote the report of step %d (%s split, accuracy %.4f) to %s",
    step,
    split,
    report["heldout"]["accuracy"],
    paths["markdown"],
  )
  return paths


def read_checkpoint_extra(workdir: str | os.PathLike, step: int) -> dict[str, Any]:
  """The JSON ``extra`` of checkpoint ``step`` of a run, read without restoring arrays."""
  path = os.path.join(os.fspath(workdir), CHECKPOINT_DIR, str(int(step)), "extra")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoint at step {step}: {path} does not exist")
  return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(path)


class RestoredRun(NamedTuple):
  """A checkpoint of a run, from :func:`restore_run`."""

  config: TrainConfig
  model_config: Any  # jaxrm.models.transformer.TransformerConfig
  state: train_state_lib.TrainState  # on the default device
  extra: dict[str, Any]  # the checkpoint's JSON extra
  step: int
  steps: list[int]  # every saved step


def restore_run(workdir: str | os.PathLike, *, step: int | None = None) -> RestoredRun:
  """Restores checkpoint ``step`` (default: the latest) of a :func:`train_and_evaluate` run.

  The model and optimizer are rebuilt from the checkpoint's own ``extra`` (``config``,
  ``model_config``, ``pooling``), so only the run directory is needed.

  Raises:
    FileNotFoundError: if the run has no checkpoint (at ``step``).
  """
  workdir = os.path.abspath(os.fspath(workdir))
  ckpt_dir = os.path.join(workdir, CHECKPOINT_DIR)
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f"{workdir} holds no checkpoints ({ckpt_dir} does not exist)")
  # max_to_keep=None: opening the manager must never delete a checkpoint.
  with checkpoint_lib.CheckpointManager(ckpt_dir, max_to_keep=None) as ckpt:
    steps = ckpt.all_steps()
    if not steps:
      raise FileNotFoundError(f"{ckpt_dir} holds no checkpoints")
    step = steps[-1] if step is None else int(step)
    if step not in steps:
      raise FileNotFoundError(f"no checkpoint at step {step} in {ckpt_dir}; saved steps: {steps}")
    extra = read_checkpoint_extra(workdir, step)
    config = TrainConfig.from_json(extra["config"])
    model_config = rm_io.config_from_json(extra["model_config"])
    model = RewardModel(model_config, pooling=extra["pooling"])
    optimizer, _ = make_optimizer(config)
    template = abstract_state(config, model, optimizer, model_config.max_len)
    state, extra = ckpt.restore(step, template)
  return RestoredRun(config, model_config, state, extra, step, steps)


def write_run_report(
  workdir: str | os.PathLike, *, step: int | None = None, out_dir: str | os.PathLike | None = None
) -> dict[str, str]:
  """Writes the report of a saved checkpoint of a run.

  Args:
    workdir: the run directory of :func:`train_and_evaluate`.
    step: the checkpoint (default: the latest).
    out_dir: where to write (default: ``workdir`` for the latest step, else
      ``<workdir>/reports/step_<step>``).

  Returns:
    The written paths (see :func:`jaxrm.io.report.write_report`).

  Raises:
    FileNotFoundError: if the run has no checkpoint (at ``step``).
  """
  workdir = os.path.abspath(os.fspath(workdir))
  run = restore_run(workdir, step=step)
  data = load_data(run.config, workdir, prepare=False)
  evals = [
    r
    for r in read_metrics(os.path.join(workdir, METRICS_FILE))
    if r.get("split") == "eval" and r["step"] in run.steps
  ]
  best_step = max(evals, key=lambda r: (r["accuracy"], r["step"]))["step"] if evals else None
  if out_dir is None:
    out_dir = (
      workdir if run.step == run.steps[-1] else os.path.join(workdir, "reports", f"step_{run.step}")
    )
  model = RewardModel(run.model_config, pooling=run.extra["pooling"])
  return _write_report(
    workdir,
    os.fspath(out_dir),
    config=run.config,
    data=data,
    model_config=run.model_config,
    params=run.state.params,
    num_params=sum(np.size(x) for x in jax.tree.leaves(run.state.params)),
    peval=make_eval_step(model.apply, mode="jit"),
    step=run.step,
    best_step=best_step,
    checkpoint_steps=run.steps,
  )
