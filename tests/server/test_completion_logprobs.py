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


def test_logprobs_json_cannot_carry_come_out_as_null_and_vllms_floor():
    # A NaN row (hidden states gone NaN, which the quantized kernels now pass on as a float matmul does) made the
    # whole response a 500 and a stream's event invalid JSON; -inf too.
    import json
    import math

    from tokenmill.server.chat import chat_logprobs

    nan, inf = float("nan"), float("inf")
    tokenizer = SimpleNamespace(token_text=TOKENIZER.token_text, token_bytes=lambda t: b"a")
    logprobs = [TokenLogprob(3, nan, [(3, nan)]), TokenLogprob(3, -inf, [(3, -inf)])]
    legacy = completion_logprobs([3, 3], logprobs, tokenizer, 0)
    chat = chat_logprobs([3, 3], logprobs, tokenizer)
    assert legacy["token_logprobs"] == [None, -9999.0] and legacy["top_logprobs"] == [{"a": None}, {"a": -9999.0}]
    assert [e["logprob"] for e in chat["content"]] == [None, -9999.0]
    json.dumps([legacy, chat], allow_nan=False)  # what Starlette's JSONResponse asks of a body
    assert math.isnan(logprobs[0].logprob)  # the offline API keeps the engine's value, as vLLM's does
