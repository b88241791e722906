"""The replicas' ingress (no Ray started): the API key checked before the body is read; a prefix key never refuses."""

import asyncio
import copy
import json
from types import SimpleNamespace

import pytest
from starlette.requests import Request

from tokenmill.server.auth import require_api_key
from tokenmill.server.protocol import ChatCompletionRequest

pytestmark = pytest.mark.ray  # imports ray, which only `make test-ray` installs


def test_a_keyless_request_is_refused_before_its_body_is_read():
    from tokenmill.scale.deployment import Ingress

    async def receive() -> dict:
        raise AssertionError("the ingress read the body of a request without the key")

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "headers": [(b"origin", b"http://ui.example")], "http_version": "1.1",
             "scheme": "http", "server": ("t", 80), "client": ("t", 1), "root_path": ""}
    # forward uses no more of it before forwarding
    ingress = SimpleNamespace(check_key=require_api_key("s3cret"), allowed_origins=("http://ui.example",))
    refused = asyncio.run(Ingress.forward(ingress, Request(scope, receive)))
    assert refused.status_code == 401 and json.loads(refused.body)["error"]["code"] == "invalid_api_key"
    # With the CORS headers a replica's 401 has: without them the page on that origin saw a network error.
    assert refused.headers["access-control-allow-origin"] == "http://ui.example"


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


CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "The weather in a city",
                                           "parameters": CITY}}]
SYSTEM = "You are a meticulous assistant for the ACME corporation. " * 6


@pytest.mark.parametrize("first, second", [
    # Tools a template does not render are written into the prompt's start: agents' chats share those blocks.
    ({"messages": [{"role": "user", "content": "Weather in Paris tomorrow?"}], "tools": TOOLS},
     {"messages": [{"role": "user", "content": "Book a table in Rome."}], "tools": TOOLS}),
    ({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}]},
     {"messages": [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
                   {"role": "user", "content": "hi"}]}),
    ({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}]},
     {"messages": [{"role": "developer", "content": SYSTEM}, {"role": "user", "content": "yo"}]}),
])
def test_chats_a_replica_renders_alike_get_one_key(smollm2_source, first, second):
    from tokenmill.scale.deployment import Ingress

    ingress = SimpleNamespace(tokenizer=smollm2_source.tokenizer, block_size=16)
    keys = [Ingress._key(ingress, "/v1/chat/completions", json.dumps({"model": "m", **body}).encode())
            for body in (first, second)]
    assert keys[0] is not None and keys[0] == keys[1]  # raw messages gave two keys, or none for text parts


def test_a_truncated_prompt_is_keyed_by_what_the_replica_runs(smollm2_source):
    from tokenmill.scale.deployment import Ingress

    ingress = SimpleNamespace(tokenizer=smollm2_source.tokenizer, block_size=16)
    tail = smollm2_source.tokenizer.encode(SYSTEM)[-64:]

    def key(path: str, **body) -> str | None:
        return Ingress._key(ingress, path, json.dumps({"model": "m", **body}).encode())

    # Keyed by the whole prompt, a truncated one went to a replica that never cached those blocks.
    assert key("/v1/completions", prompt="Some other start. " + SYSTEM, truncate_prompt_tokens=64) == \
        key("/v1/completions", prompt=tail)
    chat = {"messages": [{"role": "user", "content": SYSTEM}]}
    ids = ChatCompletionRequest.model_validate({"model": "m", **chat}).prompt_token_ids(smollm2_source.tokenizer)
    assert key("/v1/chat/completions", **chat, truncate_prompt_tokens=48) == key("/v1/completions", prompt=ids[-48:])


