"""What completions and chat share: admission with back-pressure, stream merging, disconnects, usage, SSE."""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from tokenmill.config import ServerConfig
from tokenmill.engine.async_engine import AsyncEngine, RequestStream
from tokenmill.engine.deadlines import DeadlineError
from tokenmill.loader.tokenizer import Tokenizer
from tokenmill.outputs import RequestMetrics, RequestOutput, accumulate
from tokenmill.router.policies import AUTO
from tokenmill.sampling import SamplingParams
from tokenmill.server.deadlines import deadline_refused, dropped_error
from tokenmill.server.errors import APIError, from_exception
from tokenmill.server.metrics import Metrics
from tokenmill.server.response_items import ResponseItems

T = TypeVar("T")


@dataclass
class ServedModel:
    """One model behind the server: the name requests use, its engine front, tokenizer and context length."""

    name: str
    engine: AsyncEngine
    tokenizer: Tokenizer
    max_model_len: int
    # The model's recommended sampling settings, for the ones a request leaves unset (ModelSource.sampling_defaults).
    sampling_defaults: dict[str, float] = field(default_factory=dict)
    # Prompt tokens of requests on their way into the engine, not yet in its waiting count (--max-waiting-tokens).
    pending_tokens: int = 0


@dataclass
class ServerState:
    """What every route needs: the served models, the settings and the metrics."""

    models: dict[str, ServedModel]  # in --model order; the first answers requests that name no model
    config: ServerConfig
    metrics: Metrics  # renders every model's series: they share its registry
    response_items: ResponseItems = field(default_factory=ResponseItems)  # for /v1/responses' item_reference

    def model(self, name: str | None) -> ServedModel:
        """The model a request names, or the first when it names none; 404 for a name not served."""
        if name is None:
            return next(iter(self.models.values()))
        if name not in self.models:
            served = ", ".join(repr(n) for n in self.models) or "no generative model"
            raise APIError(404, f"the model {name!r} does not exist; this server serves {served}",
                           param="model", code="model_not_found")
        return self.models[name]

    def sampling_defaults(self, name: str | None) -> dict[str, float]:
        """The sampling settings a request to this model name gets where it leaves them unset: for `auto`, only those
        every model shares, so that whichever model answers samples as it recommends or as plain defaults do."""
        if name is None or name in self.models:
            return self.model(name).sampling_defaults
        if name != AUTO or not self.models:
            return {}  # a name not served: routing answers 404
        shared = [set(model.sampling_defaults.items()) for model in self.models.values()]
        return dict(set.intersection(*shared))


def state_of(request: Request) -> ServerState:
    """The ServerState the app was built with."""
    return request.app.state.tokenmill


def new_id(prefix: str) -> str:
    """An OpenAI-style response id."""
    return f"{prefix}-{uuid.uuid4().hex}"


def vllm_prompt_logprobs(output: RequestOutput, tokenizer: Tokenizer) -> list[dict | None]:
    """vLLM's prompt_logprobs: for each prompt token (None for the first, which nothing predicts), its id and its
    top alternatives' each mapped to the logprob, rank and text."""
    assert output.prompt_logprobs is not None
    return [None if position is None else {
        str(token_id): {"logprob": json_logprob(lp.logprob), "rank": lp.rank,
                        "decoded_token": tokenizer.decoded_token(token_id)} for token_id, lp in position.items()}
            for position in output.prompt_logprobs]


def json_logprob(value: float) -> float | None:
    """A logprob as JSON can carry it: NaN (a model whose hidden states went NaN) as null, -inf as -9999 (vLLM's
    floor); the JSON encoder refused them, a 500 for a whole response and a bare NaN in a stream."""
    if value != value:
        return None
    return max(value, -9999.0)


def refuse_past_waiting(name: str, waiting: int, adds: int, limit: int) -> None:
    """429 if `adds` more requests would leave more than `limit` waiting for model `name` (--max-waiting)."""
    if waiting + adds > limit:
        raise APIError(429, f"{waiting} requests are already waiting for {name!r} and this one adds {adds} (limit "
                       f"{limit}); retry shortly", type="rate_limit_error", code="too_many_waiting_requests",
                       headers={"Retry-After": "1"})


def refuse_past_waiting_tokens(name: str, queued: int, tokens: int, limit: int | None) -> None:
    """429 if `tokens` more would leave more than `limit` tokens waiting for model `name` (--max-waiting-tokens)."""
    # A queue that is empty takes any request: one longer than the bound would otherwise never be served.
    if limit is not None and queued and queued + tokens > limit:
        raise APIError(429, f"{queued} tokens are already waiting for {name!r} and this request adds {tokens} "
                       f"(limit {limit}); retry shortly", type="rate_limit_error", code="too_many_waiting_tokens",
                       headers={"Retry-After": "1"})


