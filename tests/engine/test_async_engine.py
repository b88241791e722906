"""AsyncEngine: validation errors before streaming, aborts on close, and no caller left hanging by a failure."""

import asyncio
import threading
import time

import pytest

from tokenmill.engine.async_engine import AsyncEngine, EngineStalledError, EngineStepError
from tokenmill.outputs import CompletionOutput, EngineStats, RequestMetrics, RequestOutput
from tokenmill.errors import InvalidRequestError
from tokenmill.sampling import SamplingParams


class StubEngine:
    """Emits token 7 once per step per request until max_tokens; can be told to fail."""

    def __init__(self) -> None:
        self.requests: dict[str, tuple[list[int], int]] = {}
        self.aborted: list[str] = []
        self.fail_step = False
        self.fail_loop = False
        self.failures: dict[str, Exception] = {}
        self.fail_request: str | None = None  # fails alone in the next step, as a sampler error would
        self.stepping: set[str] | None = None  # a failing step fails before choosing: every request with it
        self.drop_then_fail: str | None = None

    def add_request(self, request_id, prompt, params, arrival_time) -> None:
        if not prompt:
            raise InvalidRequestError("prompt is empty", param="prompt")
        self.requests[request_id] = ([], params.max_tokens)

    def has_unfinished(self) -> bool:
        if self.fail_loop:
            raise RuntimeError("loop bug")
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        if self.fail_step:
            raise RuntimeError("step bug")
        if self.drop_then_fail is not None:  # ends one request (its output then lost), runs none, fails
            self.requests.pop(self.drop_then_fail)
            self.stepping = set()
            raise RuntimeError("step bug after a drop")
        outputs = []
        for request_id, (tokens, max_tokens) in list(self.requests.items()):
            if request_id == self.fail_request:
                self.failures[request_id] = RuntimeError("sampler bug")
                outputs.append(self.abort(request_id))
                continue
            tokens.append(7)
            done = len(tokens) == max_tokens
            if done:
                del self.requests[request_id]
            outputs.append(_output(request_id, tokens, "length" if done else None))
        return outputs

    def take_failures(self) -> dict[str, Exception]:
        failures, self.failures = self.failures, {}
        return failures

    def abort(self, request_id: str) -> RequestOutput | None:
        if request_id not in self.requests:
            return None
        tokens, _ = self.requests.pop(request_id)
        self.aborted.append(request_id)
        return _output(request_id, tokens, "abort")

    def stats(self) -> EngineStats:
        return EngineStats(len(self.requests), 0, 10, 10, 0, 0, 0)


def _output(request_id: str, tokens: list[int], reason: str | None) -> RequestOutput:
    sample = CompletionOutput(0, "x" * len(tokens), list(tokens), reason)
    return RequestOutput(request_id, None, [1], [sample], reason is not None, 0, RequestMetrics(0.0))


def _run(stub: StubEngine, scenario, watchdog_timeout: float | None = None) -> list[RequestOutput]:
    finished: list[RequestOutput] = []

    async def main():
        front = AsyncEngine(stub, on_finished=finished.append, watchdog_timeout=watchdog_timeout)
        front.start()
        try:
            return await scenario(front)
        finally:
            await front.stop()

    return asyncio.run(main()), finished


async def _started(front: AsyncEngine):
    """A request that has produced its first output and never ends by itself."""
    # A finite length could run out on the stub's fast steps before the test acts on a loaded machine.
    stream = await front.add_request("a", [1], SamplingParams(max_tokens=10**9), 0.0)
    await stream.__anext__()
    return stream


async def _drain_expecting_failure(stream) -> None:
    with pytest.raises(EngineStepError):
        async for _ in stream:
            pass


def test_outputs_stream_until_finished():
    async def scenario(front):
        stream = await front.add_request("a", [1, 2], SamplingParams(max_tokens=3), 0.0)
        return [o.outputs[0].token_ids async for o in stream]

    tokens, finished = _run(StubEngine(), scenario)
    assert tokens == [[7], [7, 7], [7, 7, 7]]
    assert [o.outputs[0].finish_reason for o in finished] == ["length"]


class SlowStatsEngine(StubEngine):
    """Takes its time to count: a caller served before the count would read stale metrics."""

    def stats(self) -> EngineStats:
        time.sleep(0.05)
        return super().stats()


def test_the_metrics_count_a_request_before_its_caller_hears_it_finished():
    seen: list[EngineStats] = []

    async def main():
        finished: list[RequestOutput] = []
        front = AsyncEngine(SlowStatsEngine(), on_stats=seen.append, on_finished=finished.append)
        front.start()
        try:
            stream = await front.add_request("a", [1], SamplingParams(max_tokens=2), 0.0)
            async for output in stream:
                pass
            # What /metrics would serve the moment the response is out.
            return output.finished, seen[-1].num_running, len(finished)
        finally:
            await front.stop()

    assert asyncio.run(main()) == (True, 0, 1)


