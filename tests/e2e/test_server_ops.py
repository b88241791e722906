"""Operating the server: metrics, cancellation on disconnect, auth, back-pressure, graceful shutdown."""

import asyncio
import json
import signal
import threading
import time

import httpx
import pytest
from openai import AuthenticationError, OpenAI

LONG = {"prompt": "Tell me a long story.", "max_tokens": 4000, "ignore_eos": True, "temperature": 0}


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_metrics_count_tokens_and_latencies(server):
    before = server.metric("tokenmill:generation_tokens_total")
    finished = server.metric("tokenmill:request_finished_total", finished_reason="length")
    body = {"prompt": "The capital of France is", "max_tokens": 5, "temperature": 0}
    assert httpx.post(f"{server.url}/v1/completions", json=body).status_code == 200
    _wait_for(lambda: server.metric("tokenmill:request_finished_total", finished_reason="length") == finished + 1)
    assert server.metric("tokenmill:generation_tokens_total") == before + 5
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                      "time_per_output_token_seconds"):
        assert server.metric(f"tokenmill:{histogram}_count") >= 1
    assert server.metric("tokenmill:inter_token_latency_seconds_count") >= 4
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "num_preemptions_total"):
        assert server.metric(f"tokenmill:{gauge}") == 0  # idle again, and nothing preempted


def test_shared_prefix_shows_as_cached_tokens_and_cache_hits(server):
    prompt = "You are a helpful assistant. " * 20
    hits = server.metric("tokenmill:prefix_cache_hits_total")
    body = {"prompt": prompt, "max_tokens": 1}
    first = httpx.post(f"{server.url}/v1/completions", json=body).json()
    second = httpx.post(f"{server.url}/v1/completions", json=body).json()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= first["usage"]["prompt_tokens"] - 16
    _wait_for(lambda: server.metric("tokenmill:prefix_cache_hits_total") >= hits + cached)


def _assert_aborted_and_blocks_freed(server, aborted_before: float) -> None:
    _wait_for(lambda: server.metric("tokenmill:request_finished_total", finished_reason="abort") == aborted_before + 1)
    _wait_for(lambda: server.metric("tokenmill:num_requests_running") == 0)
    assert server.metric("tokenmill:kv_cache_usage_perc") == 0.0


def test_client_disconnecting_mid_stream_aborts_its_request(server):
    aborted = server.metric("tokenmill:request_finished_total", finished_reason="abort")
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**LONG, "stream": True}) as response:
        received = 0
        for line in response.iter_lines():
            if line.startswith("data:"):
                received += 1
                if received == 3:
                    # NOTE: asserted inside the loop: leaving it drops httpx's line iterator, which
                    # closes the connection at once, and a fast server may have aborted before we look.
                    assert server.metric("tokenmill:num_requests_running") == 1
                    break
    _assert_aborted_and_blocks_freed(server, aborted)


def test_client_disconnecting_while_waiting_for_a_whole_response_aborts_it(server):
    aborted = server.metric("tokenmill:request_finished_total", finished_reason="abort")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=LONG, timeout=1.5)
    _assert_aborted_and_blocks_freed(server, aborted)


