"""Scoring strings with a trained reward model, tokenised exactly as its training data was.

A text reward-model run (:mod:`jaxrm.train.reward_model` on JSONL files) stores its tokenizer
and convention under ``<run>/tokenizer/`` (:class:`jaxrm.data.run_tokenizer.RunTokenizer`).
:func:`score_texts` loads the model (:func:`jaxrm.io.rm_io.load_reward_model`) and that
tokenizer and scores

* whole dialogues, ``score_texts(run, texts)``: each is split as an HH-RLHF line is, the
  prompt ending just after its last ``"\\n\\nAssistant:"`` (the response is the rest); or
* ``score_texts(run, prompts=..., responses=...)``: as a prompt/chosen/rejected line is (a
  response starting with ``"\\n\\nAssistant:"`` gives that header to the prompt).

Prompt and response are encoded separately, joined as ``[BOS] + prompt + response + [EOS]``
and truncated to the run's ``data.max_len`` by the training rule
(:func:`jaxrm.data.preference_records.tokenize_pair`), so a string gets the tokens training
gave it whenever its pair was not truncated (and the HH split is the same, i.e. the two
dialogues of the pair differ only after their last ``Assistant:`` turn header, as in
HH-RLHF). A truncated pair's prompt is cut to fit the *longer* response, which a single
string cannot know: :func:`score_text_pairs` scores whole pairs (JSONL records) exactly as
training did.

Example::

  rewards = score_texts("runs/rm_hh", ["\\n\\nHuman: Hi\\n\\nAssistant: Hello!"])
  rewards = score_texts("runs/rm_hh", prompts=["\\n\\nHuman: Hi\\n\\nAssistant:"],
                        responses=[" Hello!"])
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
import os
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxrm.data.preference_records import (
  ASSISTANT_MARKER,
  parse_preference_record,
  split_shared_prompt,
  tokenize_pair,
)
from jaxrm.data.run_tokenizer import RunTokenizer
from jaxrm.io import rm_io


class EncodedTexts(NamedTuple):
  """Tokens of scored strings: ``tokens``/``mask`` ``[n, max_len]`` (right-padded),
  ``prompt_len`` ``[n]``."""

  tokens: np.ndarray
  mask: np.ndarray
  prompt_len: np.ndarray


def _check_strings(value: Any, name: str) -> list[str]:
  if isinstance(value, str) or not isinstance(value, Sequence):
    raise TypeError(f"{name} must be a list of strings, got {type(value).__name__}")
  for i, v in enumerate(value):
    if not isinstance(v, str):
      raise TypeError(f"{name}[{i}] must be a str, got {type(v).__name__}")
  return list(value)


def prompt_response_pairs(
  texts: Sequence[str] | None = None,
  *,
  prompts: Sequence[str] | None = None,
  responses: Sequence[str] | None = None,
) -> list[tuple[str, str]]:
  """``(prompt, response)`` per string, split as the training files' lines are (module doc)."""
  if (texts is None) == (prompts is None and responses is None):
    raise ValueError("give either texts or prompts= and responses=, not both or neither")
  if texts is not None:
    return [split_shared_prompt(t, t)[:2] for t in _check_strings(texts, "texts")]
  if prompts is None or responses is None:
    raise ValueError("prompts= and responses= must be given together")
  prompts, responses = _check_strings(prompts, "prompts"), _check_strings(responses, "responses")
  if len(prompts) != len(responses):
    raise ValueError(
      f"prompts and responses must have the same length, got {len(prompts)} and {len(responses)}"
    )
  out = []
  for p, r in zip(prompts, responses):
    if r.startswith(ASSISTANT_MARKER):
      p, r = p + ASSISTANT_MARKER, r[len(ASSISTANT_MARKER) :]
    out.append((p, r))
  return out


def run_max_len(extra: dict[str, Any], run_dir: str) -> int:
  """The ``data.max_len`` a text reward-model run was trained with (from its checkpoint)."""
  data = (extra.get("config") or {}).get("data") or {}
  if not data.get("files"):
    raise ValueError(
      f"{run_dir} is not a text reward-model run (it was trained on the synthetic world)"
    )
  return int(data["max_len"])


def encode_texts(
  tok: RunTokenizer,
  texts: Sequence[str] | None = None,
  *,
  prompts: Sequence[str] | None = None,
  responses: Sequence[str] | None = None,
  max_len: int,
) -> EncodedTexts:
  """Tokens of strings under a run's convention (see the module docstring)."""
  return encode_pairs(
    tok, prompt_response_pairs(texts, prompts=prompts, responses=responses), max_len=max_len
  )


def encode_pairs(
  tok: RunTokenizer, pairs: Sequence[tuple[str, str]], *, max_len: int
) -> EncodedTexts:
  """Tokens of ``(prompt, response)`` pairs already split by :func:`prompt_response_pairs`."""
  rows = [tok.encode_pair(p, r, max_len=max_len) for p, r in pairs]
  return _pad_rows(rows, max_len=max_len, pad_id=tok.pad_id)


def _pad_rows(rows: Sequence[Any], *, max_len: int, pad_id: int) -> EncodedTexts:
  n = len(rows)
  tokens = np.full((n, max_len), pad_id, np.int32)
  mask = np.zeros((n, max_len), bool)
  for i, (ids, _) in enumerate(rows):
    tokens[i, : len(ids)] = ids
    mask[i, : len(ids)] = True
  return EncodedTexts(tokens, mask, np.asarray([p for _, p in rows], np.int32))


