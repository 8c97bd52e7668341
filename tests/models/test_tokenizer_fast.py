"""The fast byte tokenizer against the slow one: the same ids on hard text, offsets that slice the text, word ids,
files, and the rule for special-token strings in user text (issue 35)."""

from __future__ import annotations

import json
import random

import pytest
from transformers import AutoTokenizer

from hf_tensor_attn import TensorAttnByteTokenizer, TensorAttnByteTokenizerFast


def random_text(seed: int, length: int) -> str:
    """Code points from every plane that UTF-8 can encode (no lone surrogates), control characters included."""
    rng = random.Random(seed)
    ranges = [(0, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF)]
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(length))


CORPUS = [
    "",
    "3 14 22 ",
    "héllo wörld — ünïcödé ✓",
    "日本語のテキスト、中文文本。한국어",
    "emoji 🎉 family 👨‍👩‍👧‍👦 flag 🇫🇷 skin 👍🏽",
    "nul\x00in\x00the\x00middle\x00",
    "\x00",
    "tabs\tand\r\nnewlines\n\n  spaces  ",
    "\x01\x1b[31mcontrol\x7f\u200b\ufeff",
    "x" * 20_000,
    "word " * 5_000,
    random_text(0, 3_000),
    random_text(1, 50),
]


@pytest.fixture(scope="module")
def pair():
    return TensorAttnByteTokenizer(), TensorAttnByteTokenizerFast()


@pytest.mark.parametrize("text", CORPUS, ids=range(len(CORPUS)))
def test_fast_gives_the_slow_ids_and_decodes_back(pair, text):
    slow, fast = pair
    ids = fast(text).input_ids
    assert ids == slow(text).input_ids == [3 + b for b in text.encode("utf-8")]
    assert fast.decode(ids) == slow.decode(ids) == text


def test_fast_gives_the_slow_ids_for_batches_specials_padding_and_truncation():
    texts = CORPUS[:9]
    for options in (dict(), dict(add_bos_token=True), dict(add_eos_token=True, padding_side="right"),
                    dict(add_bos_token=True, add_eos_token=True)):
        slow, fast = TensorAttnByteTokenizer(**options), TensorAttnByteTokenizerFast(**options)
        for call in (dict(padding=True), dict(padding="max_length", max_length=40, truncation=True)):
            assert dict(fast(texts, **call)) == dict(slow(texts, **call)), (options, call)
        assert fast("ab", "cd").input_ids == slow("ab", "cd").input_ids
        ids = fast(texts[2]).input_ids
        assert fast.decode(ids, skip_special_tokens=True) == slow.decode(ids, skip_special_tokens=True) == texts[2]


@pytest.mark.parametrize("text", CORPUS, ids=range(len(CORPUS)))
def test_offsets_slice_the_original_text(pair, text):
    """Each token's span is the character its byte belongs to: the spans of consecutive tokens of one character
    are equal, their bytes are that character's UTF-8, and the spans tile the text."""
    _, fast = pair
    encoding = fast(text, return_offsets_mapping=True)
    ids, offsets = encoding.input_ids, encoding.offset_mapping
    assert len(offsets) == len(ids)
    position, i = 0, 0
    while i < len(ids):
        start, end = offsets[i]
        assert start == position and end > start, (i, offsets[i])
        group = [b - 3 for b, span in zip(ids[i:i + 4], offsets[i:i + 4]) if span == (start, end)]
        assert bytes(group) == text[start:end].encode("utf-8")
        position, i = end, i + len(group)
    assert position == len(text)


def test_word_ids_follow_the_words_and_skip_special_tokens():
    fast = TensorAttnByteTokenizerFast(add_bos_token=True, add_eos_token=True)
    text = "hello wörld 42"
    encoding = fast(text, return_offsets_mapping=True)
    words = encoding.word_ids()
    assert words[0] is None and words[-1] is None
    spans = {}
    for word, (start, end) in zip(words, encoding.offset_mapping):
        if word is not None:
            spans.setdefault(word, [start, end])[1] = end
    assert [text[a:b] for a, b in spans.values()] == ["hello", " wörld", " 42"]


def test_the_slow_tokenizer_refuses_offsets_by_name():
    with pytest.raises(NotImplementedError, match="return_offsets_mapping=True needs the fast tokenizer"):
        TensorAttnByteTokenizer()("ab", return_offsets_mapping=True)


@pytest.mark.parametrize("cls", [TensorAttnByteTokenizer, TensorAttnByteTokenizerFast])
def test_special_token_strings_in_text_follow_split_special_tokens(cls, tmp_path):
    """As for Llama's tokenizer: by default the strings are the special tokens (and skip_special_tokens drops them);
    split_special_tokens=True, per call or saved with the tokenizer, keeps user text as its bytes."""
    text = "say <s> and </s> or <pad>!"
    default = cls()
    ids = default(text).input_ids
    assert [i for i in ids if i < 3] == [1, 2, 0]
    assert default.decode(ids) == text and default.decode(ids, skip_special_tokens=True) == "say  and  or !"
    as_bytes = [3 + b for b in text.encode("utf-8")]
    assert default(text, split_special_tokens=True).input_ids == as_bytes
    splitting = cls(split_special_tokens=True)
    assert splitting(text).input_ids == as_bytes
    assert splitting.decode(splitting(text).input_ids, skip_special_tokens=True) == text
    splitting.save_pretrained(tmp_path)
    for loaded in (AutoTokenizer.from_pretrained(tmp_path), cls.from_pretrained(tmp_path)):
        assert loaded(text).input_ids == as_bytes


def test_fast_saves_tokenizer_json_and_auto_tokenizer_loads_it(tmp_path):
    fast = TensorAttnByteTokenizerFast(add_bos_token=True, padding_side="right")
    fast.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "tokenizer.json").read_text())
    assert saved["model"]["type"] == "BPE" and len(saved["model"]["vocab"]) == 259
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded) is TensorAttnByteTokenizerFast and loaded.padding_side == "right"
    slow = TensorAttnByteTokenizer.from_pretrained(tmp_path)  # the slow one stays loadable from the same folder
    assert loaded("añb").input_ids == slow("añb").input_ids == fast("añb").input_ids
    assert loaded("añb").input_ids[0] == 1
