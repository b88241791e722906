"""The replicas' ingress checks the API key before it reads and tokenizes a body (no Ray started)."""

import asyncio
from types import SimpleNamespace

import pytest
from starlette.requests import Request

from tokenmill.server.auth import require_api_key
from tokenmill.server.errors import APIError

pytestmark = pytest.mark.ray  # imports ray, which only `make test-ray` installs


def test_a_keyless_request_is_refused_before_its_body_is_read():
    from tokenmill.scale.deployment import Ingress

    async def receive() -> dict:
        raise AssertionError("the ingress read the body of a request without the key")

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "headers": [], "http_version": "1.1", "scheme": "http", "server": ("t", 80),
             "client": ("t", 1), "root_path": ""}
    ingress = SimpleNamespace(check_key=require_api_key("s3cret"))  # forward uses no more of it before forwarding
    with pytest.raises(APIError) as refused:
        asyncio.run(Ingress.forward(ingress, Request(scope, receive)))
    assert refused.value.status == 401
