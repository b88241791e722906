"""API-key check for /v1 routes: `Authorization: Bearer <key>`, compared in constant time."""

import hmac

from fastapi import Request

from tokenmill.server.errors import APIError


def require_api_key(api_key: str | None):
    """A FastAPI dependency that admits a request only with the right bearer key (or always, without one)."""

    async def check(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # NOTE: compare_digest on bytes keeps the comparison time independent of where the keys differ.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key; send `Authorization: Bearer <key>`",
                           type="invalid_request_error", code="invalid_api_key")

    return check
