"""The tokenizer rebuilt from GGUF metadata matches the model's own tokenization and chat template."""

import copy
import json
from pathlib import Path

import gguf
import pytest
from oracles import share_gguf_work

from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.errors import InvalidRequestError, ModelLoadError
from tokenmill.loader import catalog
from tokenmill.loader.gguf import GGUFFile
from tokenmill.loader.tokenizer import Tokenizer, _byte_level_pre_tokenizer

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
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
]
# An answer prefilled to be continued; its trailing space stays where the template writes it.
PREFILLED = [*CHAT, {"role": "assistant", "content": "The answer is "}]


def _transformers_answers() -> dict:
    """What transformers' own tokenizers, converted from each GGUF file, make of the tests' texts.

    Gemma 3's conversion (its 262,144-token header parsed, then the tokenizer built) takes 19 s: run as a script
    in a child from the suite's start (conftest._EARLY), so the tests only read the answers.
    """
    from transformers import AutoTokenizer

    share_gguf_work(pytest.MonkeyPatch())  # a script's patches need no undoing
    smollm2, gemma3 = catalog.pull("smollm2-135m"), catalog.pull("gemma3-270m")
    hf = AutoTokenizer.from_pretrained(str(smollm2.parent), gguf_file=smollm2.name)
    hf_gemma3 = AutoTokenizer.from_pretrained(str(gemma3.parent), gguf_file=gemma3.name)
    answers = {"smollm2": [hf.encode(text, add_special_tokens=False) for text in TEXTS],
               "smollm2 chat": hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True),
               "smollm2 chat without a reply": hf.apply_chat_template(CHAT, tokenize=False,
                                                                      add_generation_prompt=False),
               "smollm2 chat continued": hf.apply_chat_template(PREFILLED, tokenize=False,
                                                                continue_final_message=True)}
    for special in (True, False):
        answers[f"gemma3 add_special_tokens={special}"] = [hf_gemma3.encode(text, add_special_tokens=special)
                                                           for text in GEMMA3_TEXTS]
    for skip in (True, False):
        answers[f"gemma3 decoded skip_special_tokens={skip}"] = [
            hf_gemma3.decode(ids, skip_special_tokens=skip) for ids in answers["gemma3 add_special_tokens=True"]]
    return answers


@pytest.fixture(scope="module")
def transformers_answers(early_output) -> dict:
    return early_output(Path(__file__))


@pytest.fixture(scope="module")
def gemma3_path():
    return catalog.pull("gemma3-270m")


@pytest.fixture(scope="module")
def gemma3_tokenizer(gemma3_path):
    gguf = GGUFFile(gemma3_path)
    return Tokenizer.from_gguf(gguf, gguf.model_config().eos_token_ids)


def test_encoding_matches_transformers_on_text_without_digits(smollm2_source, transformers_answers):
    tok = smollm2_source.tokenizer
    for text, theirs in zip(TEXTS, transformers_answers["smollm2"], strict=True):
        assert tok.encode(text) == theirs, text
        assert tok.decode(tok.encode(text)) == text


def test_digits_are_split_one_per_token_as_smollm_and_llama_cpp_do(smollm2_source):
    tok = smollm2_source.tokenizer
    ids = tok.encode("year 2024")
    assert [tok.decode([i]) for i in ids[-4:]] == ["2", "0", "2", "4"]


def test_control_tokens_stay_whole(smollm2_source):
    tok = smollm2_source.tokenizer
    assert tok.encode("<|im_start|>user") == [1, tok.encode("user")[0]]
    assert tok.decode([1, 2]) == ""  # special tokens are skipped when decoding


def test_chat_template_renders_like_transformers(smollm2_source, transformers_answers):
    ours = smollm2_source.tokenizer.apply_chat_template(CHAT)
    assert ours == transformers_answers["smollm2 chat"]
    assert ours.endswith("<|im_start|>assistant\n")


def test_a_chat_ends_without_a_reply_or_in_the_final_message_as_transformers_ends_it(smollm2_source,
                                                                                       transformers_answers):
    tokenizer = smollm2_source.tokenizer
    ids = tokenizer.encode_chat(CHAT, add_generation_prompt=False)
    assert ids == tokenizer.encode(transformers_answers["smollm2 chat without a reply"], add_special_tokens=False)
    ids = tokenizer.encode_chat(PREFILLED, continue_final_message=True)
    assert ids == tokenizer.encode(transformers_answers["smollm2 chat continued"], add_special_tokens=False)
    assert tokenizer.decode(ids).endswith("assistant\nThe answer is ")  # no end of turn, no new reply


