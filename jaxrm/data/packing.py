"""Preference pairs packed one per row: the shared prefix once, then both responses.

A pair's chosen and rejected sequences share their prompt (and often more: the longest common
token prefix). The two-row layout computes that prefix twice. :func:`pack_pairs` builds one
row per pair instead,

  ``common prefix | chosen's own tokens | rejected's own tokens | pads``,

with ``segments`` 0 / 1 / 2 (pads -1). Run with ``segments``
(:class:`jaxrm.models.reward_model.RewardModel`, :class:`jaxrm.models.transformer.Transformer`)
each response attends to the prefix and to itself only, at its own positions, so both rewards
are those of the two-row layout up to float rounding, for fewer tokens when the prefix is long:
a long prompt and short responses (HH-RLHF at 128 bytes: 20% fewer token slots and the 4x256
GPT-2 step 1.13x as fast, ``benchmarks/packed_step.py``). The attention's work grows with the
longer row: at the README's width-64 HH model it takes back what the slots save.
BUILD_NOTES.md, "Issue 14, session 40", measures where packing pays.

Example::

  packed = pack_pairs(batch, multiple=32)
  rewards = model.apply(params, packed["packed"], packed["packed_mask"],
                        segments=packed["packed_segments"])  # [batch, 2]: chosen, rejected
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

_PAIR_KEYS = ("chosen", "chosen_mask", "rejected", "rejected_mask")


def pack_pairs(batch: Mapping[str, Any], *, multiple: int) -> dict[str, np.ndarray]:
  """One row per pair: the common token prefix of chosen and rejected, then each one's rest.

  Args:
    batch: ``'chosen'``, ``'rejected'`` ``[batch, seq]`` integer tokens and
      ``'chosen_mask'``, ``'rejected_mask'`` ``[batch, seq]`` bool (True on real tokens; pads
      anywhere, each row's real tokens taken in order); other keys (``'weight'``,
      ``'label'``, ...) are passed through.
    multiple: packed rows are padded to the smallest multiple of this that fits the longest,
      at most ``2 * seq`` (fewer distinct shapes to compile with a larger one; one at least
      as long as every packed row of a run gives all its batches one length).

  Returns:
    The other keys of ``batch`` and ``'packed'`` ``[batch, P]`` int32 tokens,
    ``'packed_mask'`` ``[batch, P]`` bool and ``'packed_segments'`` ``[batch, P]`` int32:
    0 on the common prefix, 1 on chosen's remaining tokens, 2 on rejected's, -1 on pads (the
    packed batch of :func:`jaxrm.steps.rm_step.reward_model_step`, ``rm_step.PACKED_KEYS``).
    ``P`` is at most ``2 * seq`` (the longer of chosen's and rejected's ``seq``), which the
    backbone accepts for ``seq <= max_len``.

  Raises:
    ValueError: a missing key, shapes that differ, or ``multiple < 1``.
  """
  if not isinstance(multiple, (int, np.integer)) or isinstance(multiple, bool) or multiple < 1:
    raise ValueError(f"multiple must be an int >= 1, got {multiple!r}")
  missing = [k for k in _PAIR_KEYS if k not in batch]
  if missing:
    raise ValueError(f"batch lacks {missing} (has {sorted(batch)})")
  arrays = {k: np.asarray(batch[k]) for k in _PAIR_KEYS}
  n = arrays["chosen"].shape[0] if arrays["chosen"].ndim == 2 else -1
  for k, a in arrays.items():
    if a.ndim != 2 or a.shape[0] != n:
      raise ValueError(
        f"batch['{k}'] must have shape [batch, seq] with the chosen batch, got {a.shape}"
      )
  for tokens, mask in (("chosen", "chosen_mask"), ("rejected", "rejected_mask")):
    if arrays[tokens].shape != arrays[mask].shape:
      raise ValueError(
        f"batch['{mask}'] must have the shape of batch['{tokens}'] {arrays[tokens].shape}, "
        f"got {arrays[mask].shape}"
      )
  rows = []
  for i in range(n):
    chosen = arrays["chosen"][i][arrays["chosen_mask"][i].astype(bool)]
    rejected = arrays["rejected"][i][arrays["rejected_mask"][i].astype(bool)]
    both = min(len(chosen), len(rejected))
    differ = np.flatnonzero(chosen[:both] != rejected[:both])
    common = int(differ[0]) if differ.size else both
    rows.append((chosen, rejected, common))
  longest = max((len(c) + len(r) - k for c, r, k in rows), default=0)
  seq = max(arrays["chosen"].shape[1], arrays["rejected"].shape[1])
  length = min(max(1, -(-longest // multiple)) * multiple, max(2 * seq, 1))
  packed = np.zeros((n, length), np.int32)
  segments = np.full((n, length), -1, np.int32)
  for i, (chosen, rejected, common) in enumerate(rows):
    row = np.concatenate([chosen, rejected[common:]])
    packed[i, : len(row)] = row
    segments[i, :common] = 0
    segments[i, common : len(chosen)] = 1
    segments[i, len(chosen) : len(row)] = 2
  out = {k: v for k, v in batch.items() if k not in _PAIR_KEYS}
  out.update(packed=packed, packed_mask=segments >= 0, packed_segments=segments)
  return out
