"""The watchdog and per-request faults over HTTP: the app under real uvicorn on loopback, its engine in this process."""

import asyncio
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from tokenmill.config import ServerConfig
from tokenmill.engine.sampler import Sampler
from tokenmill.server.app import build_app

MODEL = "smollm2-135m"
BODY = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def engine(make_engine):
    return make_engine(max_num_batched_tokens=64)


@pytest.fixture
def url(engine):
    """A loopback server over engine, with a 2-second watchdog; stopped after the test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = build_app({MODEL: engine}, ServerConfig(port=port, watchdog_timeout=2.0))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.05)
    yield base
    server.should_exit = True
    thread.join(60)
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks, "a KV block leaked"


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_a_stuck_step_turns_health_503_and_fails_requests_until_it_returns(engine, url, monkeypatch):
    release, armed = threading.Event(), threading.Event()
    step = engine.step

    def blocking_step():
        if armed.is_set():
            release.wait(60)
        return step()

    monkeypatch.setattr(engine, "step", blocking_step)
    assert httpx.post(f"{url}/v1/completions", json=BODY, timeout=60).status_code == 200
    armed.set()
    started = time.monotonic()
    stuck = httpx.post(f"{url}/v1/completions", json=BODY, timeout=60)
    assert time.monotonic() - started < 30  # answered by the watchdog, not left hanging
    assert "stalled" in _error(stuck, 500)["message"]
    health = _error(httpx.get(f"{url}/health"), 503)
    assert f"'{MODEL}' is stalled" in health["message"] and "watchdog limit" in health["message"]
    assert _error(httpx.post(f"{url}/v1/completions", json=BODY), 503)["code"] == "engine_stalled"

    armed.clear()
    release.set()  # the step returns: the engine serves again
    deadline = time.monotonic() + 30
    while httpx.get(f"{url}/health").status_code != 200:
        assert time.monotonic() < deadline, "health never recovered"
        time.sleep(0.05)
    again = httpx.post(f"{url}/v1/completions", json=BODY, timeout=60)
    assert again.status_code == 200 and again.json()["choices"][0]["text"]


def test_a_sampler_error_in_one_request_is_a_500_for_it_alone(engine, url, monkeypatch):
    bad_prompt = engine.tokenizer.encode("Once upon a time")
    original = Sampler._mask_early_stops

    def broken(self, logits, seqs, offsets):
        if any(seq.token_ids[: seq.num_prompt_tokens] == bad_prompt for seq in seqs):
            raise RuntimeError("injected sampler fault")
        return original(self, logits, seqs, offsets)

    alone = httpx.post(f"{url}/v1/completions", json=BODY, timeout=60).json()["choices"][0]["text"]
    monkeypatch.setattr(Sampler, "_mask_early_stops", broken)

    async def both():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(client.post("/v1/completions", json=BODY),
                                        client.post("/v1/completions", json={**BODY, "prompt": bad_prompt}))

    good, bad = asyncio.run(both())
    assert good.status_code == 200 and good.json()["choices"][0]["text"] == alone
    assert _error(bad, 500)["type"] == "server_error"
    assert httpx.get(f"{url}/health").status_code == 200