@pytest.mark.parametrize("final", [{"role": "assistant", "content": "d"}, {"role": "assistant", "content": "<"},
                                   {"role": "assistant", "content": ""}, {"role": "user", "content": "Once upon a"}])
def test_a_final_message_is_continued_where_its_text_ends(smollm2_source, final):
    # "d" and "<" stand again in the <|im_end|> after them: cut at their last place, the prompt ended "d<|im_end".
    from transformers.utils.chat_template_utils import render_jinja_template

    tokenizer = smollm2_source.tokenizer
    (theirs,), _ = render_jinja_template([[*CHAT[:2], final]], chat_template=tokenizer.chat_template,
                                         continue_final_message=True, bos_token=tokenizer.bos_token or "",
                                         eos_token=tokenizer.eos_token or "")
    ours = tokenizer.encode_chat([*CHAT[:2], final], continue_final_message=True)
    assert ours == tokenizer.encode(theirs, add_special_tokens=False)
    assert tokenizer.decode(ours).endswith(f"{final['role']}\n{final['content']}")


@pytest.mark.parametrize("messages, add_generation_prompt, message", [
    (PREFILLED, True, "set at most one"),
    ([], None, "needs a message to continue"),
])
def test_a_final_message_that_cannot_be_continued_is_refused(smollm2_source, messages, add_generation_prompt,
                                                             message):
    with pytest.raises(InvalidRequestError, match=message):
        smollm2_source.tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt,
                                             continue_final_message=True)


def test_token_bytes_rebuild_characters_split_across_tokens(smollm2_source):
    tokenizer = smollm2_source.tokenizer
    text = "Hello wörld 🎉 日本語 <|im_start|>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert "\ufffd" in tokenizer.decode([ids[5]])  # the emoji is split: its tokens alone decode to nothing useful
    assert b"".join(tokenizer.token_bytes(i) for i in ids) == text.encode()


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_gemma3_encoding_matches_transformers(gemma3_tokenizer, transformers_answers, add_special_tokens):
    answers = transformers_answers[f"gemma3 add_special_tokens={add_special_tokens}"]
    for text, theirs in zip(GEMMA3_TEXTS, answers, strict=True):
        assert gemma3_tokenizer.encode(text, add_special_tokens=add_special_tokens) == theirs, text
    assert gemma3_tokenizer.encode("", add_special_tokens=add_special_tokens) == ([2] if add_special_tokens else [])


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_gemma3_decoding_matches_transformers(gemma3_tokenizer, transformers_answers, skip_special_tokens):
    encoded = transformers_answers["gemma3 add_special_tokens=True"]
    decoded = transformers_answers[f"gemma3 decoded skip_special_tokens={skip_special_tokens}"]
    for text, ids, theirs in zip(GEMMA3_TEXTS, encoded, decoded, strict=True):
        assert gemma3_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens) == theirs, text
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


