"""`serve --replicas`: the OpenAI app on Ray Serve, as an HTTP ingress in front of N engine replicas.

The ingress reads each request, keys it by its prompt's first blocks and forwards it through a deployment
handle, whose request router (request_router.py) picks the replica; each replica runs build_app's app in process.
"""

import asyncio
import json
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.exceptions import RayError
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from tokenmill.config import EngineConfig, ServerConfig
from tokenmill.embeddings.batcher import BatchPolicy
from tokenmill.errors import TokenmillError
from tokenmill.loader.source import open_model
from tokenmill.scale.config import ScaleConfig
from tokenmill.scale import metrics as scale_metrics
from tokenmill.scale.metrics import MetricsBoard, merge
from tokenmill.scale.request_router import PrefixAwareRouter
from tokenmill.scale.routing import prefix_key
from tokenmill.server.app import build_app
from tokenmill.server.auth import KEYED_PREFIXES, require_api_key
from tokenmill.server.dashboard import snapshot
from tokenmill.server.errors import APIError, install_handlers, reshape_errors
from tokenmill.server.protocol import ChatCompletionRequest
from tokenmill.server.messages_protocol import MessagesRequest
from tokenmill.server.ollama_protocol import OllamaChatRequest, OllamaGenerateRequest
from tokenmill.server.responses_protocol import ResponsesRequest
from tokenmill.server.served_models import ModelSpec, load_embedding_models, load_engines, split_specs

logger = logging.getLogger(__name__)

# How often a replica pushes its /metrics text to the board the ingress renders.
_METRICS_PERIOD_S = 1.0


class EngineReplica:
    """One engine (or several models) behind build_app's FastAPI app, called with ASGI messages by the ingress."""

    def __init__(self, engine_config: EngineConfig, config: ServerConfig, models: list[str], batching: BatchPolicy,
                 embedding_dtype: str, board: Any) -> None:
        generative, embedding = split_specs([ModelSpec.parse(value) for value in models])
        # Loaded on a thread that then exits, as app.serve does: only engine threads then run OpenMP regions.
        with ThreadPoolExecutor(1) as loader:
            engines = loader.submit(load_engines, engine_config, generative).result() if generative else {}
            embedding_models = loader.submit(load_embedding_models, embedding, embedding_dtype, set(engines)).result()
        self.app = build_app(engines, config, embedding_models, batching)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.board = board
        self._lifespan: Any = None
        self._starting = asyncio.Lock()

    async def _start(self) -> None:
        # The engines' threads start on the loop that consumes their outputs: this one, which forward runs on.
        async with self._starting:
            if self._lifespan is None:
                self._lifespan = self.app.router.lifespan_context(self.app)
                await self._lifespan.__aenter__()
                asyncio.get_running_loop().create_task(self._push_metrics())

    async def _push_metrics(self) -> None:
        state = self.app.state.tokenmill
        while True:
            self.board.put.remote(self.replica, state.metrics.render().decode())
            await asyncio.sleep(_METRICS_PERIOD_S)

    async def forward(self, key: str | None, scope: dict, body: bytes) -> AsyncIterator[dict]:
        """Run one HTTP request through the app; yields its ASGI response messages. key is for the router only."""
        await self._start()
        messages: asyncio.Queue[dict | None] = asyncio.Queue()
        disconnected = asyncio.Event()
        sent_body = False

        async def receive() -> dict:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()  # the app watches for this to abort requests whose client left
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-tokenmill-replica", self.replica.encode()),
                                                  (b"x-tokenmill-pid", str(os.getpid()).encode())]}
            await messages.put(message)

        app = asyncio.get_running_loop().create_task(self.app(scope, receive, send))
        app.add_done_callback(lambda _: messages.put_nowait(None))  # an app that fails mid-response ends it too
        try:
            while (message := await messages.get()) is not None:
                yield message
                if message["type"] == "http.response.body" and not message.get("more_body", False):
                    return
            await app  # it ended before its response did: raise what it raised
            raise RuntimeError(f"{scope['method']} {scope['path']} ended without a complete response")
        finally:
            disconnected.set()  # also when the ingress cancels this generator: its client went away

    def check_health(self) -> None:
        """Ray Serve's health check: an engine thread that died makes the replica unhealthy, so it is replaced."""
        if self._lifespan is None:
            return
        state = self.app.state.tokenmill
        stopped = [name for name, model in state.models.items() if not model.engine.is_running]
        if stopped:
            raise RuntimeError(f"the engine of {', '.join(stopped)} is not running")


