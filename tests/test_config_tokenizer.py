import pytest
from transformers import AutoConfig, AutoTokenizer

import hf_tensor_attn
from hf_tensor_attn import TensorAttnByteTokenizer, TensorAttnConfig


def test_defaults_are_derived():
    config = AutoConfig.for_model("tensor_attn", hidden_size=96, num_attention_heads=4, num_hidden_layers=3)
    assert isinstance(config, TensorAttnConfig)
    assert config.head_dim == 24
    assert config.layer_types == ["tensor_attention"] * 3
    assert config.score_scale == pytest.approx(24**-0.5)
    assert config.intermediate_size % 8 == 0


@pytest.mark.parametrize(
    "field, value",
    [
        ("w1", 0),
        ("w2", -3),
        ("layer_types", ["tensor_attention", "mamba"]),
        ("position_embedding_type", "alibi"),
        ("score_scale", -1.0),
        ("attention_dropout", 1.0),
        ("default_cache_implementation", "paged"),
        ("num_attention_heads", 0),
    ],
)
def test_bad_values_raise_value_error_naming_the_field(field, value):
    kwargs = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2)
    kwargs[field] = value
    with pytest.raises(ValueError, match=field):
        TensorAttnConfig(**kwargs)


def test_layer_types_length_must_match():
    with pytest.raises(ValueError, match="layer_types"):
        TensorAttnConfig(num_hidden_layers=3, layer_types=["tensor_attention"] * 2)


def test_odd_head_dim_with_rope_is_rejected():
    with pytest.raises(ValueError, match="head_dim"):
        TensorAttnConfig(hidden_size=30, num_attention_heads=2)
    TensorAttnConfig(hidden_size=30, num_attention_heads=2, position_embedding_type="none")


def test_config_round_trip(tmp_path):
    config = TensorAttnConfig(num_hidden_layers=2, layer_types=["full_attention", "tensor_attention"], w1=8, w2=4)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    strip = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}
    assert strip(loaded.to_dict()) == strip(config.to_dict())


def test_byte_tokenizer_round_trips_any_text(tmp_path):
    tok = TensorAttnByteTokenizer()
    text = "3 14 22 — ünïcödé ✓\n"
    ids = tok(text).input_ids
    assert ids == [b + 3 for b in text.encode("utf-8")]
    assert tok.decode(ids) == text
    assert tok.vocab_size == 259 and (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    batch = tok(["a", "abc"], padding=True)
    assert batch.input_ids[0] == [0, 0, ord("a") + 3] and batch.attention_mask[0] == [0, 0, 1]
    with_specials = TensorAttnByteTokenizer(add_bos_token=True, add_eos_token=True)
    assert with_specials("ab").input_ids == [1, ord("a") + 3, ord("b") + 3, 2]
    assert with_specials.decode(with_specials("ab").input_ids, skip_special_tokens=True) == "ab"
    tok.save_pretrained(tmp_path)
    assert type(AutoTokenizer.from_pretrained(tmp_path)) is TensorAttnByteTokenizer


def test_tokenizer_truncates_to_the_model_positions_and_keeps_them_when_saved(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    assert TensorAttnByteTokenizer().model_max_length == 2048  # TensorAttnConfig's default max_position_embeddings
    config = AutoConfig.for_model("tensor_attn", max_position_embeddings=16)
    tok = TensorAttnByteTokenizer.for_config(config)
    assert len(tok("x" * 40, truncation=True).input_ids) == 16
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).model_max_length == 16


def test_chat_template_formats_turns_and_chat_pipeline_runs(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, pipeline

    tok = TensorAttnByteTokenizer()
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<s>user: hi</s>\n<s>assistant: hello</s>\n<s>assistant: "
    ids = tok.apply_chat_template(messages[:1], add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.decode(ids) == "<s>user: hi</s>\n<s>assistant: "
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("tensor_attn", hidden_size=16, num_hidden_layers=1,
                                                                  num_attention_heads=2))
    chat = pipeline("text-generation", model=model, tokenizer=tok)
    reply = chat(messages[:1], max_new_tokens=3, do_sample=False)[0]["generated_text"]
    assert reply[:1] == messages[:1] and reply[-1]["role"] == "assistant"
    tok.save_pretrained(tmp_path)
    assert TensorAttnByteTokenizer.from_pretrained(tmp_path).apply_chat_template(messages, tokenize=False) == text.removesuffix("<s>assistant: ")
