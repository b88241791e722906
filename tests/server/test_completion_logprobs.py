"""The legacy completions logprobs block: top alternatives keyed by text, as OpenAI returns them."""

from types import SimpleNamespace

from tokenmill.outputs import TokenLogprob
from tokenmill.server.completions import completion_logprobs

# Tokens 1 and 2 are each half a character: their texts collide.
TOKENIZER = SimpleNamespace(token_text={1: "\ufffd", 2: "\ufffd", 3: "a"}.get)


def test_tokens_whose_texts_collide_keep_the_most_likely_ones_logprob():
    out = completion_logprobs([1], [TokenLogprob(1, -0.5, [(1, -0.5), (2, -1.0)])], TOKENIZER, 0)
    assert out["top_logprobs"] == [{"\ufffd": -0.5}] and out["token_logprobs"] == [-0.5]


def test_the_sampled_token_is_among_the_top_logprobs_even_when_unlikely():
    out = completion_logprobs([3], [TokenLogprob(3, -3.0, [(1, -0.5)])], TOKENIZER, 0)
    assert out["top_logprobs"] == [{"\ufffd": -0.5, "a": -3.0}]
