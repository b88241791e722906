"""The tokenizer rebuilt from GGUF metadata matches the model's own tokenization and chat template."""

import pytest

TEXTS = [
    "The capital of France is",
    "Hello, world! How's it going?",
    "  leading spaces and\ttabs\nnewlines\n\n",
    "Ünïcödé — café, naïve, 東京",
    "def f(x):\n    return x * x",
]


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)


def test_encoding_matches_transformers_on_text_without_digits(smollm2_source, hf_tokenizer):
    tok = smollm2_source.tokenizer
    for text in TEXTS:
        assert tok.encode(text) == hf_tokenizer.encode(text, add_special_tokens=False), text
        assert tok.decode(tok.encode(text)) == text


def test_digits_are_split_one_per_token_as_smollm_and_llama_cpp_do(smollm2_source):
    tok = smollm2_source.tokenizer
    ids = tok.encode("year 2024")
    assert [tok.decode([i]) for i in ids[-4:]] == ["2", "0", "2", "4"]


def test_control_tokens_stay_whole(smollm2_source):
    tok = smollm2_source.tokenizer
    assert tok.encode("<|im_start|>user") == [1, tok.encode("user")[0]]
    assert tok.decode([1, 2]) == ""  # special tokens are skipped when decoding
    assert tok.eos_token_ids == [2]


def test_chat_template_renders_like_transformers(smollm2_source, hf_tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    ours = smollm2_source.tokenizer.apply_chat_template(messages)
    theirs = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours == theirs
    assert ours.endswith("<|im_start|>assistant\n")


def test_token_bytes_rebuild_characters_split_across_tokens(smollm2_source):
    tokenizer = smollm2_source.tokenizer
    text = "Hello wörld 🎉 日本語 <|im_start|>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert "\ufffd" in tokenizer.decode([ids[5]])  # the emoji is split: its tokens alone decode to nothing useful
    assert b"".join(tokenizer.token_bytes(i) for i in ids) == text.encode()
