"""Tests for jaxrm.data.hf_tokenizer: tokenizer.json fixtures, chat templates, BPE training.

tests/data/hf/tokenizer_reference.json holds ids and chat renderings produced with Hugging
Face tokenizers/transformers by tests/data/hf/make_fixtures.py.
"""

import gzip
import json
import os
import shutil

import numpy as np
import pytest

from jaxrm.data.hf_tokenizer import HFTokenizer, train_bpe_tokenizer
from jaxrm.data.tokenizer import ByteTokenizer, encode_prompt_response

DATA = os.path.join(os.path.dirname(__file__), "data")
TOK = os.path.join(DATA, "hf", "tokenizer")
REF = json.load(open(os.path.join(DATA, "hf", "tokenizer_reference.json")))


@pytest.fixture(scope="module")
def tok():
  return HFTokenizer.from_pretrained(TOK)


def test_fixture_ids_match_the_reference_and_round_trip(tok):
  for text, ids in zip(REF["texts"], REF["ids"]):
    assert tok.encode(text) == ids
    assert tok.decode(ids) == text
  assert tok.vocab_size == 320
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, tok.tokenizer.token_to_id("<|im_end|>"))


def test_chat_template_renders_as_transformers_does(tok):
  assert tok.apply_chat_template(REF["messages"]) == REF["chat"]
  got = tok.apply_chat_template(REF["messages"][:1], add_generation_prompt=True)
  assert got == REF["chat_generation_prompt"]
  assert got.endswith("<|im_start|>assistant\n")
  ids = tok.encode(REF["chat"])
  assert ids.count(tok.tokenizer.token_to_id("<|im_start|>")) == 2  # special tokens survive


def test_batch_encode_pads_truncates_and_adds_special_tokens(tok):
  text = REF["texts"][0]
  body = tok.encode(text)
  batch = tok.batch_encode([text, "hi"], max_len=8, add_bos=True, add_eos=True, padding_side="left")
  assert batch.tokens.shape == (2, 8) and batch.truncated.tolist() == [True, False]
  assert batch.tokens[0].tolist() == [tok.bos_id] + body[-6:] + [tok.eos_id]  # left-truncated
  n = len(tok.encode("hi")) + 2
  assert batch.mask[1].tolist() == [False] * (8 - n) + [True] * n
  assert (batch.tokens[1][: 8 - n] == tok.pad_id).all()
  with pytest.raises(ValueError, match="max_len"):
    tok.batch_encode(["x"], max_len=2, add_bos=True, add_eos=True)


def test_train_bpe_tokenizer_round_trips_and_compresses(tmp_path):
  with gzip.open(os.path.join(DATA, "hh_rlhf_sample.jsonl.gz"), "rt") as f:
    texts = [json.loads(line)["chosen"] for _, line in zip(range(200), f)]
  tok = train_bpe_tokenizer(texts, vocab_size=400)
  assert tok.vocab_size == 400 and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  sample = texts[0] + " ünïcødé ✓ 🙂"
  ids = tok.encode(sample, add_bos=True, add_eos=True)
  assert ids[0] == 1 and ids[-1] == 2 and tok.decode(ids) == sample
  assert len(tok.encode(texts[1])) < 0.7 * len(texts[1].encode())  # merges were learned
  tok.save(tmp_path)
  again = HFTokenizer.from_pretrained(tmp_path)
  assert again.encode(sample) == tok.encode(sample)
  assert (again.pad_id, again.bos_id, again.eos_id) == (0, 1, 2)


def test_errors_name_the_folder_or_the_missing_token(tmp_path):
  with pytest.raises(ValueError, match="has no tokenizer.json"):
    HFTokenizer.from_pretrained(tmp_path)
  (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "trunc')  # a cut download
  with pytest.raises(ValueError, match=r"tokenizer.json is not a valid tokenizer file \("):
    HFTokenizer.from_pretrained(tmp_path)
  bad = tmp_path / "bad_special"
  shutil.copytree(TOK, bad)
  (bad / "tokenizer_config.json").write_text('{"eos_token": 2}')
  with pytest.raises(ValueError, match="eos_token must be a string, got 2"):
    HFTokenizer.from_pretrained(bad)
  bare = train_bpe_tokenizer(["abc abc"], vocab_size=260)
  no_bos = HFTokenizer(bare.tokenizer, special_tokens={"eos_token": "</s>"})
  with pytest.raises(ValueError, match="add_bos=True but the tokenizer has no bos_token"):
    no_bos.encode("abc", add_bos=True)
  with pytest.raises(ValueError, match="no chat_template"):
    no_bos.apply_chat_template([{"role": "user", "content": "x"}])
  with pytest.raises(ValueError, match=r"ids must lie in \[0, 260\)"):
    no_bos.decode(np.array([5, 999]))
  with pytest.raises(ValueError, match="vocab_size must be at least"):
    train_bpe_tokenizer(["abc"], vocab_size=100)


@pytest.mark.parametrize("which", ["byte", "bpe"])
def test_encode_prompt_response_marks_exactly_the_response_tokens(which, tok):
  t = ByteTokenizer() if which == "byte" else tok
  prompts = ["Human: hi\n\nAssistant:", "Human: " + "long " * 40 + "end\n\nAssistant:"]
  responses = [" Hello there.", " A very long answer " * 20]
  out = encode_prompt_response(t, prompts, responses, max_len=64, add_bos=True)
  assert out.tokens.shape == (2, 64) and out.truncated.tolist() == [False, True]
  row = out.tokens[0][out.mask[0]].tolist()
  assert row == [t.bos_id] + t.encode(prompts[0]) + t.encode(responses[0]) + [t.eos_id]
  assert out.tokens[0][out.response_mask[0]].tolist() == t.encode(responses[0]) + [t.eos_id]
  # Row 1: prompt keeps its end (32 tokens with BOS), the response its beginning, EOS kept.
  p1 = t.encode(prompts[1])
  assert out.tokens[1, :32].tolist() == [t.bos_id] + p1[-31:]
  resp = out.tokens[1][out.response_mask[1]].tolist()
  assert resp == t.encode(responses[1])[:31] + [t.eos_id] and out.mask[1].all()
  with pytest.raises(ValueError, match="same length"):
    encode_prompt_response(t, ["a"], ["b", "c"], max_len=8)
