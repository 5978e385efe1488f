"""Subword tokenizers: a checkpoint's ``tokenizer.json`` (Hugging Face ``tokenizers``) and BPE
training on local text.

:class:`HFTokenizer` has the interface of :class:`jaxrm.data.tokenizer.ByteTokenizer`
(``pad_id``, ``bos_id``, ``eos_id``, ``vocab_size``, ``encode``, ``decode``,
``batch_encode``), so code written against the byte tokenizer takes either. It adds
:meth:`HFTokenizer.apply_chat_template`, which renders the checkpoint's Jinja chat template
the way Hugging Face transformers does (sandboxed ``jinja2`` environment with
``trim_blocks``/``lstrip_blocks``, the ``loopcontrols`` extension, ``raise_exception`` and the
special tokens as variables).

Conventions: ``encode`` never inserts special tokens by itself (the ``tokenizer.json``
post-processor is not applied); ``add_bos``/``add_eos`` add them explicitly, as for the byte
tokenizer. The special tokens come from ``tokenizer_config.json`` (``bos_token``,
``eos_token``, ``pad_token``; strings or ``{"content": ...}`` objects) or, failing that,
``special_tokens_map.json``. Without a pad token the EOS id pads (pads are masked out, so the
id does not matter to jaxrm models); without BOS or EOS, ``add_bos``/``add_eos`` raise.

Example::

  tok = HFTokenizer.from_pretrained("path/to/checkpoint")
  text = tok.apply_chat_template([{"role": "user", "content": "Hi"}],
                                 add_generation_prompt=True)
  batch = tok.batch_encode([text], max_len=128, padding_side="left")

  tok = train_bpe_tokenizer(texts, vocab_size=4096)   # no checkpoint: train on local text
  tok.save("my_tokenizer/")
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
import datetime
import json
import os
from typing import Any

import tokenizers

from jaxrm.data.tokenizer import BatchEncoding, check_ids, pack_ids

_SPECIAL = ("bos_token", "eos_token", "pad_token")


def _token_text(value: Any, key: str, path: str) -> str | None:
  """A special token's text: a string, ``{"content": string}`` or None."""
  text = value.get("content") if isinstance(value, dict) else value
  if text is not None and not isinstance(text, str):
    raise ValueError(f"tokenizer folder {path!r}: {key} must be a string, got {value!r}")
  return text


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from None


