"""API-key check: `Authorization: Bearer <key>` (or Anthropic's `x-api-key`), compared in constant time."""

import hmac

from fastapi import Request
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from tokenmill.server.errors import APIError


def admitted(headers: Headers, api_key: str | None) -> bool:
    """Whether the headers carry the key (any do where there is no key): `Authorization: Bearer`, or `x-api-key` as
    Anthropic's clients send it."""
    if api_key is None:
        return True
    scheme, _, given = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        given = headers.get("x-api-key", "")
    # NOTE: compare_digest on bytes keeps the comparison time independent of where the keys differ. Starlette
    # decodes header bytes as Latin-1: encoded back so, they are the bytes the client sent (UTF-8 for a key of
    # other letters).
    return hmac.compare_digest(given.strip().encode("latin-1", "replace"), api_key.encode())


def _refused() -> APIError:
    return APIError(401, "invalid or missing API key; send `Authorization: Bearer <key>`",
                    type="invalid_request_error", code="invalid_api_key")

# Paths behind the key: the OpenAI API, and vLLM's, llama.cpp's and Ollama's endpoints beside it (rendering,
# tokenizing, embedding take CPU; /completion covers /completions).
KEYED_PREFIXES = ("/v1/", "/v2/", "/tokenize", "/detokenize", "/score", "/rerank", "/completion", "/props",
                  "/apply-template", "/api/")


def require_api_key(api_key: str | None):
    """A FastAPI dependency that admits a request only with the right bearer key (or always, without one)."""

    async def check(request: Request) -> None:
        if not admitted(request.headers, api_key):
            raise _refused()

    return check


class RequireAPIKey:
    """The key check for every path under the prefixes, before anything reads the body (a malformed body from a client
    without the key is its 401, not a 400 about the body)."""

    def __init__(self, app: ASGIApp, api_key: str | None, prefixes: tuple[str, ...]) -> None:
        self.app = app
        self.api_key = api_key
        self.prefixes = prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and scope["path"].startswith(self.prefixes)
                and not admitted(Headers(scope=scope), self.api_key)):
            await _refused().response()(scope, receive, send)
            return
        await self.app(scope, receive, send)
