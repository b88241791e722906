"""The FastAPI app: routes, auth, body limit and engine lifetime; `serve` runs it under uvicorn."""

import asyncio
import errno
import logging
import signal
import socket
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib.metadata import version

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenmill.config import EngineConfig, ServerConfig
from tokenmill.embeddings.batcher import BatchPolicy
from tokenmill.embeddings.engine import EmbeddingEngine
from tokenmill.embeddings.model import EmbeddingModel
from tokenmill.engine.async_engine import AsyncEngine, ShuttingDownError
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.errors import TokenmillError
from tokenmill.loader.source import check_named
from tokenmill.router import AUTO
from tokenmill.server.auth import KEYED_PREFIXES, RequireAPIKey
from tokenmill.server.chat import create_chat_completion
from tokenmill.server.completions import create_completion
from tokenmill.server.dashboard import dashboard_router
from tokenmill.server.embedding_metrics import EmbeddingMetrics
from tokenmill.server.embeddings import create_embedding, embedders_of
from tokenmill.server.errors import APIError, install_handlers, reshape_errors
from tokenmill.server.messages import count_tokens, create_message
from tokenmill.server import llama_cpp, ollama
from tokenmill.server.metrics import Metrics
from tokenmill.server.rerank import create_rerank, create_score
from tokenmill.server.responses import create_response, stored_response
from tokenmill.server.served_models import (ModelSpec, describe_kv_split, load_embedding_models, load_engines,
                                            split_specs, turns)
from tokenmill.server.serving import ServedModel, ServerState, state_of
from tokenmill.server.tokenize import detokenize, tokenize

logger = logging.getLogger(__name__)


