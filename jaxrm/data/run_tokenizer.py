"""The tokenizer of a run and its text convention, stored with the run.

Every text run (reward model, SFT, policy, best-of-n) tokenises with one tokenizer and one
convention, and writes both under ``<workdir>/tokenizer/`` so that a later process (scoring
strings, sampling, export) reproduces the training tokens exactly:

* ``jaxrm_tokenizer.json``: the convention: ``kind`` (``'byte'`` or ``'hf'``), ``name``
  (:func:`tokenizer_name`), ``vocab_size``, ``pad_id``/``bos_id``/``eos_id``, ``add_bos``,
  ``add_eos`` (each sequence is ``[BOS] + prompt + response + [EOS]``, prompt and response
  encoded separately and concatenated, see :func:`jaxrm.data.preference_records.tokenize_pair`),
  ``min_prompt_fraction`` (the truncation rule) and ``chat_template`` (whether the tokenizer
  carries one; the text itself is in ``tokenizer_config.json``);
* for ``kind='hf'``: the tokenizer's own ``tokenizer.json`` and ``tokenizer_config.json``
  (special tokens, chat template), as :meth:`jaxrm.data.hf_tokenizer.HFTokenizer.save` writes
  them, so the folder is also a Hugging Face tokenizer folder.

The byte tokenizer (:mod:`jaxrm.data.tokenizer`) is named ``'byte'``; a ``tokenizer.json``
tokenizer is named ``'hf:<12 hex digits>'``, a digest of its vocabulary, merges and special
tokens, so two runs share a name exactly when they tokenise the same way (a policy and the
reward model that scores it must).

Example::

  tok = RunTokenizer.from_source("path/to/checkpoint")   # or "" for the byte tokenizer
  tok.save(workdir)
  tok = RunTokenizer.load(workdir)
  ids = tok.encode_pair("\\n\\nHuman: hi\\n\\nAssistant:", " hello", max_len=64)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

from jaxrm.data import tokenizer as byte_tokenizer
from jaxrm.io.files import atomic_write

TOKENIZER_DIR = "tokenizer"
CONVENTION_FILE = "jaxrm_tokenizer.json"
KINDS = ("byte", "hf")


def tokenizer_name(tok: Any) -> str:
  """``'byte'`` for the byte tokenizer, ``'hf:<digest>'`` for a ``tokenizer.json`` tokenizer."""
  if isinstance(tok, byte_tokenizer.ByteTokenizer):
    return "byte"
  content = json.dumps(
    {
      "tokenizer": json.loads(tok.tokenizer.to_str()),
      "special": tok.special_tokens,
    },
    sort_keys=True,
  )
  return "hf:" + hashlib.sha256(content.encode()).hexdigest()[:12]


def has_tokenizer_json(path: str | os.PathLike) -> bool:
  """Whether ``path`` is a folder holding a ``tokenizer.json``."""
  return bool(path) and os.path.isfile(os.path.join(os.fspath(path), "tokenizer.json"))


@dataclasses.dataclass(frozen=True)
class RunTokenizer:
  """A tokenizer and the text convention of a run.

  Attributes:
    tok: :class:`jaxrm.data.tokenizer.ByteTokenizer` or
      :class:`jaxrm.data.hf_tokenizer.HFTokenizer`.
    add_bos: sequences start with BOS.
    add_eos: sequences end with EOS (the reward head's read-out token).
    min_prompt_fraction: see :func:`jaxrm.data.preference_records.tokenize_pair`.
  """

  tok: Any
  add_bos: bool = True
  add_eos: bool = True
  min_prompt_fraction: float = 0.5

  @property
  def kind(self) -> str:
    return "byte" if isinstance(self.tok, byte_tokenizer.ByteTokenizer) else "hf"

  @property
  def name(self) -> str:
    return tokenizer_name(self.tok)

  @property
  def vocab_size(self) -> int:
    return int(self.tok.vocab_size)

  @property
  def pad_id(self) -> int:
    return int(self.tok.pad_id)

  @property
  def bos_id(self) -> int | None:
    return self.tok.bos_id

  @property
  def eos_id(self) -> int | None:
    return self.tok.eos_id

  @classmethod
  def from_source(cls, path: str | os.PathLike | None, **convention: Any) -> RunTokenizer:
    """The byte tokenizer (``path`` empty or None) or the ``tokenizer.json`` of a folder.

    Raises:
      ValueError: ``path`` is not a folder with ``tokenizer.json``, or the tokenizer lacks a
        BOS/EOS token the convention needs (naming it).
    """
    if not path:
      return cls(byte_tokenizer.ByteTokenizer(), **convention)
    from jaxrm.data.hf_tokenizer import HFTokenizer  # pylint: disable=import-outside-toplevel

    path = os.fspath(path)
    if not has_tokenizer_json(path):
      raise ValueError(f"tokenizer folder {path!r} has no tokenizer.json")
    out = cls(HFTokenizer.from_pretrained(path), **convention)
    out.check()
    return out

  def check(self) -> None:
    """Raises ``ValueError`` if the convention needs a special token the tokenizer lacks."""
    if self.add_bos and self.bos_id is None:
      raise ValueError("the tokenizer has no bos_token but the convention adds BOS (add_bos)")
    if self.add_eos and self.eos_id is None:
      raise ValueError("the tokenizer has no eos_token but the convention adds EOS (add_eos)")

  def convention(self) -> dict[str, Any]:
    """The JSON description written to ``jaxrm_tokenizer.json``."""
    return {
      "kind": self.kind,
      "name": self.name,
      "vocab_size": self.vocab_size,
      "pad_id": self.pad_id,
      "bos_id": self.bos_id,
      "eos_id": self.eos_id,
      "add_bos": self.add_bos,
      "add_eos": self.add_eos,
      "min_prompt_fraction": self.min_prompt_fraction,
      "chat_template": getattr(self.tok, "chat_template", None) is not None,
      "sequence": "[BOS] + encode(prompt) + encode(response) + [EOS]",
    }

  def save(self, workdir: str | os.PathLike) -> str:
    """Writes ``<workdir>/tokenizer/`` (see the module docstring); returns that folder.

    Raises:
      ValueError: the folder already holds a different tokenizer or convention (a run
        directory keeps one tokenizer for its whole life).
    """
    folder = os.path.join(os.fspath(workdir), TOKENIZER_DIR)
    existing = os.path.join(folder, CONVENTION_FILE)
    if os.path.isfile(existing):
      with open(existing) as f:
        stored = json.load(f)
      if stored != self.convention():
        raise ValueError(
          f"{folder} holds another tokenizer or convention ({stored.get('name')}, "
          f"add_bos={stored.get('add_bos')}, add_eos={stored.get('add_eos')}) than this run's "
          f"({self.name}, add_bos={self.add_bos}, add_eos={self.add_eos}); use another workdir"
        )
      return folder
    os.makedirs(folder, exist_ok=True)
    if self.kind == "hf":
      self.tok.save(folder)
    atomic_write(existing, json.dumps(self.convention(), indent=2) + "\n")
    return folder

  @classmethod
  def load(cls, workdir: str | os.PathLike) -> RunTokenizer:
    """The tokenizer stored with a run by :meth:`save`.

    Raises:
      FileNotFoundError: the run has no ``tokenizer/jaxrm_tokenizer.json``.
      ValueError: the stored tokenizer does not match its recorded name.
    """
    folder = os.path.join(os.fspath(workdir), TOKENIZER_DIR)
    path = os.path.join(folder, CONVENTION_FILE)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{workdir} stores no tokenizer ({path} does not exist)")
    with open(path) as f:
      stored = json.load(f)
    if stored.get("kind") not in KINDS:
      raise ValueError(f"{path}: kind must be one of {KINDS}, got {stored.get('kind')!r}")
    convention = {
      k: stored[k] for k in ("add_bos", "add_eos", "min_prompt_fraction") if k in stored
    }
    out = cls.from_source(folder if stored["kind"] == "hf" else None, **convention)
    if out.name != stored.get("name"):
      raise ValueError(
        f"{folder}: the stored tokenizer is {out.name}, {CONVENTION_FILE} records "
        f"{stored.get('name')!r} (the folder was modified)"
      )
    return out

  def encode_pair(self, prompt: str, response: str, *, max_len: int) -> tuple[list[int], int]:
    """``(ids, prompt_len)`` of one prompt/response under the run's truncation rule.

    Exactly the tokens :func:`jaxrm.data.preference_records.tokenize_pair` gives the chosen
    (or rejected) side of a pair with this response as the longer one.
    """
    from jaxrm.data.preference_records import tokenize_pair  # pylint: disable=C0415

    pair = tokenize_pair(
      prompt,
      response,
      response,
      max_len=max_len,
      add_bos=self.add_bos,
      add_eos=self.add_eos,
      min_prompt_fraction=self.min_prompt_fraction,
      tok=self.tok,
    )
    return pair.chosen.tolist(), pair.prompt_len

  def decode(self, ids: Any) -> str:
    """Text of ``ids`` (special tokens dropped)."""
    return self.tok.decode([int(i) for i in ids])
