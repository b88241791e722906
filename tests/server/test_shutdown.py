"""The server's stop: what outlives --shutdown-timeout is failed with our own error, whenever it reaches an engine."""

import asyncio
import socket
import threading
import time
from unittest.mock import MagicMock

import httpx
import uvicorn

from tokenmill.engine.async_engine import ShuttingDownError
from tokenmill.config import ServerConfig
from tokenmill.server.app import _Server, build_app
from tokenmill.structured.params import StructuredOutput


class _Engine:
    """Records what fail_live was given."""

    def __init__(self) -> None:
        self.failed: list[Exception] = []

    def fail_live(self, error: Exception) -> None:
        self.failed.append(error)


def test_requests_reaching_an_engine_after_the_grace_period_are_failed_too():
    # Failed once at the timeout, a request still tokenizing then (or a cascade's escalation) ran until uvicorn
    # cancelled it: a bare 500.
    engine = _Engine()
    server = _Server(uvicorn.Config(app=None), [engine], grace=0.05)

    async def stop_late() -> None:
        late = asyncio.create_task(server._fail_late())
        await asyncio.sleep(0.7)
        late.cancel()

    asyncio.run(stop_late())
    assert len(engine.failed) >= 2 and all(isinstance(e, ShuttingDownError) for e in engine.failed)


def test_a_request_still_compiling_when_uvicorn_cancels_it_gets_our_503(monkeypatch):
    # It reached no engine for the grace's end to fail, so uvicorn's cancel answered a bare text 500 and logged a
    # traceback (a second Ctrl-C did that to every request in flight).
    monkeypatch.setattr(StructuredOutput, "_compile", lambda self: time.sleep(2) or "")
    engine = MagicMock(max_model_len=64, **{"source.sampling_defaults": {}})
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = _Server(uvicorn.Config(build_app({"m": engine}, ServerConfig()), port=port, lifespan="off",
                                    log_level="critical", timeout_graceful_shutdown=0.3), [], grace=0.1)
    serving = threading.Thread(target=server.run)
    serving.start()
    while not server.started:
        time.sleep(0.05)
    answer = {}
    body = {"model": "m", "prompt": "hi", "response_format": {"type": "json_object"}}
    client = threading.Thread(target=lambda: answer.update(
        response=httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=10)))
    client.start()
    time.sleep(0.3)
    server.should_exit = True  # as SIGTERM does
    client.join()
    serving.join()
    assert answer["response"].status_code == 503
    assert answer["response"].json()["error"]["code"] == "server_shutting_down"
