"""The replicas' ingress (no Ray started): the API key checked before the body is read; a prefix key never refuses."""

import asyncio
import copy
import json
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


def test_a_chat_the_key_tokenizer_cannot_render_is_forwarded_unkeyed(smollm2_source):
    from tokenmill.scale.deployment import Ingress

    # The first model's tokenizer keys every request; a base model has no chat template, and another model
    # (or the replica's developer-as-system) may serve what it refuses.
    tokenizer = copy.copy(smollm2_source.tokenizer)
    tokenizer.chat_template = None
    ingress = SimpleNamespace(tokenizer=tokenizer, block_size=16)
    body = json.dumps({"model": "chat", "messages": [{"role": "user", "content": "hi " * 80}]}).encode()
    assert Ingress._key(ingress, "/v1/chat/completions", body) is None
    ingress.tokenizer = smollm2_source.tokenizer
    assert Ingress._key(ingress, "/v1/chat/completions", body) is not None
