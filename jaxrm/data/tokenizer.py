"""Byte-level tokenizer: UTF-8 bytes plus three special tokens, nothing to download.

Token ids:

* ``PAD_ID = 0`` pads sequences (its mask entry is False),
* ``BOS_ID = 1`` begins a sequence, ``EOS_ID = 2`` ends one,
* byte ``b`` (0..255) of the UTF-8 encoding is token ``b + 3`` (``BYTE_OFFSET``),

so ``VOCAB_SIZE = 259``. Every string round-trips exactly through :func:`encode` and
:func:`decode`. A sequence cut inside a multi-byte character (e.g. by truncation) is not valid
UTF-8; :func:`decode` then replaces the broken bytes with U+FFFD (``errors='replace'``) instead of
raising, so decoding never fails on model output.

Example::

  >>> encode("hi", add_bos=True, add_eos=True)
  [1, 107, 108, 2]
  >>> decode([1, 107, 108, 2])
  'hi'
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
BYTE_OFFSET = 3
VOCAB_SIZE = 256 + BYTE_OFFSET

_SIDES = ("left", "right")


def encode(text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
  """Encodes a string as byte tokens.

  Args:
    text: the string; encoded as UTF-8 (strictly: a lone surrogate raises
      ``UnicodeEncodeError``).
    add_bos: prepend ``BOS_ID``.
    add_eos: append ``EOS_ID``.

  Returns:
    A list of ``len(text.encode('utf-8')) + add_bos + add_eos`` token ids.
  """
  if not isinstance(text, str):
    raise TypeError(f"text must be a str, got {type(text).__name__}")
  ids = [b + BYTE_OFFSET for b in text.encode("utf-8")]
  if add_bos:
    ids.insert(0, BOS_ID)
  if add_eos:
    ids.append(EOS_ID)
  return ids


def decode(ids: Iterable[int]) -> str:
  """Decodes byte tokens to a string, skipping ``PAD_ID``, ``BOS_ID`` and ``EOS_ID``.

  Byte sequences that are not valid UTF-8 (e.g. a character cut by truncation) become U+FFFD
  (Python's ``errors='replace'``).

  Args:
    ids: token ids, any iterable of ints (a list or a 1-D integer array).

  Returns:
    The decoded string.

  Raises:
    ValueError: if an id is outside ``[0, VOCAB_SIZE)``.
  """
  arr = check_ids(ids, VOCAB_SIZE)
  if arr.size == 0:
    return ""
  byte_ids = arr[arr >= BYTE_OFFSET] - BYTE_OFFSET
  return bytes(byte_ids.astype(np.uint8).tolist()).decode("utf-8", errors="replace")


def check_ids(ids: Iterable[int], vocab_size: int) -> np.ndarray:
  """Returns ``ids`` as a 1-D integer array; raises ``ValueError`` naming a bad id and position.

  Args:
    ids: token ids, any iterable of ints (a list or a 1-D integer array).
    vocab_size: exclusive upper bound on the ids.
  """
  arr = np.asarray(ids) if hasattr(ids, "__array__") else np.asarray(list(ids))
  if arr.size == 0:
    return arr.reshape(0).astype(np.int64)
  if arr.ndim != 1:
    raise ValueError(f"ids must be 1-D, got shape {arr.shape}")
  if not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"ids must be integers, got dtype {arr.dtype}")
  bad = (arr < 0) | (arr >= vocab_size)
  if bad.any():
    raise ValueError(
      f"ids must lie in [0, {vocab_size}), got {int(arr[bad][0])} at position "
      f"{int(np.flatnonzero(bad)[0])}"
    )
  return arr


class BatchEncoding(NamedTuple):
  """Output of :func:`batch_encode`."""

  tokens: np.ndarray  # [batch, max_len] int32, PAD_ID where mask is False
  mask: np.ndarray  # [batch, max_len] bool, True on real tokens
  truncated: np.ndarray  # [batch] bool, True where the text was cut to fit max_len

  @property
  def num_truncated(self) -> int:
    """How many texts were truncated."""
    return int(self.truncated.sum())


def _check_side(value: str, name: str) -> None:
  if value not in _SIDES:
    raise ValueError(f"{name} must be 'left' or 'right', got {value!r}")


def batch_encode(
  texts: Sequence[str],
  *,
  max_len: int,
  truncation_side: str = "left",
  padding_side: str = "right",
  add_bos: bool = False,
  add_eos: bool = False,
) -> BatchEncoding:
  """Encodes a batch of strings into fixed-shape token and mask arrays.

  Truncation removes text bytes only: BOS and EOS (when requested) are always kept, so a
  left-truncated sequence is ``[BOS, last bytes..., EOS]`` and a right-truncated one is
  ``[BOS, first bytes..., EOS]``.

  Args:
    texts: ``batch`` strings.
    max_len: length of the output sequences; must exceed the number of special tokens.
    truncation_side: ``'left'`` keeps the end of an over-long text (the usual choice for
      prompts), ``'right'`` keeps its beginning.
    padding_side: where ``PAD_ID`` goes, ``'right'`` or ``'left'`` (positions are derived
      from the mask, so models give the same result for both).
    add_bos: prepend ``BOS_ID`` to each sequence.
    add_eos: append ``EOS_ID`` to each sequence.

  Returns:
    ``BatchEncoding(tokens [batch, max_len] int32, mask [batch, max_len] bool,
    truncated [batch] bool)``; ``.num_truncated`` counts the truncated texts.
  """
  if isinstance(texts, str):
    raise TypeError("texts must be a sequence of strings, got a single str")
  return pack_ids(
    [encode(text) for text in texts],
    max_len=max_len,
    pad_id=PAD_ID,
    bos_id=BOS_ID if add_bos else None,
    eos_id=EOS_ID if add_eos else None,
    truncation_side=truncation_side,
    padding_side=padding_side,
  )


def pack_ids(
  bodies: Sequence[Sequence[int]],
  *,
  max_len: int,
  pad_id: int,
  bos_id: int | None = None,
  eos_id: int | None = None,
  truncation_side: str = "left",
  padding_side: str = "right",
) -> BatchEncoding:
  """Packs token-id lists into fixed-shape arrays: the tokenizer-independent half of encoding.

  Truncation removes body tokens only; ``bos_id`` / ``eos_id`` (when not None) are always
  kept. See :func:`batch_encode` for the sides.

  Args:
    bodies: ``batch`` lists of token ids (without BOS/EOS).
    max_len: output length; must exceed the number of special tokens.
    pad_id: id written where the mask is False.
    bos_id: id prepended to each sequence, or None.
    eos_id: id appended to each sequence, or None.
    truncation_side: ``'left'`` or ``'right'``.
    padding_side: ``'left'`` or ``'right'``.

  Returns:
    :class:`BatchEncoding` with arrays ``[batch, max_len]``.
  """
  num_special = int(bos_id is not None) + int(eos_id is not None)
  if not isinstance(max_len, (int, np.integer)) or max_len <= num_special:
    raise ValueError(
      f"max_len must be an int > {num_special} (the number of special tokens), got {max_len!r}"
    )
  _check_side(truncation_side, "truncation_side")
  _check_side(padding_side, "padding_side")
  budget = max_len - num_special
  tokens = np.full((len(bodies), max_len), pad_id, dtype=np.int32)
  mask = np.zeros((len(bodies), max_len), dtype=np.bool_)
  truncated = np.zeros((len(bodies),), dtype=np.bool_)
  for i, body in enumerate(bodies):
    body = list(body)
    if len(body) > budget:
      truncated[i] = True
      body = body[len(body) - budget :] if truncation_side == "left" else body[:budget]
    ids = ([bos_id] if bos_id is not None else []) + body + ([eos_id] if eos_id is not None else [])
    start = 0 if padding_side == "right" else max_len - len(ids)
    tokens[i, start : start + len(ids)] = ids
    mask[i, start : start + len(ids)] = True
  return BatchEncoding(tokens, mask, truncated)


class ByteTokenizer:
  """The byte tokenizer as an object, for code that expects a tokenizer instance.

  Stateless: its methods are the module functions and its attributes the module constants.
  """

  pad_id = PAD_ID
  bos_id = BOS_ID
  eos_id = EOS_ID
  vocab_size = VOCAB_SIZE

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """See :func:`encode`."""
    return encode(text, add_bos=add_bos, add_eos=add_eos)

  def decode(self, ids: Iterable[int]) -> str:
    """See :func:`decode`."""
    return decode(ids)

  def batch_encode(self, texts: Sequence[str], **kwargs) -> BatchEncoding:
    """See :func:`batch_encode`."""
    return batch_encode(texts, **kwargs)


class PromptResponseEncoding(NamedTuple):
  """Output of :func:`encode_prompt_response`; arrays ``[batch, max_len]``."""

  tokens: np.ndarray  # int32, pad id where mask is False
  mask: np.ndarray  # bool, True on prompt and response tokens
  response_mask: np.ndarray  # bool, True on response tokens (EOS included)
  truncated: np.ndarray  # [batch] bool, True where prompt or response was cut


def encode_prompt_response(
  tokenizer: Any,
  prompts: Sequence[str],
  responses: Sequence[str],
  *,
  max_len: int,
  max_prompt_len: int | None = None,
  add_bos: bool = False,
  add_eos: bool = True,
) -> PromptResponseEncoding:
  """Encodes (prompt, response) pairs for SFT: ``[BOS] prompt response [EOS]``, right-padded.

  The prompt keeps its end (left truncation to ``max_prompt_len``, default ``max_len // 2``);
  the response keeps its beginning and fills the rest, EOS always kept when requested. The
  prompt and response are encoded separately and concatenated, so ``response_mask`` marks
  exactly the response's tokens (what :func:`jaxrm.steps.sft.sft_step` learns).

  Args:
    tokenizer: any object with ``encode(text) -> list[int]`` and ``pad_id``/``bos_id``/
      ``eos_id`` (:class:`ByteTokenizer`, :class:`jaxrm.data.hf_tokenizer.HFTokenizer`).
    prompts: ``batch`` prompt strings (e.g. a rendered chat template with the generation
      prompt).
    responses: ``batch`` response strings.
    max_len: output length.
    max_prompt_len: prompt token budget (BOS included).
    add_bos: prepend the BOS id.
    add_eos: append the EOS id after the response.

  Returns:
    :class:`PromptResponseEncoding`.
  """
  if isinstance(prompts, str) or isinstance(responses, str):
    raise TypeError("prompts and responses must be sequences of strings, not a single str")
  if len(prompts) != len(responses):
    raise ValueError(
      f"prompts and responses must have the same length, got {len(prompts)} and {len(responses)}"
    )
  max_prompt_len = max_len // 2 if max_prompt_len is None else max_prompt_len
  if not 1 <= max_prompt_len < max_len - int(add_eos):
    raise ValueError(
      f"max_prompt_len must be in [1, max_len - {int(add_eos)}) = [1, {max_len - int(add_eos)})"
      f", got {max_prompt_len}"
    )
  bos = [tokenizer.bos_id] if add_bos else []
  eos = [tokenizer.eos_id] if add_eos else []
  n = len(prompts)
  tokens = np.full((n, max_len), tokenizer.pad_id, np.int32)
  mask = np.zeros((n, max_len), bool)
  response_mask = np.zeros((n, max_len), bool)
  truncated = np.zeros((n,), bool)
  for i, (prompt, response) in enumerate(zip(prompts, responses)):
    p = bos + tokenizer.encode(prompt)
    if len(p) > max_prompt_len:
      p, truncated[i] = bos + p[len(p) - max_prompt_len + len(bos) :], True
    r = tokenizer.encode(response)
    budget = max_len - len(p) - len(eos)
    if len(r) > budget:
      r, truncated[i] = r[:budget], True
    ids = p + r + eos
    tokens[i, : len(ids)] = ids
    mask[i, : len(ids)] = True
    response_mask[i, len(p) : len(ids)] = True
  return PromptResponseEncoding(tokens, mask, response_mask, truncated)
