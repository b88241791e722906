"""The tokenizer rebuilt from GGUF metadata matches the model's own tokenization and chat template."""

import pytest

from tokenmill.errors import ModelLoadError
from tokenmill.loader import catalog
from tokenmill.loader.gguf import GGUFFile
from tokenmill.loader.tokenizer import Tokenizer

TEXTS = [
    "The capital of France is",
    "Hello, world! How's it going?",
    "  leading spaces and\ttabs\nnewlines\n\n",
    "Ünïcödé — café, naïve, 東京",
    "def f(x):\n    return x * x",
]
GEMMA3_TEXTS = [
    "The capital of France is",
    "  two leading spaces, three trailing   ",
    "multiple    spaces  between     words",
    "lines\nand\ttabs\n\n\tindented\r\n",
    "In 2024, 1,234,567 people paid $89.99 (3.5%).",
    "def f(x):\n    return {'k': [x ** 2 for _ in range(10)]}\n",
    "Ünïcödé — café, naïve, crème brûlée",
    "東京は日本の首都です。你好，世界",
    "emoji 🎉🦙 and 👩‍👩‍👧",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "",
]


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_path, gguf_parsed_once):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)


@pytest.fixture(scope="module")
def gemma3_path():
    return catalog.pull("gemma3-270m")


@pytest.fixture(scope="module")
def gemma3_tokenizer(gemma3_path):
    gguf = GGUFFile(gemma3_path)
    return Tokenizer.from_gguf(gguf.metadata, gguf.model_config().eos_token_ids)


@pytest.fixture(scope="module")
def hf_gemma3_tokenizer(gemma3_path, gguf_parsed_once):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gemma3_path.parent), gguf_file=gemma3_path.name)


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


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_gemma3_encoding_matches_transformers(gemma3_tokenizer, hf_gemma3_tokenizer, add_special_tokens):
    for text in GEMMA3_TEXTS:
        ours = gemma3_tokenizer.encode(text, add_special_tokens=add_special_tokens)
        assert ours == hf_gemma3_tokenizer.encode(text, add_special_tokens=add_special_tokens), text
    assert gemma3_tokenizer.encode("", add_special_tokens=add_special_tokens) == ([2] if add_special_tokens else [])


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_gemma3_decoding_matches_transformers(gemma3_tokenizer, hf_gemma3_tokenizer, skip_special_tokens):
    for text in GEMMA3_TEXTS:
        ids = hf_gemma3_tokenizer.encode(text)
        ours = gemma3_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        assert ours == hf_gemma3_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens), text
        assert gemma3_tokenizer.decode(gemma3_tokenizer.encode(text, False), skip_special_tokens=False) == text


def test_gemma3_spells_characters_outside_its_vocabulary_as_utf8_bytes(gemma3_tokenizer):
    ids = gemma3_tokenizer.encode("🦙", add_special_tokens=False)
    assert [gemma3_tokenizer.backend.id_to_token(i) for i in ids] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]
    assert gemma3_tokenizer.token_bytes(ids[0]) == b"\xf0"
    assert b"".join(gemma3_tokenizer.token_bytes(i) for i in ids) == "🦙".encode()


def test_gemma3_token_bytes_turn_the_word_marker_into_a_space(gemma3_tokenizer):
    tokenizer = gemma3_tokenizer
    assert tokenizer.token_bytes(tokenizer.backend.token_to_id("\u2581capital")) == b" capital"
    for text in GEMMA3_TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert b"".join(tokenizer.token_bytes(i) for i in ids) == text.encode(), text


def test_unsupported_gguf_tokenizer_names_the_supported_ones():
    with pytest.raises(ModelLoadError, match="'gpt2'.*'llama'"):
        Tokenizer.from_gguf({"tokenizer.ggml.model": "t5", "tokenizer.ggml.tokens": []}, [])
