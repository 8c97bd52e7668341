"""The byte-level tokenizer: round trips, saved settings, truncation to the model positions, chat template."""

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, pipeline

from hf_tensor_attn import TensorAttnByteTokenizer, TensorAttnByteTokenizerFast


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
    assert type(AutoTokenizer.from_pretrained(tmp_path)) is TensorAttnByteTokenizerFast  # transformers 5: fast first
    assert type(TensorAttnByteTokenizer.from_pretrained(tmp_path)) is TensorAttnByteTokenizer


def test_tokenizer_truncates_to_the_model_positions_and_keeps_them_when_saved(tmp_path):
    assert TensorAttnByteTokenizer().model_max_length == 2048  # TensorAttnConfig's default max_position_embeddings
    config = AutoConfig.for_model("tensor_attn", max_position_embeddings=16)
    tok = TensorAttnByteTokenizer.for_config(config)
    assert len(tok("x" * 40, truncation=True).input_ids) == 16
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).model_max_length == 16


def test_chat_template_formats_turns_and_chat_pipeline_runs(tmp_path):
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
