"""benchmarks/gpt2_tokenizer.py: the folder it writes encodes as GPT-2's own BPE algorithm does
(an independent re-implementation of OpenAI's ``encoder.py`` on a small vocabulary), jaxrm
reads it as a subword tokenizer, and bad files are named with their line."""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import gpt2_tokenizer  # noqa: E402

# GPT-2's pre-tokenizer regex restricted to ASCII (\p{L} -> [A-Za-z], \p{N} -> [0-9]): the
# same splits on the ASCII texts below.
_SPLIT = re.compile(
  r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+"""
)
_MERGES = [
  ("h", "e"),
  ("l", "l"),
  ("he", "ll"),
  ("hell", "o"),
  ("Ġ", "w"),
  ("o", "r"),
  ("Ġw", "or"),
  ("Ġ", "t"),
  ("Ġt", "he"),
  ("e", "r"),
  ("'", "s"),
  ("Ġ", "1"),
  ("Ġ", "Ġ"),
  ("Ġ1", "2"),
]
_TEXTS = [
  "hello world",
  "Hello there, the worker's 123 mother",
  "  leading spaces and\n\nnewlines\t tab  ",
  "hellohello her ther",
  "a<|endoftext|>b",
  "",
]


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's map of the 256 bytes to printable characters (OpenAI's encoder.py)."""
  bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
  """Merges the lowest-ranked adjacent pair, every occurrence left to right, until none is
  a merge."""
  parts = list(word)
  while len(parts) > 1:
    pairs = {(a, b) for a, b in zip(parts, parts[1:])}
    best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
    if best not in ranks:
      break
    merged, i = [], 0
    while i < len(parts):
      if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
        merged.append(parts[i] + parts[i + 1])
        i += 2
      else:
        merged.append(parts[i])
        i += 1
    parts = merged
  return parts


def _reference_encode(text: str, vocab: dict[str, int], merges) -> list[int]:
  byte_chars, ranks = _bytes_to_unicode(), {m: i for i, m in enumerate(merges)}
  ids = []
  for k, piece in enumerate(text.split("<|endoftext|>")):
    if k:
      ids.append(vocab["<|endoftext|>"])
    for word in _SPLIT.findall(piece):
      chars = "".join(byte_chars[b] for b in word.encode("utf-8"))
      ids += [vocab[t] for t in _bpe(chars, ranks)]
  return ids


def _write_files(tmp_path, merges=_MERGES, vocab_extra=()):
  chars = _bytes_to_unicode()
  tokens = [chars[b] for b in range(256)] + [a + b for a, b in merges] + list(vocab_extra)
  vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
  vocab["<|endoftext|>"] = len(vocab)
  vocab_path, merges_path = tmp_path / "encoder.json", tmp_path / "vocab.bpe"
  vocab_path.write_text(json.dumps(vocab))
  merges_path.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  return vocab, str(vocab_path), str(merges_path)


def test_folder_encodes_as_gpt2s_bpe_algorithm_and_jaxrm_reads_it(tmp_path):
  from jaxrm.data.hf_tokenizer import HFTokenizer

  vocab, vocab_path, merges_path = _write_files(tmp_path)
  info = gpt2_tokenizer.write_folder(vocab_path, merges_path, str(tmp_path / "tok"))
  assert info["vocab_size"] == len(vocab) and info["merges"] == len(_MERGES)
  assert info["is_gpt2"] is False  # another vocabulary's digests
  tok = HFTokenizer.from_pretrained(str(tmp_path / "tok"))
  assert tok.vocab_size == len(vocab)
  assert tok.eos_id == tok.bos_id == tok.pad_id == vocab["<|endoftext|>"]
  for text in _TEXTS:
    ids = tok.encode(text)
    assert ids == _reference_encode(text, vocab, _MERGES), text
    if "<|endoftext|>" not in text:
      assert tok.decode(ids) == text
  # Merges happened (not byte by byte): "hello" is one token, " the" one.
  assert tok.encode("hello the") == [vocab["hello"], vocab["Ġthe"]]


def test_gpt2_digests_are_tiktokens():
  # tiktoken's gpt2 encoding pins the same two files by these digests.
  assert gpt2_tokenizer.GPT2_SHA256 == {
    "vocab": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "merges": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
  }


def test_bad_files_are_named_with_their_line(tmp_path):
  vocab, vocab_path, merges_path = _write_files(tmp_path)
  with open(merges_path, "a") as f:
    f.write("he zz\n")
  line = len(_MERGES) + 2
  with pytest.raises(ValueError, match=rf"vocab.bpe:{line}: 'zz' is not in the vocabulary"):
    gpt2_tokenizer.write_folder(vocab_path, merges_path, str(tmp_path / "tok"))
  (tmp_path / "vocab.bpe").write_text("#version: 0.2\nh e x\n")
  with pytest.raises(ValueError, match=r"vocab.bpe:2: expected two tokens"):
    gpt2_tokenizer.write_folder(vocab_path, merges_path, str(tmp_path / "tok"))
  del vocab["<|endoftext|>"]
  (tmp_path / "encoder.json").write_text(json.dumps(vocab))
  with pytest.raises(ValueError, match=r"encoder.json: no <\|endoftext\|> token"):
    gpt2_tokenizer.write_folder(vocab_path, merges_path, str(tmp_path / "tok"))
  (tmp_path / "encoder.json").write_text(json.dumps({"a": 0, "b": 2}))
  with pytest.raises(ValueError, match=r"encoder.json: the ids are not 0..1"):
    gpt2_tokenizer.write_folder(vocab_path, merges_path, str(tmp_path / "tok"))


def test_script_names_a_missing_file_in_one_line(tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "benchmarks", "gpt2_tokenizer.py"),
      f"--vocab={tmp_path / 'missing.json'}",
      f"--merges={tmp_path / 'vocab.bpe'}",
      f"--out={tmp_path / 'tok'}",
    ],
    capture_output=True,
    text=True,
  )
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert "--vocab: no such file" in proc.stderr