async def submit(state: ServerState, model: ServedModel, prompts: list[list[int]], params: SamplingParams,
                 id_prefix: str, arrival: float | None = None) -> list[RequestStream]:
    """Queue one request per prompt on the model's engine, all or none; 429 when too many already wait for it.

    arrival: when the request came (perf_counter), for its deadlines and latencies; None: now.
    """
    engine = model.engine
    if not engine.is_running:
        raise APIError(503, f"the engine of {model.name!r} is not running; see the server log", type="server_error")
    if engine.stalled:
        raise APIError(503, f"the engine of {model.name!r} is stalled: {engine.stalled}; retry later",
                       type="server_error", code="engine_stalled")
    # Each model has its own queue, so the limit is per model: a busy one does not turn away the others' requests.
    # Each prompt is a request there, so a request's prompts count, and more than the queue holds is never served.
    max_waiting = state.config.max_waiting
    if len(prompts) > max_waiting:
        raise APIError(400, f"prompt has {len(prompts)} items; at most {max_waiting} can wait for {model.name!r} "
                       "(--max-waiting)", param="prompt", code="too_many_prompts")
    refuse_past_waiting(model.name, engine.num_waiting, len(prompts), max_waiting)
    tokens = sum(len(p) for p in prompts) * params.n
    limit = state.config.max_waiting_tokens
    queued = 0 if limit is None else engine.stats.num_waiting_tokens + model.pending_tokens
    refuse_past_waiting_tokens(model.name, queued, tokens, limit)
    # NOTE: counted until the engine thread has taken the adds, by when its waiting count includes them.
    model.pending_tokens += tokens
    try:
        requests = [(f"{id_prefix}-{i}", prompt) for i, prompt in enumerate(prompts)]
        return await engine.add_requests(requests, params, time.perf_counter() if arrival is None else arrival)
    except DeadlineError as exc:
        state.metrics.observe_deadline(model.name, "refused", len(prompts))  # per prompt, as met and missed are
        raise deadline_refused(str(exc)) from exc
    finally:
        model.pending_tokens -= tokens


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Output deltas of several streams as (stream index, delta), as they arrive; closing this aborts them all."""
    arrivals: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for output in stream:
                arrivals.put_nowait((i, output))
        except Exception as exc:
            arrivals.put_nowait((i, exc))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        unfinished = len(streams)
        while unfinished:
            i, item = await arrivals.get()
            if isinstance(item, Exception):
                raise item
            if (error := dropped_error(item)) is not None:  # its deadline became infeasible while it waited
                raise error
            unfinished -= item.finished
            yield i, item
    finally:
        # NOTE: no awaits here: under a cancelled (anyio) scope every await raises again at once.
        for stream in streams:
            stream.close()
        for task in tasks:
            task.cancel()


async def collect(request: Request, streams: list[RequestStream]) -> list[RequestOutput]:
    """Whole outputs in prompt order; if the client goes away first, abort everything and raise."""

    async def consume() -> list[RequestOutput]:
        whole: dict[int, RequestOutput] = {}
        async with aclosing(merged(streams)) as outputs:
            async for i, output in outputs:
                whole[i] = accumulate(whole.get(i), output)
        return [whole[i] for i in range(len(streams))]

    def abort() -> None:
        for stream in streams:
            stream.close()  # aborts the requests, even if `consume` never got to run

    return await unless_disconnected(request, consume(), abort)


async def unless_disconnected(request: Request, work: Awaitable[T],
                              abandon: Callable[[], None] = lambda: None) -> T:
    """work's result; if the client goes away first (or this is cancelled), cancel work, call abandon and raise 499."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        abandoned = not task.done()
        if abandoned:
            task.cancel()
            abandon()
    if abandoned:
        raise APIError(499, "client closed the request", code="client_closed_request")
    return task.result()


async def _disconnected(request: Request) -> None:
    # The body is already read, so the next ASGI message can only be the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


# Non-streamed responses carry their cost in this header too, for proxies that read no bodies.
COST_HEADER = "x-tokenmill-cost-usd"