def test_a_responses_request_is_keyed_as_the_chat_it_is_answered_as(smollm2_source):
    from tokenmill.scale.deployment import Ingress

    ingress = SimpleNamespace(tokenizer=smollm2_source.tokenizer, block_size=16)
    chat = {"model": "m", "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}]}
    responses = {"model": "m", "instructions": SYSTEM, "input": [{"role": "user", "content": "hi"}]}
    key = Ingress._key(ingress, "/v1/responses", json.dumps(responses).encode())
    assert key is not None and key == Ingress._key(ingress, "/v1/chat/completions", json.dumps(chat).encode())


def test_a_turn_naming_an_earlier_answer_keys_by_its_prefix(smollm2_source):
    from tokenmill.scale.deployment import Ingress

    # An item_reference (kept by the replica that answered) made the key None: the turn went to any replica, which
    # (R - 1) / R of the time refused it, not having the item.
    ingress = SimpleNamespace(tokenizer=smollm2_source.tokenizer, block_size=16)
    first = {"model": "m", "instructions": SYSTEM, "input": [{"role": "user", "content": "hi"}]}
    later = {**first, "input": [*first["input"], {"type": "item_reference", "id": "msg_1"},
                                {"role": "user", "content": "and?"}]}
    key = Ingress._key(ingress, "/v1/responses", json.dumps(later).encode())
    assert key is not None and key == Ingress._key(ingress, "/v1/responses", json.dumps(first).encode())


def test_ollamas_chats_are_keyed_as_the_chats_they_are_answered_as(smollm2_source):
    from tokenmill.scale.deployment import Ingress

    # They went to any replica, its cached prefix (the whole conversation so far) on another one.
    ingress = SimpleNamespace(tokenizer=smollm2_source.tokenizer, block_size=16)
    chat = {"model": "m", "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}]}
    key = Ingress._key(ingress, "/v1/chat/completions", json.dumps(chat).encode())
    assert key is not None and key == Ingress._key(ingress, "/api/chat", json.dumps(chat).encode())
    generate = {"model": "m", "system": SYSTEM, "prompt": "hi"}
    assert Ingress._key(ingress, "/api/generate", json.dumps(generate).encode()) == key


def _forward_failing_with(exc: Exception):
    from tokenmill.scale.deployment import Ingress

    class Stream:
        async def __anext__(self):
            raise exc

    engine = SimpleNamespace(options=lambda **_: SimpleNamespace(forward=SimpleNamespace(remote=lambda *a: Stream())))

    async def receive() -> dict:
        return {"type": "http.request", "body": b'{"prompt": "hi"}', "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "headers": [(b"origin", b"http://ui.example")], "http_version": "1.1",
             "scheme": "http", "server": ("t", 80), "client": ("t", 1), "root_path": ""}
    ingress = SimpleNamespace(check_key=lambda request: asyncio.sleep(0), engine=engine, _key=lambda path, body: None,
                              allowed_origins=("*",))
    return asyncio.run(Ingress.forward(ingress, Request(scope, receive)))


def test_a_full_queue_is_a_429_and_no_replica_a_503_in_openais_shape():
    from ray.serve._private.common import DeploymentID
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    # Both were a 500 "internal server error": Serve's exceptions are no RayError.
    full = _forward_failing_with(BackPressureError(num_queued_requests=5, max_queued_requests=5))
    assert full.status_code == 429 and full.headers["retry-after"] == "1"
    assert full.headers["access-control-allow-origin"] == "*"
    assert json.loads(full.body)["error"]["code"] == "too_many_waiting_requests"
    gone = _forward_failing_with(DeploymentUnavailableError(DeploymentID("engine", "tokenmill")))
    assert gone.status_code == 503 and json.loads(gone.body)["error"]["type"] == "server_error"


def test_a_browser_preflight_without_the_key_reaches_a_replica_whose_cors_answers_it():
    from tokenmill.scale.deployment import Ingress

    forwarded = []

    class Stream:
        async def __anext__(self):
            return {"status": 200, "headers": [(b"access-control-allow-origin", b"*")]}

    def remote(key, scope, body):
        forwarded.append(scope["method"])
        return Stream()

    engine = SimpleNamespace(options=lambda **_: SimpleNamespace(forward=SimpleNamespace(remote=remote)))

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": "OPTIONS", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "headers": [(b"origin", b"http://ui.example"),
                                               (b"access-control-request-method", b"POST")],
             "http_version": "1.1", "scheme": "http", "server": ("t", 80), "client": ("t", 1), "root_path": ""}
    ingress = SimpleNamespace(check_key=require_api_key("s3cret"), engine=engine, _key=lambda path, body: None)
    response = asyncio.run(Ingress.forward(ingress, Request(scope, receive)))  # was a 401 raised here
    assert forwarded == ["OPTIONS"] and response.status_code == 200


def test_the_ingress_answers_anthropics_paths_in_anthropics_error_shape():
    # Its own 401, 429 and 503 on /v1/messages came in OpenAI's, where Claude Code looks for rate_limit_error.
    from fastapi.testclient import TestClient

    from tokenmill.scale.deployment import ingress_app
    from tokenmill.server.errors import APIError

    async def busy() -> None:
        raise APIError(429, "too many requests are waiting", type="rate_limit_error")

    ingress_app.add_api_route("/v1/messages/test-busy", busy)
    routes = ingress_app.router.routes
    routes.insert(0, routes.pop())  # before the catch-all that forwards to a replica
    try:
        answer = TestClient(ingress_app).get("/v1/messages/test-busy")
    finally:
        routes.pop(0)
    assert answer.status_code == 429 and answer.json()["type"] == "error"
    assert answer.json()["error"]["type"] == "rate_limit_error"
