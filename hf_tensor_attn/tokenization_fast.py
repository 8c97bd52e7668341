"""The byte-level tokenizer on the `tokenizers` library: the ids of `TensorAttnByteTokenizer`, plus what only a
fast tokenizer gives (`return_offsets_mapping`, `word_ids`, batch encoding in Rust), saved as tokenizer.json."""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.tokenization_utils_tokenizers import TokenizersBackend

from .tokenization import BYTE_OFFSET, NUM_BYTES, SPECIAL_TOKENS, ByteTokenizerFiles, TensorAttnByteTokenizer


def byte_level_tokenizer() -> Tokenizer:
    """Ids 0-2 the special tokens, 3 + b byte b. The byte-level pre-tokenizer writes each UTF-8 byte as one
    printable character (GPT-2's table) and splits words as GPT-2 does, which only sets `word_ids`: with no merges
    every byte stays one token, so the ids do not depend on the split."""
    byte_chars = bytes_to_unicode()
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({byte_chars[b]: BYTE_OFFSET + b for b in range(NUM_BYTES)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    return tokenizer


class TensorAttnByteTokenizerFast(ByteTokenizerFiles, TokenizersBackend):
    """`TensorAttnByteTokenizer` (same ids, arguments and rule for special tokens in the text) backed by
    `tokenizers`. Built from scratch unless a tokenizer.json is given (`from_pretrained` of a saved one)."""

    slow_tokenizer_class = TensorAttnByteTokenizer

    def __init__(self, add_bos_token=False, add_eos_token=False, padding_side="left", tokenizer_file=None, **kwargs):
        # transformers passes the saved file's parts apart; the vocabulary is fixed, so the file or a fresh build
        # holds all of it.
        for key in ("vocab", "merges", "pre_tokenizer", "decoder", "post_processor"):
            kwargs.pop(key, None)
        if tokenizer_file is not None:
            kwargs["tokenizer_object"] = Tokenizer.from_file(tokenizer_file)
        kwargs.setdefault("tokenizer_object", byte_level_tokenizer())
        pad, bos, eos = SPECIAL_TOKENS
        super().__init__(
            pad_token=pad, bos_token=bos, eos_token=eos, padding_side=padding_side,
            add_bos_token=add_bos_token, add_eos_token=add_eos_token, **self.default_kwargs(kwargs),
        )


__all__ = ["TensorAttnByteTokenizerFast", "byte_level_tokenizer"]