def test_validation_error_is_raised_before_any_output():
    async def scenario(front):
        with pytest.raises(InvalidRequestError, match="prompt is empty"):
            await front.add_request("a", [], SamplingParams(), 0.0)
        return front.num_waiting

    assert _run(StubEngine(), scenario)[0] == 0


def test_closing_a_stream_early_aborts_its_request():
    stub = StubEngine()

    async def scenario(front):
        stream = await _started(front)
        stream.close()
        while not stub.aborted:
            await asyncio.sleep(0.01)

    _, finished = _run(stub, scenario)
    assert stub.aborted == ["a"] and not stub.requests
    assert [o.outputs[0].finish_reason for o in finished] == ["abort"]


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on():
    stub = StubEngine()

    async def scenario(front):
        stream = await _started(front)
        stub.fail_step = True
        await _drain_expecting_failure(stream)
        stub.fail_step = False
        again = await front.add_request("b", [1], SamplingParams(max_tokens=2), 0.0)
        return [o.finished async for o in again], front.is_running

    (finished_flags, running), finished = _run(stub, scenario)
    assert stub.aborted == ["a"]
    assert finished_flags == [False, True] and running
    # The failed request reaches the metrics too, as aborted.
    assert [(o.request_id, o.outputs[0].finish_reason) for o in finished] == [("a", "abort"), ("b", "length")]


def test_a_request_whose_abort_fails_fails_alone_and_the_engine_goes_on():
    stub = StubEngine()
    abort = stub.abort

    def failing_abort(request_id: str) -> RequestOutput | None:
        if request_id == "a":
            raise RuntimeError("abort bug")
        return abort(request_id)

    stub.abort = failing_abort

    async def scenario(front):
        stream = await _started(front)
        stream.close()  # the client went away, and its abort raises
        again = await front.add_request("b", [1], SamplingParams(max_tokens=2), 0.0)
        return [o.finished async for o in again], front.is_running

    (finished_flags, running), _ = _run(stub, scenario)
    assert finished_flags == [False, True] and running


def test_a_request_a_failed_step_ended_before_failing_is_not_left_waiting():
    stub = StubEngine()

    async def scenario(front):
        stream = await _started(front)
        stub.drop_then_fail = "a"  # as a deadline drop early in a step that then fails after scheduling none
        await asyncio.wait_for(_drain_expecting_failure(stream), 10)
        stub.drop_then_fail = None
        return front.is_running

    running, _ = _run(stub, scenario)
    assert running


def test_a_dead_engine_thread_leaves_no_caller_waiting():
    stub = StubEngine()

    async def scenario(front):
        stream = await _started(front)
        stub.fail_loop = True
        await _drain_expecting_failure(stream)
        while front.is_running:
            await asyncio.sleep(0.01)
        with pytest.raises(EngineStepError, match="not running"):
            await front.add_request("b", [1], SamplingParams(), 0.0)

    _run(stub, scenario)


def test_a_request_that_fails_alone_gets_an_error_and_its_neighbour_streams_on():
    stub = StubEngine()

    async def scenario(front):
        bad = await _started(front)
        good = await front.add_request("b", [1], SamplingParams(max_tokens=5), 0.0)
        stub.fail_request = "a"
        await _drain_expecting_failure(bad)
        return [o.finished async for o in good]

    finished_flags, _ = _run(stub, scenario)
    assert finished_flags[-1] and not stub.requests


def test_the_watchdog_fails_running_and_queued_requests_of_a_stuck_step_then_clears():
    stub, release, blocked = StubEngine(), threading.Event(), threading.Event()
    step = stub.step

    def stuck_step():
        if stub.requests["a"][0]:  # from the second step of "a" on
            blocked.set()
            release.wait(10)
        return step()

    stub.step = stuck_step

    async def scenario(front):
        running = await _started(front)
        await asyncio.to_thread(blocked.wait, 10)
        queued = asyncio.ensure_future(front.add_request("b", [1], SamplingParams(max_tokens=2), 0.0))
        with pytest.raises(EngineStalledError, match="watchdog limit"):
            await queued  # its add waits behind the stuck step: the watchdog answers it
        with pytest.raises(EngineStalledError):
            async for _ in running:
                pass
        with pytest.raises(EngineStalledError, match="stalled"):
            await front.add_request("c", [1], SamplingParams(max_tokens=2), 0.0)
        stalled = front.stalled
        release.set()
        while front.stalled is not None or stub.requests:
            await asyncio.sleep(0.01)
        return stalled

    stalled, _ = _run(stub, scenario, watchdog_timeout=0.5)
    assert "engine step" in stalled and sorted(stub.aborted) == ["a", "b"]
