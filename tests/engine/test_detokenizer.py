"""Incremental detokenization: streamed text is what decoding the whole output gives, at either end of it."""

import pytest

from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.sequence import Sequence
from tokenmill.sampling import SamplingParams


def _stream(tokenizer, prompt: list[int], output: list[int], stop: tuple[str, ...] = ()) -> str:
    detokenizer = IncrementalDetokenizer(tokenizer, prompt, list(stop), False)
    for token_id in output:
        if detokenizer.add(token_id) is not None:  # a stop string ends the sequence
            break
    detokenizer.finish()
    return detokenizer.stream_text


def test_an_output_ending_partway_through_a_character_keeps_its_bytes(smollm2_source):
    tok = smollm2_source.tokenizer
    prompt = tok.encode("Say hi:")
    smile = tok.encode("🙂")  # two tokens, the first half a character
    # max_tokens reached after the first: the whole output decodes to a space and a replacement character.
    assert _stream(tok, prompt, tok.encode(" ok") + smile[:1]) == tok.decode(tok.encode(" ok") + smile[:1])
    assert _stream(tok, prompt, [13223]) == tok.decode([13223]) == " \ufffd"
    # Short of a stop string the held-back bytes complete: no stop string ever reaches the output.
    assert _stream(tok, prompt, tok.encode(" ok") + [13223], stop=("k ",)) == " o"


def test_an_output_completing_a_character_the_prompt_began_is_decoded_as_the_whole_output(smollm2_source):
    tok = smollm2_source.tokenizer
    smile = tok.encode("🙂")
    output = smile[1:] + tok.encode(" ok")
    assert _stream(tok, tok.encode("Say hi:") + smile[:1], output) == tok.decode(output) == "\ufffd\ufffd ok"


def test_a_stop_string_begun_before_min_tokens_and_completed_after_it_ends_the_output(smollm2_source):
    # vLLM checks stop strings after min_tokens, looking back over the text before them by the stop's length.
    tok = smollm2_source.tokenizer
    detokenizer = IncrementalDetokenizer(tok, tok.encode("Say:"), ["ab cd"], False)
    assert detokenizer.add(tok.encode(" ab")[0], check_stop=False) is None
    assert detokenizer.add(tok.encode(" cd")[0]) == "ab cd"
    assert detokenizer.text == " "


@pytest.mark.parametrize("ending, min_tokens, expected", [
    ("length", 0, ("stop", " ")), ("eos", 0, ("stop", " ")),
    ("length", 1, ("length", None)),  # within min_tokens no stop string counts, the rest's included
])
def test_the_rest_of_a_character_completing_a_stop_string_at_the_end_says_stop(smollm2_source, ending, min_tokens,
                                                                               expected):
    tok = smollm2_source.tokenizer
    assert tok.token_bytes(459) == b" \xe2\x80"  # a space, then two of an em dash's three bytes
    params = SamplingParams(temperature=0, stop=[" "], min_tokens=min_tokens)
    prompt = tok.encode("The capital of France is")
    detokenizer = IncrementalDetokenizer(tok, prompt, params.stop, params.include_stop_str_in_output)
    seq = Sequence(0, "r", 0, prompt, params, 1 if ending == "length" else 4, tok.eos_token_ids, detokenizer, 0.0)
    seq.append_token(459, None)  # held back for the em dash's last byte: the space not yet checked
    if ending == "eos":
        seq.append_token(tok.eos_token_ids[0], None)
    out = seq.take_delta()
    # The text was cut at " " while the finish said "length" (or EOS's None), which nothing then explained.
    assert (out.finish_reason, out.stop_reason) == expected
    assert out.text == ("" if expected[0] == "stop" else tok.decode([459]))


def test_stop_strings_completing_in_one_token_cut_at_the_first_to_complete(smollm2_source):
    tok = smollm2_source.tokenizer
    (notebook,) = tok.encode(" notebook")
    prompt = tok.encode("My")
    detokenizer = IncrementalDetokenizer(tok, prompt, ["ebook", "boo"], False)
    # "boo" is complete at " noteboo", before "ebook" is: the earliest start cut at " not".
    assert (detokenizer.add(notebook), detokenizer.text) == ("boo", " note")
    # Whatever the tokens: " notebook" as one token or as " note", "book" stops at "te" (the earliest start cut
    # the one token to nothing).
    assert tok.encode(" note") + tok.encode("book") != [notebook]
    for output in ([notebook], tok.encode(" note") + tok.encode("book")):
        assert _stream(tok, prompt, output, stop=(" notebook", "te")) == " no"


@pytest.fixture(scope="module")
def gemma3_tokenizer():
    from tokenmill.loader.source import open_model

    return open_model("gemma3-270m").tokenizer


def test_an_invalid_run_of_byte_tokens_gets_one_replacement_a_byte_it_holds(gemma3_tokenizer):
    tok = gemma3_tokenizer
    byte = {b: tok.backend.token_to_id(f"<0x{b:02X}>") for b in (0xC2, 0xA0, 0xF0, 0xE6, 0x97, 0xA5, 0xC8)}
    # A lone lead byte after a prompt ending in a whole two-byte character: the decoder spelt the prefix's bytes
    # as U+FFFD too, and the slice after it kept one of them.
    assert _stream(tok, [byte[0xC2], byte[0xA0]], [byte[0xF0]]) == "\ufffd"
    # 日 streams when complete; a stray lead byte after it is one U+FFFD, not three.
    output = [byte[0xE6], byte[0x97], byte[0xA5], byte[0xC8], tok.backend.token_to_id("é")]
    assert _stream(tok, tok.encode("Hello", add_special_tokens=False), output) == "日\ufffdé"
