"""A reasoning model's <think>...</think> split from its answer, whole and streamed alike."""

import random

import pytest

from tokenmill.server.reasoning import ReasoningStream, split_reasoning


@pytest.mark.parametrize("parser, text, expected", [
    ("qwen3", "<think>\nhmm\n</think>\n\nHello", ("\nhmm\n", "Hello")),
    ("qwen3", " Hello", (None, " Hello")),  # Qwen3 opens its thinking itself: without <think> there is none
    ("qwen3", "<think>still thinking", ("still thinking", "")),
    ("qwen3", "<thi", (None, "<thi")),  # a prefix of the tag, and then the answer ended: text after all
    ("qwen3", "x<think>y</think>z", (None, "x<think>y</think>z")),  # a tag mid-answer is not thinking
    ("deepseek_r1", "hmm</think>\nHi", ("hmm", "Hi")),  # its template opened the thinking in the prompt
    ("deepseek_r1", "<think>hmm</think>Hi", ("hmm", "Hi")),
    ("deepseek_r1", "still thinking", ("still thinking", "")),
    ("deepseek_r1", "a</thi", ("a</thi", "")),
])
def test_an_answer_splits_as_vllms_parser_of_that_name_splits_it(parser, text, expected):
    assert split_reasoning(text, parser) == expected


@pytest.mark.parametrize("parser", ["qwen3", "deepseek_r1"])
def test_a_stream_cut_anywhere_splits_as_the_whole_answer(parser):
    # Tags arrive in pieces ("</th", "ink>"): held back until they can be told from text.
    rng = random.Random(0)
    for text in ["<think>\nhmm, 2 < 3\n</think>\n\nHello </world>", "hmm</think>Hi", "<think>x", "<", "plain"]:
        for _ in range(40):
            stream, reasoning, content, i = ReasoningStream(parser), "", "", 0
            while i < len(text):
                j = i + rng.randint(1, 4)
                r, c = stream.feed(text[i:j])
                reasoning, content, i = reasoning + r, content + c, j
            r, c = stream.finish()
            assert (reasoning + r if stream.thought else None, content + c) == split_reasoning(text, parser)