def test_health_and_version(server):
    assert httpx.get(f"{server.url}/health").status_code == 200
    # Load balancers and `wget --spider` check health with HEAD: a 405 read as down.
    assert httpx.head(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/version").json()["version"]


@pytest.fixture(scope="module")
def guarded(start_server):
    """A server with an API key that runs one sequence at a time and lets only one request wait."""
    return start_server("--api-key", "s3cret", "--max-waiting", "1", "--max-num-seqs", "1")


def test_auth_rejects_missing_and_wrong_keys_and_admits_the_right_one(guarded):
    url = f"{guarded.url}/v1/models"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        response = httpx.get(url, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{guarded.url}/v1", api_key="wrong", max_retries=0).models.list()
    client = OpenAI(base_url=f"{guarded.url}/v1", api_key="s3cret", max_retries=0)
    assert client.models.list().data[0].id == "smollm2-135m"
    assert httpx.get(f"{guarded.url}/health").status_code == 200  # health stays open
    # The key first: a client without it learns nothing about its body.
    response = httpx.post(f"{guarded.url}/v1/completions", content=b"{bad", headers={"content-type": "application/json"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_overfilled_queue_gets_429_with_retry_after(guarded):
    headers = {"Authorization": "Bearer s3cret"}
    body = {**LONG, "max_tokens": 48}

    async def run():
        async with httpx.AsyncClient(base_url=guarded.url, headers=headers, timeout=120) as client:
            running = asyncio.ensure_future(client.post("/v1/completions", json=body))
            while guarded.metric("tokenmill:num_requests_running") < 1:  # the only running slot is taken
                await asyncio.sleep(0.05)
            more = await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(5)))
            return [await running, *more]

    responses = asyncio.run(run())
    # One runs, one may wait, every other one is turned away.
    assert sorted(r.status_code for r in responses) == [200, 200, 429, 429, 429, 429]
    rejected = next(r for r in responses if r.status_code == 429)
    assert rejected.headers["retry-after"] == "1"
    assert rejected.json()["error"]["code"] == "too_many_waiting_requests"
    for response in responses:
        if response.status_code == 200:
            assert response.json()["usage"]["completion_tokens"] == 48
    # A request of more prompts than may ever wait is refused outright: retrying it would not help.
    many = httpx.post(f"{guarded.url}/v1/completions", headers=headers, json={**body, "prompt": ["a", "b"]})
    assert many.status_code == 400 and many.json()["error"]["code"] == "too_many_prompts"


def test_sigterm_finishes_in_flight_requests_then_exits_zero(start_server):
    server = start_server("--shutdown-timeout", "60")
    body = {**LONG, "max_tokens": 40, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        server.process.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line.startswith("data:")]
    assert json.loads(first[5:])["choices"]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][5:])["choices"][0]["finish_reason"] == "length"
    assert server.process.wait(60) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health")


def test_sigterm_fails_requests_that_outlive_the_timeout_in_openai_shape_and_exits_zero(start_server):
    server = start_server("--shutdown-timeout", "1")
    whole = {}
    waiting = _post_soon(server.url, whole)  # a non-streamed request, decoding by now
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**LONG, "stream": True}, timeout=120) as response:
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data:"))
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line.startswith("data:")]
    waiting.join()
    # The stream ends with an error event and [DONE]; the whole response is a 503 in OpenAI's shape.
    assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][5:])["error"]["code"] == "server_shutting_down"
    assert whole["response"].status_code == 503
    assert whole["response"].json()["error"]["code"] == "server_shutting_down"
    assert server.process.wait(60) == 0
    assert time.monotonic() - started < 30
    assert "Traceback" not in server.log.read_text()


def test_a_second_ctrl_c_exits_at_once_and_cleanly(start_server):
    # uvicorn's force quit skips the app's shutdown: the engine thread must still be stopped before the process
    # exits, or the C++ runtime aborts it inside a step (SIGABRT, "terminate called without an active exception").
    server = start_server("--shutdown-timeout", "60")
    whole = {}
    waiting = _post_soon(server.url, whole)
    server.process.send_signal(signal.SIGINT)
    time.sleep(1)
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(30) == 0
    waiting.join()
    assert "terminate called" not in server.log.read_text()


def _post_soon(url: str, into: dict) -> threading.Thread:
    """A thread posting a long non-streamed completion (its response lands in into["response"]), once it decodes."""

    def post() -> None:
        try:
            into["response"] = httpx.post(f"{url}/v1/completions", json=LONG, timeout=120)
        except httpx.HTTPError as exc:
            into["response"] = exc

    thread = threading.Thread(target=post)
    thread.start()
    for _ in range(100):  # until it is running
        if any(line.startswith("tokenmill:num_requests_running") and not line.endswith(" 0.0")
               for line in httpx.get(f"{url}/metrics").text.splitlines()):
            break
        time.sleep(0.1)
    return thread