def build_app(engines: dict[str, LLMEngine], config: ServerConfig,
              embedding_models: dict[str, EmbeddingModel] | None = None,
              batching: BatchPolicy = BatchPolicy()) -> FastAPI:
    """An app serving each engine by its name, the first by default; engine threads start and stop with the app.

    Embedding models are served at /v1/embeddings only, each batched by its own engine under `batching`.
    """
    embedding_models = embedding_models or {}
    # NOTE: with embedding models alone, the generative series exist too, labelled with the first one's name.
    first = next(iter(engines), None) or next(iter(embedding_models))
    metrics = Metrics(first)  # the other models' series join its registry, so it renders them all
    models: dict[str, ServedModel] = {}
    for name, engine in engines.items():
        series = metrics if name == first else metrics.for_model(name)
        front = AsyncEngine(engine, on_stats=series.observe_stats, on_finished=series.observe_finished,
                            watchdog_timeout=config.watchdog_timeout)
        models[name] = ServedModel(name, front, engine.tokenizer, engine.max_model_len, engine.source.sampling_defaults)
    state = ServerState(models, config, metrics)
    embedding_metrics = EmbeddingMetrics(metrics.registry, metrics.observe_other_busy)
    # Their passes take turns with the generative engines' steps: the two would fight over the same cores.
    embedders = {name: EmbeddingEngine(model, batching, turns, embedding_metrics.observer(name))
                 for name, model in embedding_models.items()}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for model in models.values():
            model.engine.start()
        for embedding_engine in embedders.values():
            embedding_engine.start()
        try:
            yield
        finally:  # also when the app's task is cancelled (run-batch on Ctrl-C): no engine thread may outlive it
            await asyncio.gather(*(model.engine.stop() for model in models.values()),
                                 *(asyncio.to_thread(e.stop) for e in embedders.values()))

    app = FastAPI(title="tokenmill", version=version("tokenmill"), lifespan=lifespan)
    app.state.tokenmill = state
    app.state.embedders = embedders
    install_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(RequireAPIKey, api_key=config.api_key, prefixes=KEYED_PREFIXES)
    reshape_errors(app)
    # Outermost: a browser's preflight carries no key, and a 401 needs the CORS headers for the page to read it.
    app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins), allow_methods=["*"],
                       allow_headers=["*"])

    # response_model=None: handlers build OpenAI's JSON themselves; FastAPI need not re-validate it.
    v1 = APIRouter(prefix="/v1")
    v1.add_api_route("/models", list_models, methods=["GET"], response_model=None)
    # :path, because a served name may hold a slash (`--model org/name=...`).
    v1.add_api_route("/models/{model_id:path}", get_model, methods=["GET"], response_model=None)
    generative = [Depends(refuse_embedding_models)]
    v1.add_api_route("/completions", create_completion, methods=["POST"], response_model=None,
                     dependencies=generative)
    v1.add_api_route("/chat/completions", create_chat_completion, methods=["POST"], response_model=None,
                     dependencies=generative)
    v1.add_api_route("/responses", create_response, methods=["POST"], response_model=None, dependencies=generative)
    # A stored response read, deleted or cancelled: a clear 404, as nothing is stored.
    v1.add_api_route("/responses/{response_id}", stored_response, methods=["GET", "DELETE"], response_model=None)
    v1.add_api_route("/responses/{response_id}/cancel", stored_response, methods=["POST"], response_model=None)
    v1.add_api_route("/messages", create_message, methods=["POST"], response_model=None, dependencies=generative)
    v1.add_api_route("/messages/count_tokens", count_tokens, methods=["POST"], response_model=None,
                     dependencies=generative)
    v1.add_api_route("/embeddings", create_embedding, methods=["POST"], response_model=None)
    # vLLM's, for embedding models; each also without /v1 (and rerank as /v2/rerank), where clients call them.
    for prefix in ("/v1", ""):
        app.add_api_route(f"{prefix}/score", create_score, methods=["POST"], response_model=None)
    for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
        app.add_api_route(path, create_rerank, methods=["POST"], response_model=None)
    app.include_router(v1)
    # Where vLLM serves them, beside /v1 (behind the key as /v1 is: KEYED_PREFIXES).
    app.add_api_route("/tokenize", tokenize, methods=["POST"], response_model=None)
    app.add_api_route("/detokenize", detokenize, methods=["POST"], response_model=None)
    # llama.cpp's native API, where its clients call it (behind the key too).
    for path in ("/completion", "/completions"):
        app.add_api_route(path, llama_cpp.create_completion, methods=["POST"], response_model=None,
                          dependencies=generative)
    app.add_api_route("/props", llama_cpp.get_props, methods=["GET"], response_model=None, dependencies=generative)
    app.add_api_route("/apply-template", llama_cpp.apply_template, methods=["POST"], response_model=None,
                      dependencies=generative)
    # Ollama's API, for its clients (behind the key too); the root answers their is-it-there check.
    app.add_api_route("/api/chat", ollama.chat, methods=["POST"], response_model=None, dependencies=generative)
    app.add_api_route("/api/generate", ollama.generate, methods=["POST"], response_model=None,
                      dependencies=generative)
    app.add_api_route("/api/embed", ollama.embed_inputs, methods=["POST"], response_model=None)
    app.add_api_route("/api/embeddings", ollama.embed_prompt, methods=["POST"], response_model=None)
    app.add_api_route("/api/tags", ollama.tags, methods=["GET"], response_model=None)
    app.add_api_route("/api/ps", ollama.running, methods=["GET"], response_model=None)
    app.add_api_route("/api/show", ollama.show, methods=["POST"], response_model=None)
    app.add_api_route("/api/version", ollama.api_version, methods=["GET"], response_model=None)
    app.add_api_route("/", ollama.root, methods=["GET", "HEAD"], response_model=None)
    app.add_api_route("/health", health, methods=["GET", "HEAD"], response_model=None)
    app.add_api_route("/version", get_version, methods=["GET"], response_model=None)
    app.add_api_route("/metrics", get_metrics, methods=["GET"], response_model=None)
    app.include_router(dashboard_router(config.api_key))
    return app


async def list_models(request: Request) -> dict:
    """Every served model, in --model order, then `auto` when the server chooses among several, then embedders."""
    state = state_of(request)
    cards = [_model_card(model) for model in state.models.values()]
    if len(state.models) > 1 and AUTO not in state.models:
        cards.append(_auto_card(state))
    cards += [_embedding_card(name, engine) for name, engine in embedders_of(request).items()]
    return {"object": "list", "data": cards}


async def get_model(model_id: str, request: Request) -> dict:
    """A served model (or `auto`) by its id; 404 for any other."""
    state = state_of(request)
    if model_id == AUTO and AUTO not in state.models and state.models:  # no generative model: no `auto` either
        return _auto_card(state)
    embedders = embedders_of(request)
    if model_id in embedders:
        return _embedding_card(model_id, embedders[model_id])
    return _model_card(state.model(model_id))


async def refuse_embedding_models(request: Request) -> None:
    """A 400 for a completions or chat request that names an embedding model, before anything else reads it."""
    try:
        body = await request.json()  # the body FastAPI already read: cached on the request
    except (ValueError, RecursionError):  # nesting past Python's parser too
        return  # not JSON: FastAPI's validation (or the handler reading it) answers it
    name = body.get("model") if isinstance(body, dict) else None
    if isinstance(name, str) and name in embedders_of(request):
        raise APIError(400, f"{name!r} is an embedding model; it answers /v1/embeddings, not {request.url.path}",
                       param="model", code="model_not_generative")
    if not state_of(request).models:
        raise APIError(404, f"this server serves embedding models only; {request.url.path} needs a generative "
                       "one", param="model", code="model_not_found")