class HFTokenizer:
  """A ``tokenizers.Tokenizer`` with jaxrm's tokenizer interface and the chat template.

  Attributes:
    tokenizer: the underlying ``tokenizers.Tokenizer``.
    special_tokens: ``{'bos_token': ..., 'eos_token': ..., 'pad_token': ...}`` strings or None.
    chat_template: the Jinja chat template string, or None.
    pad_id, bos_id, eos_id: ids of the special tokens (``bos_id``/``eos_id`` may be None).
    vocab_size: number of ids including added tokens.
  """

  def __init__(
    self,
    tokenizer: tokenizers.Tokenizer,
    *,
    special_tokens: dict[str, str | None] | None = None,
    chat_template: str | None = None,
  ):
    self.tokenizer = tokenizer
    self.special_tokens = {k: (special_tokens or {}).get(k) for k in _SPECIAL}
    self.chat_template = chat_template
    ids = {}
    for key, token in self.special_tokens.items():
      if token is None:
        ids[key] = None
        continue
      ids[key] = tokenizer.token_to_id(token)
      if ids[key] is None:
        raise ValueError(f"special token {key}={token!r} is not in the tokenizer's vocabulary")
    self.bos_id = ids["bos_token"]
    self.eos_id = ids["eos_token"]
    self.pad_id = ids["pad_token"] if ids["pad_token"] is not None else self.eos_id
    if self.pad_id is None:
      self.pad_id = 0
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike) -> HFTokenizer:
    """Loads ``<path>/tokenizer.json`` and its ``tokenizer_config.json`` (local files only).

    Args:
      path: a checkpoint or tokenizer folder.

    Returns:
      The tokenizer.
    """
    path = str(path)
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
      raise ValueError(f"tokenizer folder {path!r} has no tokenizer.json")
    try:
      tok = tokenizers.Tokenizer.from_file(file)
    except Exception as e:  # noqa: BLE001  (tokenizers raises a bare Exception)
      raise ValueError(f"{file} is not a valid tokenizer file ({e})") from None
    config = _read_json(os.path.join(path, "tokenizer_config.json"))
    fallback = _read_json(os.path.join(path, "special_tokens_map.json"))
    special = {k: _token_text(config.get(k, fallback.get(k)), k, path) for k in _SPECIAL}
    template = config.get("chat_template")
    if template is None and os.path.isfile(os.path.join(path, "chat_template.jinja")):
      with open(os.path.join(path, "chat_template.jinja")) as f:
        template = f.read()
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
      by_name = {t.get("name"): t.get("template") for t in template}
      template = by_name.get("default")
    return cls(tok, special_tokens=special, chat_template=template)

  def save(self, path: str | os.PathLike) -> None:
    """Writes ``tokenizer.json`` and ``tokenizer_config.json`` (special tokens, template)."""
    path = str(path)
    os.makedirs(path, exist_ok=True)
    self.tokenizer.save(os.path.join(path, "tokenizer.json"))
    config = {k: v for k, v in self.special_tokens.items() if v is not None}
    if self.chat_template is not None:
      config["chat_template"] = self.chat_template
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
      json.dump(config, f, indent=2, ensure_ascii=False)

  def _special(self, add_bos: bool, add_eos: bool) -> tuple[int | None, int | None]:
    if add_bos and self.bos_id is None:
      raise ValueError("add_bos=True but the tokenizer has no bos_token")
    if add_eos and self.eos_id is None:
      raise ValueError("add_eos=True but the tokenizer has no eos_token")
    return (self.bos_id if add_bos else None), (self.eos_id if add_eos else None)

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Encodes ``text`` (special-token strings in it map to their ids)."""
    if not isinstance(text, str):
      raise TypeError(f"text must be a str, got {type(text).__name__}")
    bos, eos = self._special(add_bos, add_eos)
    ids = self.tokenizer.encode(text, add_special_tokens=False).ids
    return ([bos] if bos is not None else []) + ids + ([eos] if eos is not None else [])

  def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
    """Decodes ids (a list or 1-D array); special tokens are dropped by default."""
    arr = check_ids(ids, self.vocab_size)
    return self.tokenizer.decode(
      [int(i) for i in arr.tolist()], skip_special_tokens=skip_special_tokens
    )

  def batch_encode(
    self,
    texts: Sequence[str],
    *,
    max_len: int,
    truncation_side: str = "left",
    padding_side: str = "right",
    add_bos: bool = False,
    add_eos: bool = False,
  ) -> BatchEncoding:
    """Encodes strings to ``[batch, max_len]`` arrays; as :func:`jaxrm.data.tokenizer.batch_encode`."""
    if isinstance(texts, str):
      raise TypeError("texts must be a sequence of strings, got a single str")
    bos, eos = self._special(add_bos, add_eos)
    bodies = [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]
    return pack_ids(
      bodies,
      max_len=max_len,
      pad_id=self.pad_id,
      bos_id=bos,
      eos_id=eos,
      truncation_side=truncation_side,
      padding_side=padding_side,
    )

  def apply_chat_template(
    self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = False, **kwargs
  ) -> str:
    """Renders ``messages`` (``[{'role': ..., 'content': ...}, ...]``) with the chat template.

    Args:
      messages: the conversation.
      add_generation_prompt: append the assistant-turn opener (for prompting a policy).
      **kwargs: extra template variables.

    Returns:
      The rendered string (tokenize it with :meth:`encode`; templates that start with
      ``bos_token`` already contain it).
    """
    if self.chat_template is None:
      raise ValueError("the tokenizer has no chat_template (tokenizer_config.json)")
    return _compiled_template(self.chat_template).render(
      messages=list(messages),
      add_generation_prompt=add_generation_prompt,
      **{k: v for k, v in self.special_tokens.items() if v is not None},
      **kwargs,
    )


def _compiled_template(template: str):
  """Compiles a chat template as transformers does (sandboxed, trim/lstrip blocks)."""
  import jinja2  # noqa: PLC0415 - only needed for chat templates
  import jinja2.ext  # noqa: PLC0415
  from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: PLC0415

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)

  env = ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
  )
  env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(
    x, ensure_ascii=False, indent=indent, **kw
  )
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = strftime_now
  return env.from_string(template)


def train_bpe_tokenizer(
  texts: Iterable[str],
  *,
  vocab_size: int,
  min_frequency: int = 2,
  special_tokens: Sequence[str] = ("<pad>", "<s>", "</s>"),
  chat_template: str | None = None,
) -> HFTokenizer:
  """Trains a byte-level BPE tokenizer (GPT-2 style) on local text.

  Byte-level: every string is encodable and round-trips exactly through ``decode``.

  Args:
    texts: training strings (any iterable; consumed once).
    vocab_size: target vocabulary size including the 256 byte symbols and the special
      tokens (at least ``256 + len(special_tokens)``).
    min_frequency: minimum pair count for a merge.
    special_tokens: ``(pad, bos, eos, *others)``; they get ids ``0, 1, 2, ...``.
    chat_template: optional Jinja chat template stored with the tokenizer.

  Returns:
    The trained :class:`HFTokenizer` (``save`` it next to the run).
  """
  special_tokens = list(special_tokens)
  if len(special_tokens) < 3:
    raise ValueError(f"special_tokens must start with (pad, bos, eos), got {special_tokens}")
  if vocab_size < 256 + len(special_tokens):
    raise ValueError(
      f"vocab_size must be at least {256 + len(special_tokens)} (256 bytes + special tokens), "
      f"got {vocab_size}"
    )
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
    vocab_size=vocab_size,
    min_frequency=min_frequency,
    special_tokens=special_tokens,
    initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(texts, trainer)
  special = dict(
    pad_token=special_tokens[0], bos_token=special_tokens[1], eos_token=special_tokens[2]
  )
  return HFTokenizer(tok, special_tokens=special, chat_template=chat_template)
