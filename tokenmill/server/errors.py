"""Every error leaves the server in OpenAI's shape: {"error": {"message", "type", "param", "code"}}; on Anthropic's
Messages API paths and Ollama's, in theirs."""

import asyncio
import json
import logging
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenmill.engine.async_engine import EngineStepError, ShuttingDownError
from tokenmill.errors import InvalidRequestError, PromptTooLongError, TokenmillError

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error with the HTTP status and OpenAI fields to answer with."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}
        self.headers = headers

    def response(self) -> JSONResponse:
        """The JSON response for this error."""
        return JSONResponse(self.body, status_code=self.status, headers=self.headers)


def from_exception(exc: Exception) -> APIError:
    """Map an engine or validation exception to the error a client should see."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidRequestError):
        # OpenAI's code for a prompt past the context, which clients look for to trim and retry.
        code = "context_length_exceeded" if isinstance(exc, PromptTooLongError) else None
        return APIError(400, str(exc), param=exc.param, code=code)
    if isinstance(exc, ShuttingDownError):
        return APIError(503, str(exc), type="server_error", code="server_shutting_down")
    if isinstance(exc, EngineStepError):
        return APIError(500, str(exc), type="server_error")
    logger.exception("unexpected error while serving a request", exc_info=exc)
    return APIError(500, "internal server error; see the server log", type="server_error")


def install_handlers(app: FastAPI) -> None:
    """Answer every failure, including FastAPI's own, in OpenAI's error shape."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return APIError(400, f"request body is not valid JSON: {first.get('msg')}").response()
        if tuple(first.get("loc", ())) == ("body",):
            return APIError(400, "request body must be a JSON object, sent with Content-Type: application/json"
                            ).response()
        param = field_path(first.get("loc", ()))
        where = f"{param}: " if param else ""
        return APIError(400, f"{where}{first.get('msg')}", param=param).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), code=code, headers=exc.headers).response()

    # NOTE: our own errors need their own handler: Starlette answers a bare Exception handler's
    # response and then re-raises, so every 400 from engine validation logged a traceback.
    @app.exception_handler(TokenmillError)
    async def engine_error(request: Request, exc: TokenmillError) -> JSONResponse:
        return from_exception(exc).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return from_exception(exc).response()

    app.add_middleware(CatchUnexpected)


class CatchUnexpected:
    """Answer a bug's exception with a 500 here, before Starlette's outermost handler sees it."""

    # NOTE: that handler answers and then re-raises, so uvicorn logged each traceback twice and closed the
    # connection, and a client's next request on it failed with "connection reset" (found by fuzzing).
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            if started:  # a response under way can only be cut off; let the server close the connection
                raise
            await from_exception(exc).response()(scope, receive, send)
        except asyncio.CancelledError:
            # uvicorn cancels what outlives the shutdown's grace: answered as ours, not as its bare 500.
            stopping = getattr(scope["app"].state, "shutting_down", None)
            if started or stopping is None:
                raise
            await from_exception(stopping).response()(scope, receive, send)


# Anthropic's error type for each HTTP status; others are invalid_request_error (4xx) or api_error (5xx).
_ANTHROPIC_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                    413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
                    529: "overloaded_error"}


def _anthropic_type(status: int) -> str:
    """The error type Anthropic's API gives with this status."""
    return _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def anthropic_error(status: int, error: dict) -> dict:
    """An error as Anthropic's Messages API gives it (param kept)."""
    return {"type": "error", "error": {"type": _anthropic_type(status), "message": error["message"],
                                       **({"param": error["param"]} if error.get("param") else {})}}


def ollama_error(status: int, error: dict) -> dict:
    """An error as Ollama's API gives it: the message alone."""
    return {"error": error["message"]}


class ReshapedErrors:
    """Errors on another API's paths (Anthropic's Messages, Ollama's) re-shaped as that API gives them, whichever part
    answered them (the key check, the body limit, validation, the engine)."""

    def __init__(self, app: ASGIApp, prefix: str, shape: Callable[[int, dict], dict]) -> None:
        self.app = app
        self.prefix = prefix
        self.shape = shape

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        parts: list[bytes] = []

        async def reshaped(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message  # held until the body is whole
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            parts.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(parts)
            try:
                body = json.dumps(self.shape(start["status"], json.loads(body)["error"])).encode()
            except (ValueError, KeyError, TypeError):
                pass  # not an error of ours: passed on as it is
            headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, reshaped)


def reshape_errors(app: FastAPI) -> None:
    """Errors on Anthropic's and Ollama's paths in their shapes (the others keep OpenAI's)."""
    app.add_middleware(ReshapedErrors, prefix="/v1/messages", shape=anthropic_error)
    app.add_middleware(ReshapedErrors, prefix="/api/", shape=ollama_error)


def field_path(loc: tuple) -> str | None:
    """The field path of a pydantic error location, without "body" and without union member tags."""
    parts = []
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, str) and ("[" in part or part in _TYPE_TAGS):
            break  # pydantic names the union member it tried, e.g. "str" or "list[int]"
        parts.append(str(part))
    return ".".join(parts) or None


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}
