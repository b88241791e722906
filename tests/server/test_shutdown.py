"""The server's stop: what outlives --shutdown-timeout is failed with our own error, whenever it reaches an engine."""

import asyncio

import uvicorn

from tokenmill.engine.async_engine import ShuttingDownError
from tokenmill.server.app import _Server


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
