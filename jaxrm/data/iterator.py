"""Deterministic, resumable batch iterator over preference data, with length bucketing.

The order of epoch ``e`` is a pure function of ``(seed, e)``: a permutation drawn from
``np.random.default_rng([seed, e])``. The iterator's position is three integers (plus
``num_examples`` and ``batch_size``, kept to catch resuming on other data), so
``get_state()`` is a small JSON-serialisable dict and ``set_state`` resumes with exactly the
batch an uninterrupted run would have produced next.

Shapes are static. Every batch has ``batch_size`` rows. With ``drop_remainder=True`` (default)
the last ``num_examples % batch_size`` examples of each epoch's order are left out (different
ones each epoch); with ``drop_remainder=False`` the last batch is filled with copies of its
first example that have ``weight`` 0 and ``index`` -1 (copies of real data rather than empty
rows, so that no model output on them is NaN; weight-aware losses ignore them).

Length bucketing (``bucket_lengths``): the shuffled order is cut into windows of
``bucket_window`` batches; within a window examples are sorted (stably, so randomly within a
bucket) by the smallest allowed length that fits them, cut into batches, and the batches of
the window are shuffled; each batch is padded to the smallest allowed
length that fits its longest sequence. ``jit`` then compiles at most ``len(bucket_lengths)``
shapes, and far less padding is processed. Without bucketing every batch is padded to one
length.

Data:

* a dict of numpy arrays with a common leading axis ``[num_examples, ...]`` (the synthetic
  world): every key is gathered; a key ``k`` with a ``k + '_mask'`` ``[num_examples, seq]``
  bool array is a sequence, re-padded (on the right) to the batch length;
* a random-access source of preference records (``len`` and ``[i]``: a ``tfds`` data source,
  a list of :class:`~jaxrm.data.preference_files.PreferenceExample`, or record dicts), read once
  at construction for lengths and subset names.

Every batch also has ``'weight'`` ``[batch]`` float32 (the data's weight, or 1; 0 on
padding rows) and ``'index'`` ``[batch]`` int32 (the example's index in the data; -1 on
padding rows). Batches from a record source hold ``'chosen'``, ``'chosen_mask'``,
``'rejected'``, ``'rejected_mask'`` ``[batch, seq]`` (right-padded), ``'weight'``,
``'prompt_len'``, ``'subset_id'`` (index into ``subset_names``) and ``'index'``.

Multi-host: with ``process_count > 1`` each process computes the same global batches and
returns its rows ``[process_index * b, (process_index + 1) * b)``, ``b = batch_size //
process_count``; the state is the same on every process.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import math
from typing import Any

import numpy as np

from jaxrm.data import preference_files

_STATE_KEYS = ("seed", "epoch", "batch_in_epoch", "num_examples", "batch_size")
_SEQUENCE_SOURCE_KEYS = ("chosen", "rejected")


def power_of_two_buckets(max_len: int, *, min_len: int = 32) -> tuple[int, ...]:
  """Allowed batch lengths ``min_len, 2 min_len, 4 min_len, ...`` below ``max_len``, then
  ``max_len``; e.g. ``power_of_two_buckets(300) == (32, 64, 128, 256, 300)``."""
  if max_len < 1:
    raise ValueError(f"max_len must be >= 1, got {max_len}")
  if min_len < 1:
    raise ValueError(f"min_len must be >= 1, got {min_len}")
  lengths = []
  length = min_len
  while length < max_len:
    lengths.append(length)
    length *= 2
  return tuple(lengths) + (max_len,)


def _fit_width(x: np.ndarray, width: int) -> np.ndarray:
  """Crops or zero-pads axis 1 on the right to ``width``."""
  if x.shape[1] >= width:
    return x[:, :width]
  pad = np.zeros((x.shape[0], width - x.shape[1]) + x.shape[2:], x.dtype)
  return np.concatenate([x, pad], axis=1)


class BatchIterator:
  """Deterministic, resumable iterator of fixed-size numpy batches.

  Example::

    it = BatchIterator(data, batch_size=32, seed=0,
                       bucket_lengths=power_of_two_buckets(512))
    batch = next(it)
    state = it.get_state()          # e.g. json.dump(state, f) beside the checkpoint
    ...
    it = BatchIterator(data, batch_size=32, seed=0,
                       bucket_lengths=power_of_two_buckets(512))
    it.set_state(state)             # next(it) continues the interrupted run

  Attributes:
    num_examples: examples in the data.
    batches_per_epoch: batches in every epoch.
    lengths: ``[num_examples]`` int, the longer sequence of each example (None for arrays
      without ``_mask`` keys).
    subset_names: sorted subset names (record sources; ``()`` for arrays).
  """

  def __init__(
    self,
    data: Mapping[str, Any] | Sequence[Any],
    *,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    drop_remainder: bool = True,
    max_len: int | None = None,
    bucket_lengths: Sequence[int] | None = None,
    bucket_window: int = 16,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
  ):
    """Creates the iterator at the start of epoch 0.

    Args:
      data: a dict of arrays or a random-access source of records (module docstring).
      batch_size: global batch size (rows summed over processes).
      seed: a non-negative int; the shuffle order depends only on it and the epoch.
      shuffle: shuffle each epoch (False: data order, e.g. for evaluation).
      drop_remainder: drop the incomplete last batch of each epoch, or pad it with
        zero-weight copies.
      max_len: without bucketing, the padded length of every batch (default: the arrays'
        width, or the longest example of a record source).
      bucket_lengths: increasing allowed batch lengths (e.g. :func:`power_of_two_buckets`);
        the last must fit the longest example. None: no bucketing.
      bucket_window: batches per sorting window when bucketing.
      num_epochs: stop after this many epochs (None: never).
      process_index: this process's index, in ``[0, process_count)``.
      process_count: number of processes sharing each global batch; divides batch_size.
    """
    for name, value, low in (
      ("batch_size", batch_size, 1),
      ("seed", seed, 0),
      ("bucket_window", bucket_window, 1),
      ("process_count", process_count, 1),
    ):
      if not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if batch_size % process_count:
      raise ValueError(
        f"batch_size ({batch_size}) must be divisible by process_count ({process_count})"
      )
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
    if num_epochs is not None and num_epochs < 1:
      raise ValueError(f"num_epochs must be None or >= 1, got {num_epochs}")
    self._batch_size = int(batch_size)
    self._seed = int(seed)
    self._shuffle = shuffle
    self._drop_remainder = drop_remainder
    self._bucket_window = int(bucket_window)
    self._num_epochs = num_epochs
    self._local = slice(
      process_index * (batch_size // process_count),
      (process_index + 1) * (batch_size // process_count),
    )

    if isinstance(data, Mapping):
      self._init_arrays(data)
    else:
      self._init_records(data)
    if self.num_examples == 0:
      raise ValueError("data must hold at least one example")
    if drop_remainder and self.num_examples < batch_size:
      raise ValueError(
        f"batch_size ({batch_size}) exceeds the number of examples "
        f"({self.num_examples}) with drop_remainder=True: no batch to yield"
      )

    longest = int(self.lengths.max()) if self.lengths is not None else 0
    if bucket_lengths is not None:
      if self.lengths is None:
        raise ValueError("bucket_lengths needs sequences: the data has no '<key>_mask' arrays")
      buckets = [int(b) for b in bucket_lengths]
      if not buckets or buckets[0] < 1 or any(a >= b for a, b in zip(buckets, buckets[1:])):
        raise ValueError(f"bucket_lengths must be positive and increasing, got {bucket_lengths}")
      if buckets[-1] < longest:
        raise ValueError(
          f"bucket_lengths must reach the longest example ({longest}), got {tuple(buckets)}"
        )
      self._buckets = np.asarray(buckets)
    else:
      width = self._default_width if max_len is None else int(max_len)
      if width is not None and width < longest:
        raise ValueError(f"max_len={width} is shorter than the longest example ({longest})")
      self._buckets = None if width is None else np.asarray([width])
    if (
      self._buckets is not None
      and self._default_width is not None
      and not self._right_padded
      and any(self._buckets != self._default_width)
    ):
      raise ValueError(
        "re-padding sequences (bucket_lengths or max_len) needs right-padded "
        "masks (True then False) in every '<key>_mask' array"
      )

    self._epoch = 0
    self._batch_in_epoch = 0
    self._plan_epoch = -1
    self._plan: list[np.ndarray] = []
    self.batches_per_epoch = (
      self.num_examples // batch_size
      if drop_remainder
      else math.ceil(self.num_examples / batch_size)
    )

  # ------------------------------------------------------------------ data adapters

  def _init_arrays(self, data: Mapping[str, Any]) -> None:
    self._arrays = {k: np.asarray(v) for k, v in data.items()}
    self._source = None
    self.subset_names: tuple[str, ...] = ()
    sizes = {k: v.shape[0] if v.ndim else None for k, v in self._arrays.items()}
    counts = [s for s in sizes.values() if s is not None]
    n = max(set(counts), key=counts.count) if counts else 0  # the most common size
    for key, size in sizes.items():
      if size != n:
        raise ValueError(
          f"data[{key!r}] must have leading axis {n} like the other arrays, "
          f"got shape {self._arrays[key].shape}"
        )
    self.num_examples = int(n)
    self._sequence_keys = [
      k for k in self._arrays if not k.endswith("_mask") and f"{k}_mask" in self._arrays
    ]
    self.lengths = None
    self._default_width = None
    self._right_padded = True
    for key in self._sequence_keys:
      mask = self._arrays[f"{key}_mask"]
      if mask.ndim != 2 or mask.dtype != np.bool_ or self._arrays[key].shape[:2] != mask.shape:
        raise ValueError(
          f"data[{key + '_mask'!r}] must be bool [num_examples, seq] like "
          f"data[{key!r}] {self._arrays[key].shape}, got {mask.dtype} "
          f"{mask.shape}"
        )
      length = mask.sum(axis=1)
      self.lengths = length if self.lengths is None else np.maximum(self.lengths, length)
      self._right_padded &= bool(
        np.array_equal(mask, np.arange(mask.shape[1])[None, :] < length[:, None])
      )
      if self._default_width not in (None, mask.shape[1]):
        raise ValueError(
          f"all sequences must have one width; data[{key!r}] has "
          f"{mask.shape[1]}, others {self._default_width}"
        )
      self._default_width = mask.shape[1]

  def _init_records(self, source: Sequence[Any]) -> None:
    if not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
      raise ValueError(
        f"data must be a dict of arrays or support len() and [i], got {type(source).__name__}"
      )
    self._arrays = None
    self._source = source
    self.num_examples = len(source)
    self._sequence_keys = list(_SEQUENCE_SOURCE_KEYS)
    self._right_padded = True
    lengths = np.zeros((self.num_examples,), np.int64)
    subsets = set()
    chunk = 1024
    for start in range(0, self.num_examples, chunk):
      stop = min(start + chunk, self.num_examples)
      for i, e in enumerate(preference_files.get_examples(source, range(start, stop)), start):
        lengths[i] = max(len(e.chosen), len(e.rejected))
        subsets.add(e.subset)
    self.lengths = lengths
    self.subset_names = tuple(sorted(subsets))
    self._subset_index = {name: i for i, name in enumerate(self.subset_names)}
    self._default_width = int(lengths.max()) if self.num_examples else 1

  def _gather(
    self, indices: np.ndarray, valid: np.ndarray, width: int | None
  ) -> dict[str, np.ndarray]:
    if self._arrays is not None:
      batch = {k: v[indices] for k, v in self._arrays.items()}
      if width is not None:
        for key in self._sequence_keys:
          batch[key] = _fit_width(batch[key], width)
          batch[f"{key}_mask"] = _fit_width(batch[f"{key}_mask"], width)
      weight = batch.get("weight", np.ones(len(indices), np.float32))
      batch["weight"] = np.where(valid, weight, 0).astype(np.float32)
      batch["index"] = np.where(valid, indices, -1).astype(np.int32)
      return batch
    b = len(indices)
    batch = {k: np.zeros((b, width), np.int32) for k in _SEQUENCE_SOURCE_KEYS}
    batch.update({f"{k}_mask": np.zeros((b, width), np.bool_) for k in _SEQUENCE_SOURCE_KEYS})
    examples = preference_files.get_examples(self._source, indices)
    for row, e in enumerate(examples):
      for key in _SEQUENCE_SOURCE_KEYS:
        tokens = getattr(e, key)
        batch[key][row, : len(tokens)] = tokens
        batch[f"{key}_mask"][row, : len(tokens)] = True
    batch["weight"] = np.asarray(
      [e.weight if ok else 0.0 for e, ok in zip(examples, valid)], np.float32
    ).reshape(b)
    batch["prompt_len"] = np.asarray([e.prompt_len for e in examples], np.int32).reshape(b)
    batch["subset_id"] = np.asarray(
      [self._subset_index[e.subset] for e in examples], np.int32
    ).reshape(b)
    batch["index"] = np.where(valid, indices, -1).astype(np.int32)
    return batch

  # ------------------------------------------------------------------ order

  def epoch_batches(self, epoch: int) -> list[np.ndarray]:
    """The global batches of ``epoch``: a list of example-index arrays (the last may be
    short when ``drop_remainder=False``); a pure function of ``(seed, epoch)``."""
    n, b = self.num_examples, self._batch_size
    rng = np.random.default_rng([self._seed, epoch])
    order = rng.permutation(n) if self._shuffle else np.arange(n)
    if self._drop_remainder:
      order = order[: n // b * b]
    if self._buckets is None or len(self._buckets) == 1:
      return [order[i : i + b] for i in range(0, len(order), b)]
    window = self._bucket_window * b
    bucket_of = np.searchsorted(self._buckets, self.lengths)
    batches = []
    for start in range(0, len(order), window):
      chunk = order[start : start + window]
      # Sort by bucket, not by exact length: ties keep the shuffled order, so batches
      # differ between epochs even when a window spans the whole data.
      chunk = chunk[np.argsort(bucket_of[chunk], kind="stable")]
      group = [chunk[i : i + b] for i in range(0, len(chunk), b)]
      if self._shuffle:
        group = [group[j] for j in rng.permutation(len(group))]
      batches += group
    return batches

  def batch_length(self, indices: np.ndarray) -> int | None:
    """The padded length of a batch holding ``indices`` (None: arrays kept as they are)."""
    if self._buckets is None:
      return None
    longest = int(self.lengths[indices].max()) if self.lengths is not None else 0
    return int(self._buckets[np.searchsorted(self._buckets, longest)])

  # ------------------------------------------------------------------ iteration

  def __iter__(self) -> BatchIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._batch_in_epoch >= self.batches_per_epoch:
      self._epoch += 1
      self._batch_in_epoch = 0
    if self._num_epochs is not None and self._epoch >= self._num_epochs:
      raise StopIteration
    if self._plan_epoch != self._epoch:
      self._plan = self.epoch_batches(self._epoch)
      self._plan_epoch = self._epoch
    indices = self._plan[self._batch_in_epoch]
    self._batch_in_epoch += 1
    width = self.batch_length(indices)
    padded = np.concatenate([indices, np.full(self._batch_size - len(indices), indices[0])])
    valid = np.arange(self._batch_size) < len(indices)
    return self._gather(padded[self._local], valid[self._local], width)

  # ------------------------------------------------------------------ state

  def get_state(self) -> dict[str, int]:
    """The position, as a JSON-serialisable dict of ints."""
    return {
      "seed": self._seed,
      "epoch": self._epoch,
      "batch_in_epoch": self._batch_in_epoch,
      "num_examples": self.num_examples,
      "batch_size": self._batch_size,
    }

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Moves to a position saved by :meth:`get_state` of an iterator on the same data.

    Raises:
      ValueError: if ``state`` is not a dict of integers with every key, or seed,
        num_examples or batch_size differ from this iterator's (resuming would silently give
        other batches).
    """
    if not isinstance(state, Mapping):
      raise ValueError(f"state must be a dict from get_state(), got {type(state).__name__}")
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing:
      raise ValueError(f"state is missing {missing}; expected keys {list(_STATE_KEYS)}")
    not_ints = {
      k: state[k]
      for k in _STATE_KEYS
      if isinstance(state[k], bool) or not isinstance(state[k], (int, np.integer))
    }
    if not_ints:
      raise ValueError(f"state values must be integers, got {not_ints}")
    state = {k: int(state[k]) for k in _STATE_KEYS}
    for key, mine in (
      ("seed", self._seed),
      ("num_examples", self.num_examples),
      ("batch_size", self._batch_size),
    ):
      if state[key] != mine:
        raise ValueError(f"state[{key!r}] is {state[key]} but this iterator has {key}={mine}")
    if state["epoch"] < 0 or not 0 <= state["batch_in_epoch"] <= self.batches_per_epoch:
      raise ValueError(
        f"state position out of range: epoch={state['epoch']}, "
        f"batch_in_epoch={state['batch_in_epoch']} "
        f"(batches_per_epoch={self.batches_per_epoch})"
      )
    self._epoch = state["epoch"]
    self._batch_in_epoch = state["batch_in_epoch"]
