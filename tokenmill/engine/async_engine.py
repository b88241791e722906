"""AsyncEngine: the asyncio front; one background thread owns the LLMEngine, requests talk to it through queues."""

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.errors import InvalidRequestError, TokenmillError
from tokenmill.outputs import EngineStats, RequestOutput
from tokenmill.sampling import SamplingParams

logger = logging.getLogger(__name__)

# Steps failed in a row after which /health reports the engine (a load balancer should route elsewhere): one may be
# a request's own bad luck, an error every step is the device's or the engine's.
_FAILING_STEPS = 3


class EngineStepError(TokenmillError):
    """The engine failed while running a request, or is not running; the request was aborted."""


class EngineStalledError(EngineStepError):
    """The engine's current step has run past the watchdog limit; its requests were failed rather than left waiting."""


class ShuttingDownError(EngineStepError):
    """The server is stopping and the request outlived its grace period (--shutdown-timeout)."""


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    accepted: asyncio.Future
    outputs: asyncio.Queue


@dataclass
class _Abort:
    request_id: str


class _Stop:
    pass


class AsyncEngine:
    """Runs LLMEngine.step in a loop on its own thread; every call here is safe from the event loop.

    A watchdog on the event loop fails every live request once a step runs longer than watchdog_timeout seconds,
    and `stalled` says so until that step returns (then the engine serves again).
    """

    def __init__(
        self,
        engine: LLMEngine,
        on_stats: Callable[[EngineStats], None] | None = None,
        on_finished: Callable[[RequestOutput], None] | None = None,
        watchdog_timeout: float | None = 60.0,
    ) -> None:
        self.engine = engine
        self.on_stats = on_stats
        self.on_finished = on_finished
        self.watchdog_timeout = watchdog_timeout
        self.stats = engine.stats()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._queues: dict[str, asyncio.Queue] = {}  # touched only by the engine thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pending_lock = threading.Lock()
        self._pending = 0  # adds sent but not yet taken by the engine thread
        self._dead = False  # set, under _pending_lock, once the engine thread can take no more commands
        # Requests a caller still waits on, by id: what the watchdog fails. Touched only on the event loop.
        self._live: dict[str, _Add] = {}
        self._watchdog: asyncio.Task | None = None
        # The watchdog's view of the engine thread, under _watch_lock: when its current step began (monotonic
        # seconds; None between steps), how many steps it has run, and why it is stalled (None while it is not).
        self._watch_lock = threading.Lock()
        self._step_started: float | None = None
        self._num_steps = 0
        self._failed_steps = 0  # in a row; written by the engine thread only
        self._stalled: str | None = None

    @property
    def num_waiting(self) -> int:
        """Requests not yet running: queued in the engine or on their way to it."""
        return self.stats.num_waiting + self._pending

    @property
    def is_running(self) -> bool:
        """True while the engine thread is alive (a stalled one too: see `stalled`)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def stalled(self) -> str | None:
        """Why the engine is stalled (its current step has run past the watchdog limit), or None."""
        return self._stalled

    @property
    def failing(self) -> str | None:
        """Why the engine looks broken (its last steps all failed: a device error repeats), or None."""
        failed = self._failed_steps
        return f"its last {failed} steps failed" if failed >= _FAILING_STEPS else None

    def start(self) -> None:
        """Start the engine thread and its watchdog; call from the event loop that will consume outputs."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="tokenmill-engine", daemon=True)
        self._thread.start()
        if self.watchdog_timeout:
            self._watchdog = self._loop.create_task(self._watch(self.watchdog_timeout))

    async def stop(self) -> None:
        """Abort whatever is still in flight and wait for the engine thread to exit."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        await asyncio.to_thread(self.join)

    def join(self, timeout: float | None = None) -> None:
        """Ask the engine thread to abort what is in flight and exit; wait for it, at most timeout seconds.

        Also from outside any event loop: a process must not exit while the thread is inside a step (Python then
        unwinds it through C++ frames, and the C++ runtime aborts the process)."""
        if self._thread is None or not self._thread.is_alive():
            return
        self._commands.put(_Stop())
        if self._stalled is not None:
            # NOTE: a stuck step may never return; the thread is a daemon, so the process can exit without it.
            logger.error("not waiting for the engine thread: %s", self._stalled)
            return
        self._thread.join(timeout)

    async def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float,
    ) -> "RequestStream":
        """Queue a request; its validation error is raised here, before any output is streamed."""
        return (await self.add_requests([(request_id, prompt_token_ids)], params, arrival_time))[0]

    async def add_requests(
        self, requests: list[tuple[str, list[int]]], params: SamplingParams, arrival_time: float
    ) -> list["RequestStream"]:
        """Queue (request id, prompt) pairs that stand or fall together, as the prompts of one API request: a
        stream each, or the first validation error raised here and the others aborted."""
        loop = asyncio.get_running_loop()
        adds = [_Add(request_id, prompt, params, arrival_time, loop.create_future(), asyncio.Queue())
                for request_id, prompt in requests]
        if self._stalled is not None:
            raise EngineStalledError(f"the engine is stalled: {self._stalled}; see the server log")
        # NOTE: all queued before the first await: the engine thread takes them between two steps (one at a time,
        # 1,000 prompts took 1,000 steps), and a caller's next look at num_waiting already counts them.
        with self._pending_lock:
            if self._dead or self._thread is None:
                raise EngineStepError("the engine is not running; see the server log")
            self._pending += len(adds)
            for add in adds:
                self._commands.put(add)
        for add in adds:
            self._live[add.request_id] = add
        try:
            if adds:
                await asyncio.wait([add.accepted for add in adds])
        except asyncio.CancelledError:
            for add in adds:
                self._forget(add.request_id)
                self.abort(add.request_id)
            raise
        streams = [RequestStream(self, add.request_id, add.outputs) for add in adds]
        # Every one read, so asyncio logs none as "never retrieved"; the first is the caller's.
        errors = [add.accepted.exception() for add in adds]
        error = next((e for e in errors if e is not None), None)
        if error is not None:
            for stream in streams:
                stream.close()  # NOTE: aborts those the engine took; the others are unknown to it, a no-op
            raise error
        return streams

    def abort(self, request_id: str) -> None:
        """Ask the engine thread to abort a request; it happens before the next step."""
        self._commands.put(_Abort(request_id))

    def _forget(self, request_id: str) -> None:
        """The caller no longer waits on this request: the watchdog need not fail it."""
        self._live.pop(request_id, None)

    async def _watch(self, timeout: float) -> None:
        """Every so often, fail the live requests if the engine's current step has run past timeout seconds."""
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            with self._watch_lock:
                if self._step_started is None or self._stalled is not None:
                    continue
                took = time.monotonic() - self._step_started
                if took <= timeout:
                    continue
                self._stalled = (f"engine step {self._num_steps} has run for {took:.0f} s, past the watchdog limit "
                                 f"of {timeout:g} s (--watchdog-timeout)")
            logger.error("%s; failing its %d live requests; /health answers 503 until the step returns",
                         self._stalled, len(self._live))
            self.fail_live(EngineStalledError(f"the engine stalled while serving this request: {self._stalled}; "
                                               "see the server log"))

    def fail_live(self, error: Exception) -> None:
        """Answer every live request with error now; the engine thread aborts them once it can."""
        for request_id, add in self._live.items():
            if not add.accepted.done():
                add.accepted.set_exception(error)
            else:
                add.outputs.put_nowait(error)
            self.abort(request_id)  # NOTE: queued after the request's own add, so it finds it
        self._live.clear()

    # --- everything below runs on the engine thread ---

    def _run(self) -> None:
        try:
            while True:
                idle = not self.engine.has_unfinished()
                if not self._apply_commands(block=idle):
                    break
                if self.engine.has_unfinished():
                    self._step()
                else:
                    self._publish_stats()
            for request_id in list(self._queues):
                self._abort(request_id)
            self._publish_stats()
        except Exception:
            logger.exception("the engine loop died; /health now answers 503")
        finally:
            self._fail_everything()

    def _fail_everything(self) -> None:
        """Leave no caller waiting once this thread ends: fail live streams and adds not yet taken."""
        with self._pending_lock:
            self._dead = True
        error = EngineStepError("the engine stopped while serving this request; see the server log")
        for outputs_queue in self._queues.values():
            self._call(outputs_queue.put_nowait, error)
        self._queues.clear()
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Add):
                self._call(_resolve, command.accepted, error)

    def _apply_commands(self, block: bool) -> bool:
        """Apply every queued command (waiting for one when idle); False once asked to stop."""
        try:
            command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return True
        added: list[tuple[_Add, Exception | None]] = []
        try:
            while True:
                if isinstance(command, _Stop):
                    return False
                if isinstance(command, _Add):
                    added.append((command, self._add(command)))
                else:
                    self._abort(command.request_id)
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    return True
        finally:
            self._settle(added)

    def _add(self, add: _Add) -> Exception | None:
        """Hand one prompt to the engine; the validation error it raised, if any."""
        try:
            self.engine.add_request(add.request_id, add.prompt_token_ids, add.params, add.arrival_time)
        except Exception as exc:  # validation errors go back to the caller, never up this thread
            return exc
        self._queues[add.request_id] = add.outputs
        return None

    def _settle(self, added: list[tuple[_Add, Exception | None]]) -> None:
        """Answer the callers of the adds just applied, their load counted once for all of them."""
        if not added:
            return
        # NOTE: count them as waiting in the engine before they stop counting as pending, so num_waiting never dips;
        # and both before the callers hear back, so what they read next already counts them (or not). Once per batch:
        # stats() reads the whole waiting queue, so once per add made a request of N prompts cost N^2.
        self.stats = self.engine.stats()
        with self._pending_lock:
            self._pending -= len(added)
        for add, error in added:
            self._call(_resolve, add.accepted, error)

    def _abort(self, request_id: str) -> None:
        try:
            output = self.engine.abort(request_id)
        except Exception:  # one request's failed abort fails it alone, as a failed step's does
            logger.exception("abort of %s failed", request_id)
            outputs_queue = self._queues.pop(request_id, None)
            if outputs_queue is not None:
                self._call(outputs_queue.put_nowait,
                           EngineStepError("the engine failed while aborting this request; see the server log"))
            return
        if output is not None:
            self._deliver(output)

    def _step(self) -> None:
        with self._watch_lock:
            self._step_started = time.monotonic()
            self._num_steps += 1
        try:
            outputs = self.engine.step()
            failures = self.engine.take_failures()
        except Exception:
            # NOTE: a bug in one step must not kill the server; fail the requests it ran (all, if it failed before
            # choosing them) and those it ended before failing (dropped for a deadline: their output is lost), and
            # go on: those still waiting were not touched.
            self._failed_steps += 1
            ran, known = self.engine.stepping, self.engine.requests
            failed = [request_id for request_id in self._queues
                      if ran is None or request_id in ran or request_id not in known]
            logger.exception("engine step failed; aborting %d requests", len(failed))
            error = EngineStepError("the engine failed while running this request; see the server log")
            for request_id in failed:
                outputs_queue = self._queues.pop(request_id)
                try:
                    output = self.engine.abort(request_id)
                except Exception:
                    logger.exception("abort of %s failed too", request_id)
                else:
                    if output is not None:  # counted as aborted (the steps it ran in are billed) before it hears
                        _observe(self.on_finished, output)
                self._call(outputs_queue.put_nowait, error)
            self._publish_stats()
            return
        finally:
            self._step_done()
        self._failed_steps = 0
        # NOTE: before any caller hears its answer, so a /metrics read right after a response already counts it.
        self._publish_stats()
        for output in outputs:
            if output.request_id not in failures:
                self._deliver(output)
            elif output.finished:
                _observe(self.on_finished, output)
        for request_id, exc in failures.items():
            # It failed alone (a sampler or detokenizer error, logged where it was caught) and is aborted already.
            # A request's own mistake (a grammar the library gave up on) is the client's to read; the rest is ours.
            error = exc if isinstance(exc, InvalidRequestError) else EngineStepError(
                "the engine failed while running this request; see the server log")
            self._fail(request_id, error)

    def _step_done(self) -> None:
        """Tell the watchdog the step is over; if it had declared the engine stalled, the engine is healthy again."""
        with self._watch_lock:
            started, self._step_started = self._step_started, None
            stalled, self._stalled = self._stalled, None
        if stalled is not None and started is not None:
            logger.warning("engine step %d returned after %.1f s; the engine is serving again (the watchdog had "
                           "failed the requests it held)", self._num_steps, time.monotonic() - started)

    def _fail(self, request_id: str, error: Exception) -> None:
        """Send a request's caller an error in place of its last output."""
        outputs_queue = self._queues.pop(request_id, None)
        if outputs_queue is not None:
            self._call(outputs_queue.put_nowait, error)

    def _deliver(self, output: RequestOutput) -> None:
        if output.finished:
            _observe(self.on_finished, output)  # first, for the same reason as the stats before it
        outputs_queue = self._queues.get(output.request_id)
        if outputs_queue is not None:
            self._call(outputs_queue.put_nowait, output)
        if output.finished:
            self._queues.pop(output.request_id, None)

    def _publish_stats(self) -> None:
        self.stats = self.engine.stats()
        _observe(self.on_stats, self.stats)

    def _call(self, fn: Callable, *args: object) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: nobody is left to read this
            pass


class RequestStream:
    """One request's output deltas as they arrive; closing it before the last one aborts the request."""

    def __init__(self, engine: AsyncEngine, request_id: str, outputs: asyncio.Queue) -> None:
        self.request_id = request_id
        self._engine = engine
        self._outputs = outputs
        self._done = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        item = await self._outputs.get()
        if isinstance(item, Exception):
            self._done = True
            self._engine._forget(self.request_id)
            raise item
        if item.finished:
            self._done = True
            self._engine._forget(self.request_id)
        return item

    def close(self) -> None:
        """Abort the request unless it already finished; safe to call more than once, and never blocks."""
        if not self._done:
            self._done = True
            self._engine._forget(self.request_id)
            self._engine.abort(self.request_id)


def _observe(callback: Callable | None, value: object) -> None:
    """Run a metrics callback; a failing one is logged, never allowed to stop the engine."""
    if callback is None:
        return
    try:
        callback(value)
    except Exception:
        logger.exception("metrics callback failed")


def _resolve(future: asyncio.Future, exc: Exception | None) -> None:
    if future.done():  # cancelled, or failed already by the watchdog
        return
    if exc is None:
        future.set_result(None)
    else:
        future.set_exception(exc)