def _embedding_card(name: str, engine: EmbeddingEngine) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "tokenmill",
            "max_model_len": engine.model.max_input_tokens}


def _auto_card(state: ServerState) -> dict:
    # The longest context, since `auto` can send a request to any served model that fits it.
    return {"id": AUTO, "object": "model", "created": 0, "owned_by": "tokenmill",
            "max_model_len": max(model.max_model_len for model in state.models.values())}


def _model_card(model: ServedModel) -> dict:
    return {"id": model.name, "object": "model", "created": 0, "owned_by": "tokenmill",
            "max_model_len": model.max_model_len}


async def health(request: Request) -> Response:
    """200 while every engine thread runs, none stalled or failing; else 503 naming them; never behind auth."""
    models = state_of(request).models.values()
    stopped = [repr(model.name) for model in models if not model.engine.is_running]
    stopped += [repr(name) for name, engine in embedders_of(request).items() if not engine.is_running]
    problems = [f"the engine of {', '.join(stopped)} is not running"] if stopped else []
    problems += [f"the engine of {model.name!r} is stalled: {model.engine.stalled}"
                 for model in models if model.engine.is_running and model.engine.stalled]
    problems += [f"the engine of {model.name!r} is failing: {model.engine.failing}"
                 for model in models if model.engine.is_running and model.engine.failing]
    if not problems:
        return JSONResponse({"status": "ok"})
    return APIError(503, f"{'; '.join(problems)}; see the server log", type="server_error").response()


async def get_version() -> dict:
    """The tokenmill package version."""
    return {"version": version("tokenmill")}


