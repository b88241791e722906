"""Cost in every response, read with the official openai client, and adding up to the busy time billed."""

import asyncio
import math
import time

import pytest
from openai import AsyncOpenAI, OpenAI

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def _idle(server) -> bool:
    return server.metric("tokenmill:num_requests_running") == server.metric("tokenmill:num_requests_waiting") == 0


def _cost(usage) -> tuple[float, dict]:
    """usage.cost and usage.cost_details, which the client keeps as extra fields."""
    return usage.model_extra["cost"], usage.model_extra["cost_details"]


def test_costs_of_concurrent_requests_add_up_to_busy_time_at_the_price(server):
    _wait_for(lambda: _idle(server))
    busy_before = server.metric("tokenmill:busy_seconds_total")
    billed_before = server.metric("tokenmill:cost_usd_total")
    client = AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    args = dict(model=MODEL, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})

    async def streamed(prompt: str):
        stream = await client.completions.create(prompt=prompt, stream=True, stream_options={"include_usage": True},
                                                 **args)
        return [c async for c in stream][-1]  # the usage chunk

    async def run():
        return await asyncio.gather(
            *(client.completions.create(prompt=f"Count from {i} to {i + 9}:", **args) for i in range(3)),
            client.completions.create(prompt=["Two prompts,", "one response"], n=2, **args),  # 4 engine requests
            client.chat.completions.create(messages=[{"role": "user", "content": "Name a color."}], **args),
            streamed("Once upon a time"),
        )

    results = asyncio.run(run())
    costs = [_cost(result.usage) for result in results]
    price = costs[0][1]["price_per_hour"]
    assert price > 0 and all(details["price_per_hour"] == price for _, details in costs)
    total = math.fsum(cost for cost, _ in costs)
    # The engine publishes its busy time right after the step that answered the last request.
    _wait_for(lambda: _idle(server) and math.isclose(
        total, (server.metric("tokenmill:busy_seconds_total") - busy_before) * price / 3600, rel_tol=0.01))
    assert server.metric("tokenmill:cost_usd_total") - billed_before == pytest.approx(total, rel=0.01)
    full = server.metric("tokenmill:cost_per_1m_completion_tokens_usd", utilization="full")
    current = server.metric("tokenmill:cost_per_1m_completion_tokens_usd", utilization="current")
    assert 0 < full <= current
    assert 0 <= server.metric("tokenmill:idle_cost_fraction") < 1


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_cost_is_in_whole_responses_and_their_header(client, endpoint):
    if endpoint == "chat":
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "Say hi."}], max_tokens=4)
    else:
        raw = client.completions.with_raw_response.create(model=MODEL, prompt="Say hi.", max_tokens=4)
    cost, details = _cost(raw.parse().usage)
    assert cost > 0 and details["compute_seconds"] > 0
    assert cost == pytest.approx(details["compute_seconds"] * details["price_per_hour"] / 3600)
    assert float(raw.headers["x-tokenmill-cost-usd"]) == cost


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_cost_is_in_the_final_usage_chunk_of_a_stream(client, endpoint):
    args = dict(model=MODEL, max_tokens=4, stream=True, stream_options={"include_usage": True})
    if endpoint == "chat":
        chunks = list(client.chat.completions.create(messages=[{"role": "user", "content": "Say hi."}], **args))
    else:
        chunks = list(client.completions.create(prompt="Say hi.", **args))
    cost, details = _cost(chunks[-1].usage)
    assert chunks[-1].choices == [] and cost > 0 and details["compute_seconds"] > 0
    assert cost == pytest.approx(details["compute_seconds"] * details["price_per_hour"] / 3600)


@pytest.mark.parametrize("stream", [False, True])
def test_each_answer_says_how_long_its_client_waited(client, stream):
    # Latency beside cost in every usage block: the first token's wait and the whole, from the request's arrival.
    import time

    began = time.perf_counter()
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi."}],
                                            max_tokens=4, stream=stream,
                                            **({"stream_options": {"include_usage": True}} if stream else {}))
    usage = list(answer)[-1].usage if stream else answer.usage
    waited = time.perf_counter() - began
    latency = usage.model_extra["latency"]
    assert 0 < latency["time_to_first_token_seconds"] <= latency["end_to_end_seconds"] < waited


def test_startup_log_states_the_price_and_how_to_change_it(server):
    log = server.log.read_text()
    assert "pricing compute time at $" in log and "pass --price-per-hour USD" in log