def _cors_headers(origin: str | None, allowed: tuple[str, ...]) -> dict[str, str]:
    """What the replicas' CORSMiddleware adds to an answer for a page of this origin (defined before Ingress: Serve
    copies the class with the globals it names at decoration)."""
    if origin is None or ("*" not in allowed and origin not in allowed):
        return {}
    return {"Access-Control-Allow-Origin": "*"} if "*" in allowed else {"Access-Control-Allow-Origin": origin,
                                                                         "Vary": "Origin"}


ingress_app = FastAPI(title="tokenmill")
install_handlers(ingress_app)
# Its own answers (a wrong key, too many waiting, a replica gone) in Anthropic's and Ollama's shapes on their paths,
# as a replica's are.
reshape_errors(ingress_app)


@serve.ingress(ingress_app)
class Ingress:
    """The HTTP entry: keys each request by its prompt prefix and forwards it to an engine replica."""

    def __init__(self, engine: DeploymentHandle, model: str | None, block_size: int, board: Any,
                 api_key: str | None = None, allowed_origins: tuple[str, ...] = ("*",)) -> None:
        self.engine = engine
        self.allowed_origins = allowed_origins
        # The model whose tokens key prefixes; None (embedding models only): no request has a prefix key.
        self.tokenizer = open_model(model).tokenizer if model is not None else None
        self.block_size = block_size
        self.board = board
        self.check_key = require_api_key(api_key)

    async def _merged(self) -> bytes:
        texts = await self.board.texts.remote()
        # NOTE: through the module, as request_router.py counts: Ray Serve ships this class by value, with copies
        # of the globals it names.
        return merge(texts, scale_metrics.ROUTING_REGISTRY)

    @ingress_app.get("/metrics")
    async def metrics(self) -> Response:
        """Every live replica's series labelled by replica, and the routing decisions."""
        return Response(await self._merged(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @ingress_app.get("/dashboard/data")
    async def dashboard_data(self, request: Request) -> Response:
        """The dashboard's snapshot over all replicas (the page itself comes from any replica)."""
        await self.check_key(request)
        data = snapshot(text_string_to_metric_families((await self._merged()).decode()))
        data["served"] = list(data["models"])
        return JSONResponse(data)

    @ingress_app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
    async def forward(self, request: Request) -> Response:
        """Forward to a replica; 503 if it dies before answering, a cut stream if it dies after."""
        try:
            # Before the body is read and tokenized for its prefix, as a replica; but not a browser's preflight,
            # which carries no key: the replica's CORS answers it.
            if request.url.path.startswith(KEYED_PREFIXES) and request.method != "OPTIONS":
                await self.check_key(request)
            body = await request.body()
            scope = {k: request.scope[k] for k in ("type", "http_version", "method", "scheme", "path", "raw_path",
                                                   "query_string", "headers", "server", "client") if k in request.scope}
            scope["root_path"] = ""
            # Rendered and tokenized off the loop, as a replica does: a long prompt must not stall every other stream.
            key = await asyncio.to_thread(self._key, request.url.path, body)
            stream: DeploymentResponseGenerator = self.engine.options(stream=True).forward.remote(key, scope, body)
            try:
                start = await stream.__anext__()
            except BackPressureError as exc:  # --max-waiting requests already queued for the replicas
                raise APIError(429, "too many requests are waiting for the engine replicas; retry shortly",
                               type="rate_limit_error", code="too_many_waiting_requests",
                               headers={"Retry-After": "1"}) from exc
            except (RayError, DeploymentUnavailableError, ReplicaUnavailableError) as exc:
                logger.warning("replica failed before answering: %s", exc)
                raise APIError(503, "the engine replica serving this request stopped; retry it",
                               type="server_error") from exc
        except APIError as exc:
            # The ingress's own answers carry the CORS headers a replica's would: without them a page on another
            # origin cannot read its 401 or 429, only a network error.
            response = exc.response()
            response.headers.update(_cors_headers(request.headers.get("origin"), self.allowed_origins))
            return response

        async def rest() -> AsyncIterator[bytes]:
            try:
                async for message in stream:
                    yield message.get("body", b"")
            finally:
                stream.cancel()

        response = StreamingResponse(rest(), status_code=start["status"])
        response.raw_headers = list(start.get("headers", []))
        return response

    def _key(self, path: str, body: bytes) -> str | None:
        """The prefix key of a completions, chat, Responses, Anthropic Messages or Ollama body (llama.cpp's prompt is
        completions'); None for anything else or anything it cannot read."""
        try:
            request = json.loads(body) if body else None
            if not isinstance(request, dict) or self.tokenizer is None:
                return None
            if path.endswith("/chat/completions"):
                # As the replica renders it (tools written in, text parts joined, developer as system): else chats
                # sharing their first blocks there would go to different replicas.
                ids = ChatCompletionRequest.model_validate(request).prompt_token_ids(self.tokenizer)
            elif path.endswith("/responses"):  # answered as the chat it translates to
                # An item_reference, kept by the replica that answered it, keys as nothing (as a reasoning item):
                # the turn keys by the prefix before it, as the earlier turn did where that prefix filled the key's
                # blocks; else (or with that replica busy) it may reach another, which refuses the reference.
                chat = ResponsesRequest.model_validate(request).chat_request(lambda _: {"type": "reasoning"})
                ids = chat.prompt_token_ids(self.tokenizer)
            elif path.endswith("/messages"):
                ids = MessagesRequest.model_validate(request).chat_request().prompt_token_ids(self.tokenizer)
            elif path == "/api/chat" or path == "/api/generate" and not request.get("raw"):  # Ollama's, chats too
                kind = OllamaChatRequest if path == "/api/chat" else OllamaGenerateRequest
                ids = kind.model_validate(request).chat_request().prompt_token_ids(self.tokenizer)
            else:
                prompt = request.get("prompt")
                prompt = prompt[0] if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else prompt
                ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
            if not isinstance(ids, list):
                return None
            keep = request.get("truncate_prompt_tokens")  # the replica runs (and caches) only the prompt's last ones
            return prefix_key(ids[-keep:] if isinstance(keep, int) and keep > 0 else ids, self.block_size)
        except (KeyError, TypeError, ValueError, TokenmillError):
            # The replica answers a bad request with its own 400, and may serve what this tokenizer refuses:
            # another model's chat, a developer message it renders as system.
            return None


def start_ray(config: ServerConfig, scale: ScaleConfig) -> None:
    """Join the cluster at scale.ray_address or start a local Ray; start Serve's HTTP proxy on host:port."""
    if scale.ray_address is None:
        ray.init(include_dashboard=False, log_to_driver=False)  # the dashboard costs a core's worth of start-up
    else:
        ray.init(address=scale.ray_address, log_to_driver=False)
    serve.start(http_options={"host": config.host, "port": config.port})


def deploy(engine_config: EngineConfig, config: ServerConfig, models: list[str], scale: ScaleConfig,
           batching: BatchPolicy = BatchPolicy(), embedding_dtype: str = "auto") -> None:
    """Deploy the ingress and the engine replicas as Serve's `tokenmill` app (replacing one deployed before)."""
    board = ray.remote(MetricsBoard).options(name="tokenmill-metrics", get_if_exists=True, num_cpus=0).remote()
    router = (RequestRouterConfig(request_router_class=PrefixAwareRouter) if scale.routing == "prefix"
              else RequestRouterConfig())
    engine = serve.deployment(EngineReplica).options(
        name="engine", **scale.deployment_options(), request_router_config=router,
        # A replica takes what one engine batches; the rest wait in the router, free to go to any replica.
        max_ongoing_requests=engine_config.max_num_seqs,
        # Beyond --max-waiting queued there a request is refused (429), as one process refuses it.
        max_queued_requests=config.max_waiting,
        ray_actor_options={"num_cpus": engine_config.num_threads or 1},
        health_check_period_s=2, health_check_timeout_s=30,
    ).bind(engine_config, config, models, batching, embedding_dtype, board)
    ingress = serve.deployment(Ingress).options(
        name="ingress", num_replicas=1, max_ongoing_requests=100_000, ray_actor_options={"num_cpus": 0},
    ).bind(engine, prefix_key_model(models), engine_config.block_size, board, config.api_key, config.allowed_origins)
    serve.run(ingress, name="tokenmill", route_prefix="/")


def prefix_key_model(models: list[str]) -> str | None:
    """The first generative model (an embedding model has no chat template and no completions), or None."""
    generative, _ = split_specs([ModelSpec.parse(m) for m in models])
    return generative[0].model if generative else None


def serve_replicas(engine_config: EngineConfig, config: ServerConfig, models: list[str], scale: ScaleConfig,
                   batching: BatchPolicy = BatchPolicy(), embedding_dtype: str = "auto") -> None:
    """Start (or join) Ray, deploy the ingress and the engine replicas, serve until SIGTERM/SIGINT."""
    # Each generative model opened (pulled) here first: a bad --model is then one line, not a deployment that Ray
    # retries and then reports as its own failure.
    for spec in split_specs([ModelSpec.parse(m) for m in models])[0]:
        open_model(spec.model)
    start_ray(config, scale)
    deploy(engine_config, config, models, scale, batching, embedding_dtype)
    logger.info("serving %s on %s replicas (%s routing) at http://%s:%d/v1", ", ".join(models),
                f"{scale.lowest}..{scale.highest}" if scale.autoscaling else scale.replicas, scale.routing,
                config.host, config.port)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1):
        pass
    serve.shutdown()
    ray.shutdown()