async def get_metrics(request: Request) -> Response:
    """Prometheus text exposition."""
    return Response(state_of(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


class BodyLimit:
    """Answer 413 to request bodies over max_bytes, whether or not they declare a Content-Length."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                # An HTTPException, because FastAPI turns any other error while reading a body into a 400.
                raise HTTPException(413, self._message())
            return message

        await self.app(scope, counting_receive, send)

    def _message(self) -> str:
        return f"request body is larger than {self.max_bytes} bytes"

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = APIError(413, self._message(), code="request_too_large").response()
        await response(scope, receive, send)


# Seconds past --shutdown-timeout before uvicorn cancels what still runs: time for the handlers to answer the error
# each request was just given.
_ANSWER_SECONDS = 5.0


class _Server(uvicorn.Server):
    """uvicorn's server, failing requests that outlive --shutdown-timeout with an error of ours (OpenAI's JSON, a
    stream's error event and [DONE]): uvicorn would cancel them, answering a bare 500 and logging a traceback each."""

    def __init__(self, config: uvicorn.Config, engines: list[AsyncEngine], grace: float) -> None:
        super().__init__(config)
        self.engines, self.grace = engines, grace

    async def shutdown(self, sockets: list | None = None) -> None:
        # What uvicorn cancels from now on (past the grace, or at a second Ctrl-C) is answered with this (errors.py's
        # CatchUnexpected): a request still compiling its grammar or tokenizing has reached no engine to fail.
        self.config.app.state.shutting_down = ShuttingDownError("the server is shutting down; retry this request")
        late = asyncio.create_task(self._fail_late())
        try:
            await super().shutdown(sockets)
        finally:
            late.cancel()

    async def _fail_late(self) -> None:
        await asyncio.sleep(self.grace)
        error = ShuttingDownError(f"the server is shutting down, and this request outlived its --shutdown-timeout "
                                  f"of {self.grace:g} s; retry it")
        while True:  # until uvicorn is done: also those that reach an engine later (a cascade's escalation)
            for engine in self.engines:
                engine.fail_live(error)
            await asyncio.sleep(0.5)


def load_app(engine_config: EngineConfig, config: ServerConfig, models: list[str],
             batching: BatchPolicy = BatchPolicy(), embedding_dtype: str = "auto") -> FastAPI:
    """Load each model (MODEL or NAME=MODEL) and build the app serving them, its engines not yet started."""
    specs = [ModelSpec.parse(value) for value in models]  # a bad spec fails before any model loads
    for spec in specs:
        check_named(spec.model)
    generative, embedding = split_specs(specs)
    if len(generative) > 1:
        logger.info(describe_kv_split(engine_config, len(generative)))
    # Loaded on a thread that then exits, so only engine threads ever run an OpenMP region: each such thread
    # keeps a worker pool, and a second live pool left every op waking sleeping workers (decode 1.7x slower
    # in float32, 7x with the int8 kernels; docs/benchmarks.md). NOTE: several models mean one pool each.
    with ThreadPoolExecutor(1) as loader:
        engines = loader.submit(load_engines, engine_config, generative).result() if generative else {}
        embedding_models = loader.submit(load_embedding_models, embedding, embedding_dtype, set(engines)).result()
    return build_app(engines, config, embedding_models, batching)


def _listen(config: ServerConfig) -> list[socket.socket]:
    """Sockets bound to each address --host resolves to (localhost: 127.0.0.1, and ::1 where the machine has IPv6)
    at --port; TokenmillError naming them if one cannot be bound, or none can."""
    where = f"cannot listen on {config.host}:{config.port}"
    try:
        addresses = socket.getaddrinfo(config.host or None, config.port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:  # not an address, nor a name this machine resolves
        raise TokenmillError(f"{where}: {exc.strerror}") from exc
    bound: list[socket.socket] = []
    for family, kind, proto, _, address in dict.fromkeys(addresses):  # a resolver may repeat one
        try:
            listening = socket.socket(family, kind, proto)
        except OSError:  # a family this machine lacks
            continue
        try:
            listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart need not wait
            if family == socket.AF_INET6:  # beside its IPv4 twin, as asyncio binds them
                listening.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if bound and not config.port:  # --port 0: every address on the free port the first one got
                address = (address[0], bound[0].getsockname()[1], *address[2:])
            listening.bind(address)
        except OSError as exc:
            listening.close()
            if exc.errno == errno.EADDRNOTAVAIL:  # named but not configured here (::1 where IPv6 is off)
                continue
            for other in bound:
                other.close()
            raise TokenmillError(f"{where}: {exc.strerror or exc}") from exc  # in use, or not allowed
        bound.append(listening)
    if not bound:
        raise TokenmillError(f"{where}: none of its addresses is this machine's")
    return bound


def serve(engine_config: EngineConfig, config: ServerConfig, models: list[str],
          batching: BatchPolicy = BatchPolicy(), embedding_dtype: str = "auto") -> None:
    """Load each model, serve until SIGTERM/SIGINT; in-flight requests get shutdown_timeout."""
    listening = _listen(config)  # first: a port in use is found at once, not after minutes of loading
    port = listening[0].getsockname()[1]  # --port 0 takes a free one: this is the one to tell
    app = load_app(engine_config, config, models, batching, embedding_dtype)
    engines = {name: model.engine.engine for name, model in app.state.tokenmill.models.items()}
    for name, engine in engines.items():
        served = name if name == engine.source.name else f"{name} = {engine.source.name}"
        logger.info("serving %s (KV cache %d tokens, context %d) at http://%s:%d/v1",
                    served, engine.runner.num_blocks * engine_config.block_size, engine.max_model_len,
                    config.host, port)
        if engine.source.sampling_defaults:  # as vLLM says so: requests sample differently from plain defaults
            logger.info("%s: requests that leave them unset sample with the model's recommended %s", name,
                        ", ".join(f"{k}={v:g}" for k, v in engine.source.sampling_defaults.items()))
    for name, embedder in app.state.embedders.items():
        model = embedder.model
        logger.info("serving %s for embeddings (%d dimensions, inputs up to %d tokens, batches of %d tokens after "
                    "up to %g ms) at http://%s:%d/v1/embeddings", name, model.dimensions, model.max_input_tokens,
                    batching.max_batch_tokens, batching.max_wait_ms, config.host, port)
    engines_served = [model.engine for model in app.state.tokenmill.models.values()]
    server = _Server(uvicorn.Config(
        app, host=config.host, port=config.port, timeout_graceful_shutdown=config.shutdown_timeout + _ANSWER_SECONDS,
        log_level="info", access_log=False,
    ), engines_served, config.shutdown_timeout)
    # NOTE: uvicorn re-raises the signal it stopped on once it is done; with these handlers in place that
    # re-raise is a no-op, so a graceful stop exits 0 instead of dying by the signal.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        server.run(sockets=listening)
    finally:
        # A second Ctrl-C makes uvicorn skip the app's shutdown, which stops the engines: the process must not exit
        # with their threads inside a step.
        for engine in engines_served:
            engine.join(timeout=_ANSWER_SECONDS)
        for embedder in app.state.embedders.values():
            embedder.stop()
