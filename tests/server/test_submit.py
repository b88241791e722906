"""Admission of a many-prompt request: every prompt enters the engine between the same two steps, or none does."""

import asyncio
import gc
import threading
from types import SimpleNamespace

import pytest

from tokenmill.config import ServerConfig
from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.engine.deadlines import DeadlineError
from tokenmill.errors import InvalidRequestError
from tokenmill.outputs import CompletionOutput, EngineStats, RequestMetrics, RequestOutput
from tokenmill.sampling import SamplingParams
from tokenmill.server.errors import APIError
from tokenmill.server.metrics import Metrics
from tokenmill.server.serving import EventStream, ServedModel, ServerState, submit


class CountingEngine:
    """Records the step count each request arrived at; a request runs until aborted; prompt [0] is invalid."""

    def __init__(self) -> None:
        self.steps = 0
        self.arrived_at: dict[str, int] = {}
        self.running: set[str] = set()
        self.aborted: list[str] = []
        self.lock = threading.Lock()
        self.waiting = 0  # what stats() reports as waiting
        self.adds_since_stats = 0
        self.adds_between_stats: list[int] = []

    def add_request(self, request_id, prompt, params, arrival_time) -> None:
        if prompt == [0]:
            raise InvalidRequestError("token 0 is not allowed", param="prompt")
        self.arrived_at[request_id] = self.steps
        self.running.add(request_id)
        self.adds_since_stats += 1

    def has_unfinished(self) -> bool:
        return bool(self.running)

    def step(self) -> list[RequestOutput]:
        self.steps += 1
        return []

    def take_failures(self) -> dict:
        return {}

    def abort(self, request_id: str) -> RequestOutput | None:
        if request_id not in self.running:
            return None
        self.running.discard(request_id)
        self.aborted.append(request_id)
        sample = CompletionOutput(0, "", [], "abort")
        return RequestOutput(request_id, None, [1], [sample], True, 0, RequestMetrics(0.0))

    def stats(self) -> EngineStats:
        self.adds_between_stats.append(self.adds_since_stats)
        self.adds_since_stats = 0
        return EngineStats(len(self.running), self.waiting, 10, 10, 0, 0, 0)


def _submit(stub: CountingEngine, prompts: list[list[int]], config: ServerConfig | None = None):
    async def main():
        front = AsyncEngine(stub)
        front.start()
        model = ServedModel("m", front, SimpleNamespace(), 2048)
        state = ServerState({"m": model}, config or ServerConfig(), Metrics("m"))
        try:
            # One request already decoding keeps the engine stepping while the next is admitted.
            busy = await submit(state, model, [[1]], SamplingParams(max_tokens=10**9), "busy")
            streams = await submit(state, model, prompts, SamplingParams(max_tokens=10**9), "many")
            for stream in [*busy, *streams]:
                stream.close()
            return streams, model.pending_tokens
        finally:
            await front.stop()

    return asyncio.run(main())


def test_all_prompts_of_a_request_enter_between_the_same_two_steps():
    stub = CountingEngine()
    streams, pending = _submit(stub, [[i + 1] for i in range(200)])
    assert len(streams) == 200 and pending == 0
    steps = {stub.arrived_at[f"many-{i}"] for i in range(200)}
    assert len(steps) == 1  # one by one, they took 200 steps
    # The load is read once for them all: stats() reads the whole queue, so once per prompt cost N^2.
    assert max(stub.adds_between_stats) == 200


def test_a_requests_prompts_count_against_the_waiting_limit():
    with pytest.raises(APIError) as refused:
        _submit(CountingEngine(), [[1]] * 5, ServerConfig(max_waiting=4))
    assert refused.value.status == 400 and refused.value.body["error"]["code"] == "too_many_prompts"
    stub = CountingEngine()
    stub.waiting = 3
    with pytest.raises(APIError) as busy:  # with 3 waiting, the busy request's one prompt fits; these 2 do not
        _submit(stub, [[1], [2]], ServerConfig(max_waiting=4))
    assert busy.value.status == 429 and busy.value.body["error"]["code"] == "too_many_waiting_requests"
    assert not any(r.startswith("many") for r in stub.arrived_at)


def test_an_invalid_prompt_admits_none_and_aborts_the_rest():
    stub = CountingEngine()
    with pytest.raises(InvalidRequestError):
        _submit(stub, [[1], [2], [0], [3]])
    arrived = {r for r in stub.arrived_at if r.startswith("many")}
    assert {"many-0", "many-1"} <= arrived and "many-2" not in arrived
    assert {r for r in stub.aborted if r.startswith("many")} == arrived
    assert not any(r.startswith("many") for r in stub.running)


def test_a_stream_whose_client_left_before_the_first_chunk_is_still_aborted():
    closed, started = [], []

    async def chunks():
        started.append(True)  # merged's cleanup lives in here, and never runs if this never starts
        yield {"id": "x"}

    class Stream:
        def close(self) -> None:
            closed.append(True)

    async def gone() -> dict:
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await asyncio.sleep(0)  # a write yields to the loop, where the disconnect's cancellation lands

    response = EventStream(chunks(), [Stream(), Stream()], {})
    # As uvicorn serves it (ASGI spec 2.3): Starlette listens for the disconnect and cancels the body unstarted.
    asyncio.run(response({"type": "http", "asgi": {"spec_version": "2.3"}}, gone, send))
    assert not started and closed == [True, True]


def test_a_refused_deadline_counts_each_prompt_as_met_and_missed_do():
    class Refusing:
        is_running, stalled, num_waiting = True, None, 0
        stats = SimpleNamespace(num_waiting_tokens=0)

        async def add_requests(self, requests, params, arrival_time):
            raise DeadlineError("cannot finish in 1 ms", 250.0)

    metrics = Metrics("m")
    state = ServerState({"m": ServedModel("m", Refusing(), None, 2048)}, ServerConfig(), metrics)
    with pytest.raises(APIError):
        asyncio.run(submit(state, state.models["m"], [[1], [2], [3]], SamplingParams(deadline_ms=1), "r"))
    assert metrics.registry.get_sample_value("tokenmill:deadline_requests_total",
                                             {"model_name": "m", "outcome": "refused"}) == 3


def test_every_refused_prompts_error_is_read_so_asyncio_logs_none(caplog):
    with pytest.raises(InvalidRequestError):
        _submit(CountingEngine(), [[1], [0], [0], [0]])
    gc.collect()  # asyncio logs an unread future exception when the future is collected
    assert "never retrieved" not in caplog.text