def encode_records(
  tok: RunTokenizer, records: Sequence[dict[str, Any]], *, max_len: int
) -> tuple[EncodedTexts, EncodedTexts]:
  """Chosen and rejected tokens of preference records (JSONL objects, either form), exactly
  as the training data builder tokenises them."""
  chosen, rejected = [], []
  for i, record in enumerate(records):
    try:
      text = parse_preference_record(record)
    except ValueError as e:
      raise ValueError(f"records[{i}]: {e}") from None
    pair = tokenize_pair(
      text.prompt,
      text.chosen,
      text.rejected,
      max_len=max_len,
      add_bos=tok.add_bos,
      add_eos=tok.add_eos,
      min_prompt_fraction=tok.min_prompt_fraction,
      tok=tok.tok,
    )
    chosen.append((pair.chosen.tolist(), pair.prompt_len))
    rejected.append((pair.rejected.tolist(), pair.prompt_len))
  return (
    _pad_rows(chosen, max_len=max_len, pad_id=tok.pad_id),
    _pad_rows(rejected, max_len=max_len, pad_id=tok.pad_id),
  )


@functools.lru_cache(maxsize=4)
def _jitted(apply_fn):
  return jax.jit(apply_fn)


class TextRewardModel(NamedTuple):
  """A loaded text reward model: ``apply_fn``, ``params``, the run's tokenizer and
  ``max_len``, and the checkpoint's JSON ``extra``."""

  apply_fn: Any
  params: Any
  tok: RunTokenizer
  max_len: int
  extra: dict[str, Any]

  def score(self, enc: EncodedTexts, *, batch_size: int = 32) -> np.ndarray:
    """``[n]`` float32 rewards of encoded strings, ``batch_size`` per forward pass (one
    compiled shape: the last batch is padded)."""
    if not isinstance(batch_size, int) or batch_size < 1:
      raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    fn = _jitted(self.apply_fn)
    out = []
    for start in range(0, enc.tokens.shape[0], batch_size):
      tokens = enc.tokens[start : start + batch_size]
      mask = enc.mask[start : start + batch_size]
      real = tokens.shape[0]
      if real < batch_size:
        pad = batch_size - real
        tokens = np.concatenate([tokens, np.full((pad, tokens.shape[1]), self.tok.pad_id)])
        mask = np.concatenate([mask, np.ones((pad, mask.shape[1]), bool)])
      out.append(np.asarray(fn(self.params, tokens.astype(np.int32), mask))[:real])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def load_text_reward_model(run_dir: str | os.PathLike, *, which: str = "latest") -> TextRewardModel:
  """Loads a text reward-model run with its stored tokenizer (checked against the checkpoint).

  Raises:
    FileNotFoundError: no checkpoint or no stored tokenizer.
    ValueError: a synthetic run, or a stored tokenizer other than the checkpoint's.
  """
  run_dir = os.fspath(run_dir)
  apply_fn, params, extra = rm_io.load_reward_model(run_dir, which=which)
  tok = RunTokenizer.load(run_dir)
  if extra.get("tokenizer") != tok.name:
    raise ValueError(
      f"{run_dir}: the checkpoint was trained with the tokenizer {extra.get('tokenizer')!r}, "
      f"the stored tokenizer is {tok.name!r}"
    )
  return TextRewardModel(apply_fn, params, tok, run_max_len(extra, run_dir), extra)


def score_texts(
  run_dir: str | os.PathLike,
  texts: Sequence[str] | None = None,
  *,
  prompts: Sequence[str] | None = None,
  responses: Sequence[str] | None = None,
  which: str = "latest",
  batch_size: int = 32,
) -> np.ndarray:
  """Rewards of strings under a trained text reward model, tokenised as in training.

  Args:
    run_dir: a reward-model run directory trained on JSONL files.
    texts: whole dialogues (``n`` strings); or
    prompts, responses: ``n`` prompts and ``n`` responses.
    which: the checkpoint, ``'latest'`` or ``'best'`` (:func:`jaxrm.io.rm_io.load_reward_model`).
    batch_size: strings per forward pass.

  Returns:
    ``[n]`` float32 rewards.

  Raises:
    ValueError: both or neither of ``texts`` and ``prompts``/``responses``; a synthetic run.
    TypeError: strings that are not a list of ``str``.
    FileNotFoundError: no checkpoint or no stored tokenizer in ``run_dir``.
  """
  pairs = prompt_response_pairs(texts, prompts=prompts, responses=responses)
  model = load_text_reward_model(run_dir, which=which)
  return model.score(encode_pairs(model.tok, pairs, max_len=model.max_len), batch_size=batch_size)


def score_text_pairs(
  run_dir: str | os.PathLike,
  records: Sequence[dict[str, Any]],
  *,
  which: str = "latest",
  batch_size: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
  """``(rewards_chosen, rewards_rejected)`` ``[n]`` of preference records (the JSONL objects
  of the training files' format, either form), tokenised exactly as training tokenised them
  (truncation included)."""
  model = load_text_reward_model(run_dir, which=which)
  chosen, rejected = encode_records(model.tok, records, max_len=model.max_len)
  return model.score(chosen, batch_size=batch_size), model.score(rejected, batch_size=batch_size)
