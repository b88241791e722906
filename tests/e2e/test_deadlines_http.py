"""Deadlines and the waiting-token bound over HTTP: headers in, 429 out in OpenAI's shape, late answers marked."""

import asyncio
import time

import httpx
import pytest
from openai import AsyncOpenAI, BadRequestError, OpenAI, RateLimitError

CHAT = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "Say hi."}], "temperature": 0}


@pytest.fixture(scope="module")
def bounded(start_server):
    """One running sequence at a time and 64 prompt tokens of queue: easy to fill, and to overfill."""
    server = start_server("--max-num-seqs", "1", "--max-waiting-tokens", "64")
    # Enough measured steps for the engine to trust its step-time fit (tokenmill/engine/deadlines.py).
    body = {"prompt": "Count: one two", "max_tokens": 16, "ignore_eos": True, "temperature": 0}
    assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=120).status_code == 200
    return server


def _client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_infeasible_deadline_is_refused_at_once_with_the_estimate(bounded):
    refused = bounded.metric("tokenmill:deadline_requests_total", outcome="refused")
    with pytest.raises(RateLimitError) as info:
        _client(bounded).chat.completions.create(**CHAT, max_tokens=200, extra_body={"ignore_eos": True},
                                                 extra_headers={"x-tokenmill-deadline-ms": "5"})
    error = info.value.body
    assert error["code"] == "deadline_infeasible" and error["type"] == "rate_limit_error"
    assert info.value.response.headers["retry-after"] == "1"  # as the other 429s say it
    assert "estimated to end" in error["message"] and "5 ms deadline" in error["message"]
    with pytest.raises(RateLimitError, match="first token is estimated"):
        _client(bounded).completions.create(model="smollm2-135m", prompt="Hello " * 40, max_tokens=1,
                                            extra_headers={"x-tokenmill-ttft-deadline-ms": "0.5"})
    assert bounded.metric("tokenmill:deadline_requests_total", outcome="refused") == refused + 2


def test_feasible_deadline_is_answered_and_marked_met(bounded):
    raw = _client(bounded).chat.completions.with_raw_response.create(
        **CHAT, max_tokens=4, extra_headers={"x-tokenmill-deadline-ms": "120000"})
    assert raw.headers["x-tokenmill-deadline"] == "met"
    assert raw.parse().choices[0].message.content
    stream = _client(bounded).completions.create(model="smollm2-135m", prompt="Hi", max_tokens=3, stream=True,
                                                 extra_headers={"x-tokenmill-ttft-deadline-ms": "120000"})
    marks = [chunk.model_extra.get("deadline_status") for chunk in stream]
    assert marks[-1] == "met"


def test_bad_deadline_header_is_a_400_naming_it(bounded):
    with pytest.raises(BadRequestError, match="x-tokenmill-deadline-ms: 'soon' must be a positive number"):
        _client(bounded).chat.completions.create(**CHAT, max_tokens=1,
                                                 extra_headers={"x-tokenmill-deadline-ms": "soon"})


def test_waiting_token_bound_refuses_with_429_and_retry_after(bounded):
    client = AsyncOpenAI(base_url=f"{bounded.url}/v1", api_key="unused", max_retries=0)
    prompt = "word " * 40  # about 40 tokens: one waits within the 64-token bound, a second does not fit

    async def scenario() -> None:
        running = await client.completions.create(model="smollm2-135m", prompt="Go", max_tokens=2000,
                                                  extra_body={"ignore_eos": True}, stream=True)
        await anext(aiter(running))  # it holds the only running slot now
        waiting = asyncio.ensure_future(client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=1))
        deadline = time.monotonic() + 30
        while bounded.metric("tokenmill:num_requests_waiting") < 1:
            assert time.monotonic() < deadline, "the second request never queued"
            await asyncio.sleep(0.05)
        started = time.perf_counter()
        with pytest.raises(RateLimitError) as info:
            await client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=1)
        assert time.perf_counter() - started < 2  # refused at the door, not after waiting
        assert info.value.body["code"] == "too_many_waiting_tokens"
        assert info.value.response.headers["retry-after"] == "1"
        await running.close()  # frees the slot: the queued one is served
        assert (await waiting).choices[0].finish_reason == "length"

    asyncio.run(scenario())