class Usage:
    """OpenAI's usage block, counted output by output: prompt tokens served from the prefix cache, and the cost."""

    def __init__(self) -> None:
        self.prompt_tokens: dict[int, int] = {}
        self.cached_tokens: dict[int, int] = {}
        self.completion_tokens = 0
        self.metrics: dict[int, RequestMetrics] = {}

    def add(self, i: int, output: RequestOutput) -> None:
        """Count an output (a delta, or a whole output once) of the request in stream i."""
        self.prompt_tokens[i] = len(output.prompt_token_ids)
        self.cached_tokens[i] = output.num_cached_tokens
        self.completion_tokens += sum(len(c.token_ids) for c in output.outputs)
        self.metrics[i] = output.metrics  # the request's running totals: the last output's are the whole

    def block(self) -> dict:
        """The `usage` object of a response; its cost sums every engine request (prompts, n samples) behind it."""
        prompt = sum(self.prompt_tokens.values())
        requests = list(self.metrics.values())
        return {
            "prompt_tokens": prompt,
            "completion_tokens": self.completion_tokens,
            "total_tokens": prompt + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": sum(self.cached_tokens.values())},
            "completion_tokens_details": {
                "accepted_prediction_tokens": sum(m.accepted_prediction_tokens for m in requests),
                "rejected_prediction_tokens": sum(m.rejected_prediction_tokens for m in requests),
            },
            "cost": sum(m.cost_usd for m in requests),
            "cost_details": {
                "compute_seconds": sum(m.compute_seconds for m in requests),
                "price_per_hour": requests[0].price_per_hour if requests else 0.0,
            },
            "latency": _latency(requests),
        }


def _latency(requests: list[RequestMetrics]) -> dict | None:
    """What the client waited, from its request's arrival: for the first token (of any of the engine requests behind
    the response), and for the whole (once all are done); None before any token."""
    firsts = [m.first_token_time for m in requests if m.first_token_time is not None]
    if not firsts:
        return None
    arrival = min(m.arrival_time for m in requests)
    ends = [m.finished_time for m in requests]
    return {"time_to_first_token_seconds": min(firsts) - arrival,
            "end_to_end_seconds": max(ends) - arrival if None not in ends else None}


def usage(outputs: list[RequestOutput]) -> dict:
    """The usage block of whole outputs."""
    counted = Usage()
    for i, output in enumerate(outputs):
        counted.add(i, output)
    return counted.block()


@dataclass
class ChunkStream:
    """A streamed answer before it is sent: its chunks, the engine streams behind them, the headers to send."""

    chunks: AsyncIterator[dict]
    streams: list[RequestStream]
    headers: dict[str, str]


class EventStream(StreamingResponse):
    """Server-sent events of a request's chunks (or Ollama's NDJSON lines); its streams are closed however the
    response ends."""

    def __init__(self, chunks: AsyncIterator[dict], streams: list[RequestStream], headers: dict[str, str],
                 encode: Callable[[AsyncIterator[dict]], AsyncIterator[str]] | None = None,
                 media_type: str = "text/event-stream") -> None:
        super().__init__((encode or sse)(chunks), media_type=media_type, headers=headers)
        self.streams = streams

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # NOTE: a client gone before the first chunk has the body cancelled unstarted (Starlette's disconnect
            # listener), so the chunks' own cleanup (merged's finally) never runs: without this the request would
            # run to max_tokens for nobody.
            for stream in self.streams:
                stream.close()


async def named_sse(events: AsyncIterator[dict], error: Callable[[APIError], dict],
                    numbered: bool = False) -> AsyncIterator[str]:
    """Server-sent events named by their type (the Responses and Messages APIs'), numbered in order where asked
    (OpenAI's sequence_number); a failure ends them with error's event for it."""
    sequence = 0
    try:
        async with aclosing(events):
            async for event in events:
                numbering = {"sequence_number": sequence} if numbered else {}
                yield f"event: {event['type']}\ndata: {json.dumps({**event, **numbering})}\n\n"
                sequence += 1
    except Exception as exc:
        event = {**error(from_exception(exc)), **({"sequence_number": sequence} if numbered else {})}
        yield f"event: error\ndata: {json.dumps(event)}\n\n"


async def sse(chunks: AsyncIterator[dict], done: bool = True) -> AsyncIterator[str]:
    """Server-sent events: one `data:` line per chunk, an error event if the engine fails, then (OpenAI's, not
    llama.cpp's native API's) [DONE]."""
    try:
        async with aclosing(chunks):
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
    except Exception as exc:
        yield f"data: {json.dumps(from_exception(exc).body)}\n\n"
    if done:
        yield "data: [DONE]\n\n"
