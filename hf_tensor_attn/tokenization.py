"""A byte-level tokenizer: ids 0-2 are <pad>, <s>, </s>; id 3 + b is byte b. No vocabulary file, no downloads."""

from __future__ import annotations

import json
import os

from transformers.models.auto.tokenization_auto import get_tokenizer_config
from transformers.tokenization_python import AddedToken, PreTrainedTokenizer
from transformers.tokenization_utils_base import TOKENIZER_CONFIG_FILE

from . import compat, remote_code
from .atomic import atomic_directory
from .configuration import TensorAttnConfig

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
# The classes tokenizer_config.json's `auto_map` names, slow and fast, as transformers' convention has it.
TOKENIZER_CLASSES = ("TensorAttnByteTokenizer", "TensorAttnByteTokenizerFast")
PAD_ID, BOS_ID, EOS_ID = range(len(SPECIAL_TOKENS))
# Byte b is token BYTE_OFFSET + b: the special tokens come first, so every byte keeps one fixed id.
BYTE_OFFSET = len(SPECIAL_TOKENS)
NUM_BYTES = 256
# The keywords of `from_pretrained` that say where its tokenizer_config.json is.
TOKENIZER_CONFIG_LOOKUP = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only",
                           "subfolder")
# Each turn as "<s>role: content</s>" and a newline; with add_generation_prompt the reply starts "<s>assistant: ".
# An assistant's content and its "</s>" (what the model must learn to write) are inside {% generation %} markers,
# which render nothing and give `apply_chat_template(..., return_assistant_tokens_mask=True)` its spans (TRL's
# assistant_only_loss). The newline is an expression: transformers renders with trim_blocks, which drops a newline
# written right after a block tag.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ bos_token }}{{ message['role'] }}: "
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] }}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ bos_token }}assistant: {% endif %}"
)


class ByteTokenizerFiles:
    """What the slow and the fast byte tokenizer share: their defaults, the crash-safe save that keeps
    `add_bos_token` / `add_eos_token` and writes the remote-code loader, and a clear error for a truncated file."""

    model_input_names = ["input_ids", "attention_mask"]
    register_for_auto_class = compat.keep_own_auto_map  # compat item 5

    @staticmethod
    def default_kwargs(kwargs: dict) -> dict:
        kwargs.setdefault("model_max_length", TensorAttnConfig.max_position_embeddings)
        kwargs.setdefault("chat_template", DEFAULT_CHAT_TEMPLATE)
        for key in ("pad_token", "bos_token", "eos_token"):
            kwargs.pop(key, None)
        return kwargs

    @classmethod
    def for_config(cls, config: TensorAttnConfig, **kwargs):
        """The tokenizer of a model with this config: inputs are truncated to its `max_position_embeddings`."""
        return cls(model_max_length=config.max_position_embeddings, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        try:
            # transformers drops these two settings of tokenizer_config.json where a tokenizer.json exists (it reads
            # them from the file's post-processor); ours are the same for the slow and the fast class, so pass them.
            saved = get_tokenizer_config(pretrained_model_name_or_path,
                                         **{k: v for k, v in kwargs.items() if k in TOKENIZER_CONFIG_LOOKUP})
            for key in ("add_bos_token", "add_eos_token"):
                if key in saved:
                    kwargs.setdefault(key, saved[key])
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except json.JSONDecodeError as e:  # a bare JSONDecodeError names neither the file nor the way out
            raise ValueError(
                f"a tokenizer file in {str(pretrained_model_name_or_path)!r} is not valid JSON ({e}); it is most likely "
                f"truncated by an interrupted save: save the tokenizer again ({cls.__name__}() needs no files)"
            ) from e

    def save_pretrained(self, save_directory, *args, self_contained: bool | None = None, **kwargs):
        """`save_pretrained`, crash-safe like the model's (`hf_tensor_attn.atomic`), keeping `add_bos_token` and
        `add_eos_token`, which transformers leaves out of tokenizer_config.json. `self_contained=True` writes the
        package's code beside it, as the model's save does (`hf_tensor_attn.remote_code`)."""
        # tokenizer_config.json's `auto_map` lets AutoTokenizer(trust_remote_code=True) load the installed package.
        self._auto_map = {"AutoTokenizer": [f"{compat.REMOTE_MODULE}.{name}" for name in TOKENIZER_CLASSES]}
        if kwargs.get("push_to_hub", False):
            kwargs.setdefault("repo_id", os.path.basename(os.path.normpath(save_directory)))  # not the staging name
        with atomic_directory(save_directory, replaced=remote_code.CODE_FILES.match) as staging:
            # before super(), which uploads with push_to_hub
            remote_code.write_loader(staging, self_contained, target=save_directory)
            saved = super().save_pretrained(staging, *args, **kwargs)
            config_file = staging / TOKENIZER_CONFIG_FILE
            config = json.loads(config_file.read_text(encoding="utf-8"))
            config.update(add_bos_token=self.add_bos_token, add_eos_token=self.add_eos_token)
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                                   encoding="utf-8")
        return tuple(os.path.join(save_directory, os.path.relpath(path, staging)) for path in saved)


