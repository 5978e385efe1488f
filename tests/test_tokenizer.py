"""Tests for jaxrm.data.tokenizer."""

import numpy as np
import pytest

from jaxrm.data import tokenizer
from jaxrm.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE

TEXTS = [
  "Hello, world!",
  "caf\u00e9 na\u00efve",  # 2-byte UTF-8
  "\u4e2d\u6587\u6d4b\u8bd5",  # CJK, 3 bytes each
  "emoji \U0001f600\U0001f44d\U0001f3fd",  # 4-byte, with a skin-tone modifier
  "",
  "\x00\x01\x02 control characters (bytes 0-2 are ids 3-5, not specials)",
]


def test_constants_match_the_contract():
  assert (PAD_ID, BOS_ID, EOS_ID, tokenizer.BYTE_OFFSET, VOCAB_SIZE) == (0, 1, 2, 3, 259)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_round_trip(text):
  ids = tokenizer.encode(text, add_bos=True, add_eos=True)
  assert ids[0] == BOS_ID and ids[-1] == EOS_ID
  assert len(ids) == len(text.encode("utf-8")) + 2
  assert all(3 <= i < VOCAB_SIZE for i in ids[1:-1])
  assert tokenizer.decode(ids) == text
  assert tokenizer.decode(np.asarray(ids, np.int32)) == text


def test_encode_maps_byte_b_to_b_plus_3():
  assert tokenizer.encode("A\u00e9") == [0x41 + 3, 0xC3 + 3, 0xA9 + 3]
  assert tokenizer.encode("") == []
  assert tokenizer.encode("", add_bos=True, add_eos=True) == [BOS_ID, EOS_ID]


def test_decode_skips_special_tokens_anywhere():
  ids = [PAD_ID, BOS_ID] + tokenizer.encode("ab") + [EOS_ID, PAD_ID, PAD_ID]
  assert tokenizer.decode(ids) == "ab"


def test_decode_replaces_invalid_utf8_instead_of_raising():
  cut = tokenizer.encode("\U0001f600")[:2]  # first half of a 4-byte character
  assert tokenizer.decode(cut + tokenizer.encode("x")) == "\ufffdx"


@pytest.mark.parametrize("bad", [[-1], [VOCAB_SIZE], [5, 300]])
def test_decode_rejects_out_of_range_ids(bad):
  with pytest.raises(ValueError, match="ids must lie in"):
    tokenizer.decode(bad)


def test_encode_rejects_non_strings():
  with pytest.raises(TypeError, match="text must be a str"):
    tokenizer.encode(b"bytes")


def test_batch_encode_right_padding_matches_encode():
  out = tokenizer.batch_encode(TEXTS, max_len=64, add_bos=True, add_eos=True)
  assert out.tokens.shape == out.mask.shape == (len(TEXTS), 64)
  assert out.tokens.dtype == np.int32 and out.mask.dtype == np.bool_
  assert out.num_truncated == 0
  for row, text in enumerate(TEXTS):
    ids = tokenizer.encode(text, add_bos=True, add_eos=True)
    np.testing.assert_array_equal(out.tokens[row, : len(ids)], ids)
    assert out.mask[row, : len(ids)].all() and not out.mask[row, len(ids) :].any()
    assert (out.tokens[row, len(ids) :] == PAD_ID).all()
    assert tokenizer.decode(out.tokens[row]) == text


def test_batch_encode_left_padding_puts_tokens_at_the_end():
  right = tokenizer.batch_encode(TEXTS, max_len=40, padding_side="right", add_bos=True)
  left = tokenizer.batch_encode(TEXTS, max_len=40, padding_side="left", add_bos=True)
  for row in range(len(TEXTS)):
    n = right.mask[row].sum()
    assert left.mask[row, 40 - n :].all() and not left.mask[row, : 40 - n].any()
    np.testing.assert_array_equal(
      left.tokens[row][left.mask[row]], right.tokens[row][right.mask[row]]
    )


@pytest.mark.parametrize("side,expected", [("left", "56789"), ("right", "01234")])
def test_truncation_side_keeps_the_requested_end_and_specials(side, expected):
  out = tokenizer.batch_encode(
    ["0123456789", "ab"], max_len=7, truncation_side=side, add_bos=True, add_eos=True
  )
  np.testing.assert_array_equal(out.truncated, [True, False])
  assert out.num_truncated == 1
  assert out.tokens[0, 0] == BOS_ID and out.tokens[0, -1] == EOS_ID
  assert out.mask[0].all()
  assert tokenizer.decode(out.tokens[0]) == expected
  assert tokenizer.decode(out.tokens[1]) == "ab"


@pytest.mark.parametrize(
  "kwargs,argument",
  [
    (dict(max_len=0), "max_len"),
    (dict(max_len=-3), "max_len"),
    (dict(max_len=2, add_bos=True, add_eos=True), "max_len"),
    (dict(max_len=8, truncation_side="middle"), "truncation_side"),
    (dict(max_len=8, padding_side="up"), "padding_side"),
  ],
)
def test_batch_encode_bad_arguments_raise_naming_the_argument(kwargs, argument):
  with pytest.raises(ValueError, match=argument):
    tokenizer.batch_encode(["abc"], **kwargs)


def test_byte_tokenizer_object_matches_module_functions():
  tok = tokenizer.ByteTokenizer()
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 259)
  text = "\u4e2d \U0001f600"
  assert tok.encode(text, add_eos=True) == tokenizer.encode(text, add_eos=True)
  assert tok.decode(tok.encode(text)) == text
  a = tok.batch_encode([text], max_len=6, truncation_side="right")
  b = tokenizer.batch_encode([text], max_len=6, truncation_side="right")
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.mask, b.mask)