def _vocabulary_file(path: Path, model: str, tokens: list[str], bos_id: int = 0,
                     templates: dict[str, str] | None = None, pre: str | None = None,
                     merges: list[str] | None = None, flags: dict[str, bool] | None = None,
                     eos_id: int | None = None, types: list[int] | None = None) -> GGUFFile:
    """A GGUF file holding only a tokenizer: its kind, tokens and their types (no scores), chat templates, flags."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    if merges is not None:
        writer.add_token_merges(merges)
    writer.add_token_list(tokens)
    writer.add_token_types(types or [3] + [1] * (len(tokens) - 1))  # by default the first a control token, as <s>
    writer.add_bos_token_id(bos_id)
    if eos_id is not None:
        writer.add_eos_token_id(eos_id)
    for key, template in (templates or {}).items():
        writer.add_string(key, template)
    for key, flag in (flags or {}).items():
        writer.add_bool(key, flag)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GGUFFile(path)


def test_unsupported_gguf_tokenizer_names_the_supported_ones(tmp_path):
    with pytest.raises(ModelLoadError, match="'gpt2'.*'llama'"):
        Tokenizer.from_gguf(_vocabulary_file(tmp_path / "t5.gguf", "t5", ["<s>", "a"]), [])


def test_a_gguf_without_a_tokenizer_says_so_and_names_the_file(tmp_path):
    path = tmp_path / "bare.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    # It said "GGUF tokenizer model None is not supported yet", naming no file.
    with pytest.raises(ModelLoadError, match="bare.gguf has no tokenizer"):
        Tokenizer.from_gguf(GGUFFile(path), [])


def test_padding_and_truncation_saved_in_tokenizer_json_are_not_applied_to_prompts(tmp_path, smollm2_source):
    # A file saved with them on (all-MiniLM's, fine-tunes saved after padded training) padded "hi" to 128 tokens of
    # padding and cut a long text at 128, silently; transformers' tokenizer applies neither unless asked.
    backend = copy.deepcopy(smollm2_source.tokenizer.backend)
    backend.enable_padding(length=128, pad_id=0)
    backend.enable_truncation(max_length=128)
    backend.save(str(tmp_path / "tokenizer.json"))
    tokenizer = Tokenizer.from_hf_dir(tmp_path, eos_token_ids=[2])
    long_text = "word " * 300
    for text in ("hi", long_text):
        assert tokenizer.encode(text) == smollm2_source.tokenizer.encode(text)
    assert len(tokenizer.encode(long_text)) > 128


def test_a_sentencepiece_vocabulary_without_scores_still_merges_into_its_pieces(tmp_path):
    pieces = ["<s>", "a", "b", "\u2581", "\u2581a", "ab", "\u2581ab"]
    tokenizer = Tokenizer.from_gguf(_vocabulary_file(tmp_path / "spm.gguf", "llama", pieces), [])
    # Without merges (every score missing) "ab" would stay three pieces: "\u2581", "a", "b".
    assert tokenizer.encode("ab") == [0, 6]  # BOS, added where the file does not say otherwise
    assert tokenizer.bos_token == "<s>" and tokenizer.decode([0, 6]) == "ab"


def test_a_vocabulary_that_asks_for_eos_gets_it_after_the_text(tmp_path):
    # As llama.cpp and transformers read tokenizer.ggml.add_eos_token (embedding models' files set it).
    pieces = ["<s>", "a", "b", "\u2581", "\u2581a", "ab", "\u2581ab", "</s>"]
    file = _vocabulary_file(tmp_path / "spm.gguf", "llama", pieces, flags={"tokenizer.ggml.add_eos_token": True},
                            eos_id=7)
    assert Tokenizer.from_gguf(file, [7]).encode("ab") == [0, 6, 7]


def test_a_word_after_a_skipped_control_token_keeps_its_space_when_streamed(tmp_path):
    pieces = ["<s>", "a", "b", "\u2581", "\u2581a", "ab", "\u2581ab"]
    tokenizer = Tokenizer.from_gguf(_vocabulary_file(tmp_path / "spm.gguf", "llama", pieces), [])
    output = [6, 0, 6]  # "ab", a control token the text leaves out, " ab"
    detokenizer = IncrementalDetokenizer(tokenizer, [0, 0], [], False)
    for token_id in output:
        detokenizer.add(token_id)
    detokenizer.finish()
    assert detokenizer.stream_text == tokenizer.decode(output) == "ab ab"


def test_the_first_word_after_a_prompt_ending_in_byte_spelled_characters_keeps_its_space(tmp_path):
    # Llama 2 and Mistral spell characters outside their vocabulary as <0xNN> pieces. Two emoji end the prompt:
    # the detokenizer's window of its last tokens started partway through the first, decoded as U+FFFD throughout,
    # and was emptied, so " ab" streamed as "ab".
    pieces = ["<s>", *(f"<0x{b:02X}>" for b in range(256)), "\u2581", "a", "b", "\u2581a", "ab", "\u2581ab"]
    tokenizer = Tokenizer.from_gguf(_vocabulary_file(tmp_path / "spm.gguf", "llama", pieces,
                                                     types=[3, *[6] * 256, *[1] * 6]), [])
    word = tokenizer.backend.token_to_id("\u2581ab")
    for prompt in ("ab\U0001f389", "ab\U0001f389\U0001f389"):
        detokenizer = IncrementalDetokenizer(tokenizer, tokenizer.encode(prompt), [], False)
        detokenizer.add(word)
        detokenizer.finish()
        assert detokenizer.text == " ab", prompt


def test_a_llama3_vocabulary_gets_a_bos_where_its_file_does_not_say(tmp_path):
    # As llama.cpp: early Llama 3 GGUF files have no add_bos_token key, and their models expect <|begin_of_text|>.
    path = tmp_path / "llama3.gguf"
    tokenizer = Tokenizer.from_gguf(_vocabulary_file(path, "gpt2", ["<|begin_of_text|>", "H", "i", "Hi"],
                                                     pre="llama-bpe", merges=["H i"]), [])
    assert tokenizer.encode("Hi") == [0, 3]


@pytest.mark.parametrize(("alias", "name"), [("deepseek-r1-qwen", "qwen2"), ("megrez", "qwen2"),
                                             ("falcon3", "llama3"), ("pixtral", "llama3"),
                                             # These split " 2024" as GPT-2 does, into one piece: llama.cpp splits
                                             # every digit off, as for SmolLM.
                                             ("starcoder", "smollm"), ("command-r", "smollm"),
                                             ("minerva-7b", "smollm")])
def test_llama_cpps_other_names_for_a_pre_tokenizer_split_as_it_does(alias, name):
    text = "x.\n\n12345 I'M here!!\n"
    assert _byte_level_pre_tokenizer(alias).pre_tokenize_str(text) == _byte_level_pre_tokenizer(
        name).pre_tokenize_str(text)


def test_a_bos_id_outside_the_vocabulary_is_a_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="bos_token_id 9 names no token"):
        Tokenizer.from_gguf(_vocabulary_file(tmp_path / "bos.gguf", "llama", ["<s>", "a"], bos_id=9), [])


def test_a_tokenizer_without_tokens_is_a_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no tokenizer.ggml.tokens"):
        Tokenizer.from_gguf(_vocabulary_file(tmp_path / "empty.gguf", "gpt2", []), [])


if __name__ == "__main__":
    print(json.dumps(_transformers_answers()))


@pytest.mark.parametrize("layout", ["jinja file", "jinja files", "named templates"])
def test_a_folders_chat_template_is_found_where_transformers_saves_it(tmp_path, smollm2_source, layout):
    smollm2_source.tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    tool_use = "{% for t in tools %}[{{ t.function.name }}]{% endfor %}" + template
    if layout == "jinja file":
        (tmp_path / "chat_template.jinja").write_text(template)
        config = {}
    elif layout == "jinja files":  # transformers 5's save_pretrained of named templates
        (tmp_path / "chat_template.jinja").write_text(template)
        (tmp_path / "additional_chat_templates").mkdir()
        (tmp_path / "additional_chat_templates" / "tool_use.jinja").write_text(tool_use)
        config = {}
    else:
        named = [{"name": "tool_use", "template": tool_use}, {"name": "default", "template": template}]
        config = {"chat_template": named}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = Tokenizer.from_hf_dir(tmp_path, eos_token_ids=[2])
    messages = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(messages) == "<user>hi"
    # With tools, the tool_use template where there is one, as transformers and llama.cpp choose it.
    tools = [{"type": "function", "function": {"name": "f"}}]
    with_tools = tokenizer.apply_chat_template(messages, tools=tools)
    assert (with_tools, tokenizer.renders_tools) == (("<user>hi", False) if layout == "jinja file"
                                                     else ("[f]<user>hi", True))


def test_a_template_sees_the_folders_other_special_tokens_as_transformers_gives_them(tmp_path, smollm2_source):
    # Only bos_token and eos_token were set: {{ pad_token }} rendered as nothing, and the prompt differed.
    import transformers

    smollm2_source.tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    config = {"pad_token": {"__type": "AddedToken", "content": "<|im_start|>", "special": True},
              "unk_token": "<|endoftext|>", "chat_template": "{{ pad_token }}{{ messages[0].content }}{{ unk_token }}"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    messages = [{"role": "user", "content": "hi"}]
    ours = Tokenizer.from_hf_dir(tmp_path, eos_token_ids=[2]).apply_chat_template(messages)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(messages, tokenize=False)
    assert ours == theirs == "<|im_start|>hi<|endoftext|>"
    # A request's chat_template_kwargs may set them, as transformers' apply_chat_template kwargs do.
    assert Tokenizer.from_hf_dir(tmp_path, eos_token_ids=[2]).apply_chat_template(
        messages, template_kwargs={"unk_token": "?"}) == "<|im_start|>hi?"


@pytest.mark.parametrize("call, expected", [("tojson(ensure_ascii=False)", '{"name": "wetter", "unit": "°C"}'),
                                            ("tojson(separators=(',', ':'), sort_keys=True)",
                                             '{"name":"wetter","unit":"°C"}'),
                                            ("tojson(indent=1)", '{\n "name": "wetter",\n "unit": "°C"\n}')])
def test_tojson_takes_the_keywords_transformers_gives_it(tmp_path, smollm2_source, call, expected):
    # GLM-4.5's and MiniCPM's templates pass ensure_ascii: a TypeError, not a template error, and so a 500.
    smollm2_source.tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ tools[0] | " + call + " }}"}))
    tokenizer = Tokenizer.from_hf_dir(tmp_path, eos_token_ids=[2])
    tools = [{"name": "wetter", "unit": "°C"}]
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=tools) == expected


def test_a_gguf_files_tool_use_template_serves_chats_with_tools(tmp_path):
    pieces = ["<s>", "a", "b"]
    file = _vocabulary_file(tmp_path / "t.gguf", "llama", pieces,
                            templates={"tokenizer.chat_template": "plain", "tokenizer.chat_template.tool_use": "tools"})
    tokenizer = Tokenizer.from_gguf(file, [])
    assert tokenizer.apply_chat_template([]) == "plain"
    assert tokenizer.apply_chat_template([], tools=[{"type": "function"}]) == "tools" and tokenizer.renders_tools


def test_tokenizers_whose_ids_mean_the_same_share_a_fingerprint(smollm2_source, smollm2_path, gemma3_tokenizer):
    gguf = GGUFFile(smollm2_path)
    again = Tokenizer.from_gguf(gguf, gguf.model_config().eos_token_ids)
    assert again.fingerprint == smollm2_source.tokenizer.fingerprint != gemma3_tokenizer.fingerprint


def test_a_tokens_text_keeps_the_word_initial_space_its_lone_decode_strips(tmp_path, smollm2_source):
    pieces = ["<s>", "a", "b", "\u2581", "\u2581a", "ab", "\u2581ab"]
    spm = Tokenizer.from_gguf(_vocabulary_file(tmp_path / "spm.gguf", "llama", pieces), [])
    # A Llama-style SentencePiece decoder strips the space it prefixed to the text, from a lone token too.
    assert spm.decode([6]) == "ab" and spm.token_text(6) == " ab" == spm.token_bytes(6).decode()
    smollm2 = smollm2_source.tokenizer
    ids = smollm2.encode("The capital of France is Paris. Caf\u00e9!", add_special_tokens=False)
    assert [smollm2.token_text(t) for t in ids] == [smollm2.decode([t]) for t in ids]  # byte-level: the same
    assert smollm2.token_text(smollm2.eos_token_ids[0]) == ""  # a special token, as decoding leaves it out


def test_special_tokens_are_the_control_ones_not_every_added_token(gemma3_tokenizer):
    # Gemma 3 adds "\n" as a user-defined token: ordinary text, which a grammar must be free to produce.
    newline = gemma3_tokenizer.encode("\n", add_special_tokens=False)
    assert len(newline) == 1 and newline[0] not in gemma3_tokenizer.special_token_ids()
    assert set(gemma3_tokenizer.eos_token_ids) <= set(gemma3_tokenizer.special_token_ids())


def test_generation_tags_render_their_body_as_transformers_does(smollm2_source):
    from transformers.utils.chat_template_utils import render_jinja_template

    # Templates of models tuned on assistant turns alone mark those turns; every chat to them was refused.
    template = ("{% for m in messages %}{% if m.role == 'assistant' %}{%- generation -%}\n [{{ m.content }}] "
                "{%- endgeneration %}{% else %}{{ m.content }}\n{% endif %}{% endfor %}")
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    tokenizer = copy.copy(smollm2_source.tokenizer)
    tokenizer.chat_template = template
    [expected], _ = render_jinja_template([messages], chat_template=template)
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=False) == expected == "a\n[b]"


def test_a_gguf_chat_models_end_of_turn_token_ends_generation(gemma3_tokenizer, smollm2_source):
    # The file's metadata names only <eos> (1); llama.cpp, and transformers' generation config for Gemma 3, end at
    # <end_of_turn> (106) too. The file's own ids stay first.
    assert gemma3_tokenizer.eos_token_ids == [1, 106]
    assert smollm2_source.tokenizer.eos_token_ids == [2, 0]  # <|im_end|>, then <|endoftext|>


def test_a_folders_tokenizer_eos_ends_replies_beside_generation_configs(tmp_path, smollm2_source):
    # A ChatML fine-tune: tokenizer_config names <|im_end|> (2 in this vocabulary), generation_config keeps the
    # base's </s>-like id. Only generation_config's was kept, so replies ran past the end of turn to max_tokens.
    smollm2_source.tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    im_end = smollm2_source.tokenizer.backend.token_to_id("<|im_end|>")
    assert Tokenizer.from_hf_dir(tmp_path, eos_token_ids=[0]).eos_token_ids == [0, im_end]
    assert Tokenizer.from_hf_dir(tmp_path, eos_token_ids=[im_end]).eos_token_ids == [im_end]


def test_a_gguf_files_recommended_sampling_is_read_by_llama_cpps_keys(tmp_path):
    path = tmp_path / "v.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_float32("general.sampling.temp", 0.6)
    writer.add_uint32("general.sampling.top_k", 20)
    writer.add_float32("general.sampling.penalty_repeat", 1.25)
    writer.add_uint32("general.sampling.mirostat", 0)  # not a setting of ours: left out
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    from tokenmill.loader.source import _sampling_defaults

    # float32's 0.6 (0.6000000238) read as the 0.6 a generation_config.json says, so `auto` finds them shared.
    assert _sampling_defaults(GGUFFile(path)) == {"temperature": 0.6, "top_k": 20, "repetition_penalty": 1.25}


def test_chat_template_kwargs_reach_the_template_as_vllm_passes_them(tmp_path, smollm2_source):
    from tokenmill.server.protocol import ChatCompletionRequest

    # Qwen3's template reads enable_thinking; the request field was dropped, so thinking could not be turned off.
    smollm2_source.tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    tokenizer = Tokenizer.from_hf_dir(tmp_path, eos_token_ids=[2])
    messages = [{"role": "user", "content": "hi"}]
    body = {"messages": messages, "chat_template_kwargs": {"enable_thinking": False}}
    ids = ChatCompletionRequest.model_validate(body).prompt_token_ids(tokenizer)
    assert tokenizer.decode(ids) == "<user>hi<think></think>"
    assert tokenizer.decode(ChatCompletionRequest(messages=messages).prompt_token_ids(tokenizer)) == "<user>hi"
    with pytest.raises(InvalidRequestError, match="may not set add_generation_prompt, messages") as refused:
        tokenizer.encode_chat(messages, template_kwargs={"messages": [], "add_generation_prompt": False})
    assert refused.value.param == "chat_template_kwargs"


def test_documents_and_reasoning_effort_reach_the_template_as_vllm_passes_them(smollm2_source):
    from tokenmill.server.protocol import ChatCompletionRequest

    # Both were dropped silently: a retrieval template wrote no documents, and the answer had nothing to cite.
    tokenizer = copy.copy(smollm2_source.tokenizer)
    tokenizer.chat_template = ("{% for d in documents or [] %}[{{ d.title }}: {{ d.text }}]{% endfor %}"
                               "{{ reasoning_effort or '' }}|{% for m in messages %}{{ m.content }}{% endfor %}")
    body = {"messages": [{"role": "user", "content": "hi"}], "documents": [{"title": "A", "text": "x"}],
            "reasoning_effort": "low"}
    ids = ChatCompletionRequest.model_validate(body).prompt_token_ids(tokenizer)
    assert tokenizer.decode(ids) == "[A: x]low|hi"
    # chat_template_kwargs are applied last, as vLLM applies them.
    body["chat_template_kwargs"] = {"reasoning_effort": "high"}
    assert tokenizer.decode(ChatCompletionRequest.model_validate(body).prompt_token_ids(tokenizer)) == "[A: x]high|hi"


@pytest.mark.parametrize("kwargs, message", [
    ({"namespace": True}, "may not set namespace"),  # a function Qwen's templates call: a TypeError inside
    ({"date_string": 5}, "can only concatenate"),  # Llama 3.1's variable of the wrong kind: a TypeError inside
    ({1: True}, "map names to values"),
])
def test_chat_template_kwargs_that_break_the_template_are_the_requests_fault(smollm2_source, kwargs, message):
    # Each was a TypeError from the render: a 500 and a traceback for a client's mistake.
    tokenizer = copy.copy(smollm2_source.tokenizer)
    tokenizer.chat_template = ("{%- set ns = namespace(n=0) %}{%- if date_string is defined %}"
                               "{{ 'Date ' + date_string }}{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}")
    with pytest.raises(InvalidRequestError, match=message) as refused:
        tokenizer.encode_chat([{"role": "user", "content": "hi"}], template_kwargs=kwargs)
    assert refused.value.param == "chat_template_kwargs"