class TensorAttnByteTokenizer(ByteTokenizerFiles, PreTrainedTokenizer):
    """UTF-8 bytes as tokens. Any text round-trips exactly; vocab size 259 matches `TensorAttnConfig`'s default.
    `TensorAttnByteTokenizerFast` gives the same ids from the `tokenizers` library, with offsets and word ids.

    Special tokens written in the text: as for every transformers tokenizer (Llama's included), the strings
    `<pad>`, `<s>` and `</s>` in the text are read as the special tokens, and `decode(..., skip_special_tokens=True)`
    drops them. Pass `split_special_tokens=True` (here or to a call) to encode them as their bytes, so that user
    text round-trips exactly (`docs/sharing.md`).

    Args:
        add_bos_token (`bool`, defaults to False): prepend `<s>` when encoding.
        add_eos_token (`bool`, defaults to False): append `</s>` when encoding.
        padding_side (`str`, defaults to `"left"`): left padding, what batched generation needs.
        model_max_length (`int`, *optional*): the longest input `truncation=True` keeps; defaults to the config's
            default `max_position_embeddings` (`for_config` takes it from a model's config).
        chat_template (`str`, *optional*): defaults to one turn per line, `<s>role: content</s>`.
    """

    def __init__(self, add_bos_token=False, add_eos_token=False, padding_side="left", **kwargs):
        pad, bos, eos = (AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS)
        self._added_tokens_decoder = {PAD_ID: pad, BOS_ID: bos, EOS_ID: eos}
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        super().__init__(
            pad_token=pad, bos_token=bos, eos_token=eos, padding_side=padding_side,
            add_bos_token=add_bos_token, add_eos_token=add_eos_token, **self.default_kwargs(kwargs),
        )

    def _encode_plus(self, *args, return_offsets_mapping: bool = False, **kwargs):
        if return_offsets_mapping:  # transformers' Python tokenizers ignore it silently
            raise NotImplementedError(
                "return_offsets_mapping=True needs the fast tokenizer: TensorAttnByteTokenizerFast (what AutoTokenizer "
                "loads) gives the same ids with offsets and word_ids"
            )
        return super()._encode_plus(*args, **kwargs)

    @property
    def vocab_size(self) -> int:
        return NUM_BYTES + BYTE_OFFSET

    def get_vocab(self) -> dict[str, int]:
        vocab = {chr(b): b + BYTE_OFFSET for b in range(NUM_BYTES)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        ids = bos + token_ids_0 + eos
        return ids if token_ids_1 is None else ids + bos + token_ids_1 + eos

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        bos = [1] if self.add_bos_token else []
        eos = [1] if self.add_eos_token else []
        mask = bos + [0] * len(token_ids_0) + eos
        return mask if token_ids_1 is None else mask + bos + [0] * len(token_ids_1) + eos

    def apply_chat_template(self, conversation, *args, **kwargs):
        """`PreTrainedTokenizerBase.apply_chat_template`; with `return_assistant_tokens_mask=True` the base maps its
        character spans to tokens through the token offsets of a fast tokenizer's encodings (compat item 13), which
        this byte tokenizer supplies for the duration of the call."""
        if not kwargs.get("return_assistant_tokens_mask"):
            return super().apply_chat_template(conversation, *args, **kwargs)
        self._offsets_for_chat = True
        try:
            out = super().apply_chat_template(conversation, *args, **kwargs)
        finally:
            self._offsets_for_chat = False
        if hasattr(out, "_encodings"):
            out._encodings = None  # returned as every encoding of this tokenizer: no fast-tokenizer encodings
        return out

    def __call__(self, text=None, *args, **kwargs):
        out = super().__call__(text, *args, **kwargs)
        if getattr(self, "_offsets_for_chat", False):
            texts = [text] if isinstance(text, str) else text
            ids = out["input_ids"]
            rows = ids.tolist() if hasattr(ids, "tolist") else ids
            rows = [rows] if isinstance(text, str) else rows
            out._encodings = [compat.ChatOffsets(self.token_offsets(t, row)) for t, row in zip(texts, rows)]
        return out

    def token_offsets(self, text: str, row: list[int]) -> list[tuple[int, int]]:
        """(start, end) character span of each token of `row` (ids of `text`, maybe padded or truncated) in `text`:
        a special token covers its characters, each byte token the character it is part of, padding (0, 0)."""
        spans = []
        position = consumed = 0  # the character reached, and how many of its UTF-8 bytes are tokens already
        for token in self.tokenize(text):
            if token in self.added_tokens_encoder:
                spans.append((position, position + len(token)))
                position += len(token)
                continue
            spans.append((position, position + 1))
            consumed += 1
            if consumed == len(text[position].encode("utf-8")):
                position, consumed = position + 1, 0
        if position != len(text):
            raise ValueError(f"token offsets cover {position} of the {len(text)} characters of {text[:40]!r}")
        if len(row) < len(spans):  # truncated: the first tokens kept, or the last with truncation_side="left"
            return spans[: len(row)] if self.truncation_side == "right" else spans[len(spans) - len(row) :]
        padding = [(0, 0)] * (len(row) - len(spans))
        return padding + spans if self.padding_side == "left" else spans + padding

    def _tokenize(self, text: str) -> list[str]:
        # One token per UTF-8 byte, each written as the character with that code point (0-255).
        return [chr(b) for b in text.encode("utf-8")]

    def _convert_token_to_id(self, token: str) -> int:
        if len(token) == 1 and ord(token) < NUM_BYTES:
            return ord(token) + BYTE_OFFSET
        raise ValueError(f"token {token!r} is neither a byte nor one of the special tokens {list(SPECIAL_TOKENS)}")

    def _convert_id_to_token(self, index: int) -> str:
        if not BYTE_OFFSET <= index < self.vocab_size:
            raise ValueError(f"token id {index} is outside the byte range [{BYTE_OFFSET}, {self.vocab_size})")
        return chr(index - BYTE_OFFSET)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        data = bytearray()
        for token in tokens:
            if token in self.added_tokens_encoder:
                data.extend(token.encode("utf-8"))
            else:
                data.append(ord(token))
        return data.decode("utf-8", errors="replace")

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        return ()  # the vocabulary is the 256 bytes: nothing to write


__all__ = [
    "BOS_ID", "BYTE_OFFSET", "EOS_ID", "NUM_BYTES", "PAD_ID", "SPECIAL_TOKENS", "ByteTokenizerFiles",
    "TensorAttnByteTokenizer",
]
