"""`model: "auto"` against a real two-model server (SmolLM2 twice, cheap then strong), read with the openai client."""

import math
import time

import httpx
import pytest
from openai import BadRequestError, OpenAI

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ARGS = dict(model="auto", messages=QUESTION, max_tokens=8, temperature=0)


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def _client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def cheapest(start_server, smollm2_path):
    """The default router over `cheap` (the catalog name) and `strong` (the same weights by path)."""
    return start_server("--model", "cheap=smollm2-135m", "--model", f"strong={smollm2_path}")


@pytest.fixture(scope="module")
def always_escalates(start_server, smollm2_path):
    """Cascade with threshold 0: token logprobs are never above 0, so every answer's mean is below unless all are 0."""
    return start_server("--model", "cheap=smollm2-135m", "--model", f"strong={smollm2_path}",
                        "--router", "cascade", "--cascade-threshold", "0")


@pytest.fixture(scope="module")
def never_escalates(start_server, smollm2_path):
    """Cascade with a threshold no answer falls below."""
    return start_server("--model", "cheap=smollm2-135m", "--model", f"strong={smollm2_path}",
                        "--router", "cascade", "--cascade-threshold=-1e9")


def test_models_lists_auto_after_the_served_models(cheapest):
    client = _client(cheapest)
    assert [m.id for m in client.models.list().data] == ["cheap", "strong", "auto"]
    assert client.models.retrieve("auto").id == "auto"


def test_auto_under_cheapest_is_answered_by_the_first_model_and_says_why(cheapest):
    raw = _client(cheapest).chat.completions.with_raw_response.create(**ARGS)
    result = raw.parse()
    assert result.model == "cheap" and "Paris" in result.choices[0].message.content
    assert raw.headers["x-tokenmill-routed-model"] == "cheap"
    assert raw.headers["x-tokenmill-route-reason"] == "cheapest fits"
    assert cheapest.metric("tokenmill:routed_requests_total", model_name="cheap", policy="cheapest",
                           reason="fits") >= 1
    # Token ids too: both models load the one tokenizer, so the ids mean the same to either.
    assert _client(cheapest).completions.create(model="auto", prompt=[504, 3575], max_tokens=2).model == "cheap"


def test_auto_under_cheapest_streams_from_the_model_it_chose(cheapest):
    chunks = list(_client(cheapest).completions.create(model="auto", prompt="The capital of France is",
                                                        max_tokens=4, temperature=0, stream=True))
    assert {c.model for c in chunks} == {"cheap"}
    assert "".join(c.choices[0].text for c in chunks).startswith(" Paris")


def test_auto_that_fits_no_models_context_is_a_400(cheapest):
    with pytest.raises(BadRequestError) as caught:
        _client(cheapest).completions.create(model="auto", prompt="hi", max_tokens=10**7)
    assert caught.value.code == "context_length_exceeded"


def test_cascade_below_the_threshold_answers_with_the_strong_model_and_bills_both_runs(always_escalates):
    server = always_escalates
    busy_before = {name: server.metric("tokenmill:busy_seconds_total", model_name=name) for name in ("cheap", "strong")}
    raw = _client(server).chat.completions.with_raw_response.create(**ARGS)
    result = raw.parse()
    assert result.model == "strong" and raw.headers["x-tokenmill-routed-model"] == "strong"
    assert raw.headers["x-tokenmill-route-reason"].startswith("cascade: escalated, confidence ")
    assert result.choices[0].logprobs is None  # the client did not ask for them
    cost, details = result.usage.model_extra["cost"], result.usage.model_extra["cost_details"]
    assert float(raw.headers["x-tokenmill-cost-usd"]) == cost

    def busy(name: str) -> float:
        return server.metric("tokenmill:busy_seconds_total", model_name=name) - busy_before[name]

    # Both engines ran, and the response's compute seconds are the busy seconds of both, not the strong run's alone.
    _wait_for(lambda: math.isclose(busy("cheap") + busy("strong"), details["compute_seconds"], rel_tol=0.01))
    assert busy("cheap") > 0 and busy("strong") > 0
    assert details["compute_seconds"] > max(busy("cheap"), busy("strong"))
    assert cost == pytest.approx(details["compute_seconds"] * details["price_per_hour"] / 3600)
    assert server.metric("tokenmill:routed_requests_total", model_name="strong", policy="cascade",
                         reason="escalated") == 1


def test_cascade_at_or_above_the_threshold_keeps_the_cheap_answer(never_escalates):
    raw = _client(never_escalates).completions.with_raw_response.create(
        model="auto", prompt="The capital of France is", max_tokens=4, temperature=0)
    result = raw.parse()
    assert result.model == "cheap" and result.choices[0].text.startswith(" Paris")
    assert raw.headers["x-tokenmill-route-reason"].startswith("cascade: confidence ")
    assert result.choices[0].logprobs is None  # computed for the router, not asked for by the client


def test_cascade_returns_logprobs_the_client_asked_for(never_escalates):
    result = _client(never_escalates).chat.completions.create(**ARGS, logprobs=True)
    assert result.model == "cheap" and len(result.choices[0].logprobs.content) == result.usage.completion_tokens


def test_streamed_auto_under_cascade_is_a_400(never_escalates):
    response = httpx.post(f"{never_escalates.url}/v1/chat/completions", json={**ARGS, "stream": True})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "stream" and "non-streamed" in error["message"]
