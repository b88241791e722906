"""Fuzzed and hostile requests get a 4xx in OpenAI's error shape, never a 5xx; the server keeps serving, leaks nothing."""

import asyncio
import json

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

from tokenmill.bench.soak import settle

MODEL = "smollm2-135m"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "hi"}]
# A request still generating after this is cut off (the server aborts it); only the answer's status is checked.
TIMEOUT_S = 3.0
# NOTE: the fuzz keeps the work each valid request asks for small, so its examples explore the schema instead of
# waiting on the model; HOSTILE below sends the enormous values.
WORK_CAPS = {"max_tokens": 4, "max_completion_tokens": 4, "n": 2}


def _assert_well_answered(status: int, text: str, what: str, path: str = "") -> None:
    """Under 500, and an error in the shape of the API the path belongs to: Anthropic's, Ollama's, or OpenAI's."""
    assert status < 500, f"{what} -> {status}: {text[:500]}"
    if status < 400:
        return
    body = json.loads(text)
    if path.startswith("/v1/messages"):
        assert body["type"] == "error" and set(body["error"]) >= {"type", "message"}, f"{what} -> {text[:500]}"
        message = body["error"]["message"]
    elif path.startswith("/api/"):
        message = body["error"]
    else:
        assert set(body["error"]) == {"message", "type", "param", "code"}, f"{what} -> {text[:500]}"
        message = body["error"]["message"]
    assert isinstance(message, str) and message, f"{what} -> {text[:500]}"


# Examples per operation and mode: the generating endpoints get the most, the read-only ones a few.
EXAMPLES = {"/v1/completions": 25, "/v1/chat/completions": 25, "/v1/embeddings": 10}


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_endpoint_from_the_openapi_schema_answers_fuzz_without_5xx(small_server, mode):
    schema = schemathesis.openapi.from_url(f"{small_server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {COMPLETIONS, CHAT, "/v1/models", "/health"}
    if mode == GenerationMode.NEGATIVE:  # only a body can be wrong: the GETs take no input, or any string
        operations = [op for op in operations if op.get_request_payload_content_types()]
        assert {op.path for op in operations} >= {COMPLETIONS, CHAT}
    for operation in operations:
        @settings(max_examples=EXAMPLES.get(operation.path, 4), deadline=None, database=None, derandomize=True,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case) -> None:
            if isinstance(case.body, dict):
                for key, cap in WORK_CAPS.items():
                    if isinstance(case.body.get(key), int) and case.body[key] > cap:
                        case.body[key] = cap
            try:
                response = case.call(base_url=small_server.url, timeout=TIMEOUT_S)
            except requests.Timeout:
                return  # a valid request still generating; the disconnect aborts it
            _assert_well_answered(response.status_code, response.text, case.as_curl_command(), operation.path)

        fuzz()


NESTED_SCHEMA: dict = {"type": "string"}
for _ in range(900):
    NESTED_SCHEMA = {"type": "array", "items": NESTED_SCHEMA}

HOSTILE = [
    # Huge, negative, non-finite and wrongly typed numbers.
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 10**30}),
    (CHAT, {"messages": MESSAGES, "max_completion_tokens": 10**30}),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": -1}),
    (COMPLETIONS, {"prompt": "hi", "top_k": 10**30}),  # was 500: int64 overflow in the sampler failed the batch
    (CHAT, {"messages": MESSAGES, "top_k": 10**12}),
    (COMPLETIONS, {"prompt": "hi", "seed": 10**30}),
    (COMPLETIONS, {"prompt": "hi", "priority": -(10**100)}),
    (COMPLETIONS, {"prompt": "hi", "min_tokens": 10**30}),
    (COMPLETIONS, {"prompt": "hi", "n": 10**30}),
    (CHAT, {"messages": MESSAGES, "logprobs": True, "top_logprobs": 10**30}),
    (COMPLETIONS, {"prompt": "hi", "logprobs": 10**6}),
    (COMPLETIONS, {"prompt": "hi", "temperature": float("nan")}),
    (COMPLETIONS, {"prompt": "hi", "temperature": float("inf")}),  # was accepted: every probability NaN
    (CHAT, {"messages": MESSAGES, "repetition_penalty": float("inf")}),
    (CHAT, {"messages": MESSAGES, "top_p": float("nan")}),
    (CHAT, {"messages": MESSAGES, "presence_penalty": float("-inf")}),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 1.5}),
    (CHAT, {"messages": MESSAGES, "stream_options": {"include_usage": "maybe"}, "stream": True}),
    # Token ids outside the vocabulary or past 64 bits.
    (COMPLETIONS, {"prompt": [49152]}),
    (COMPLETIONS, {"prompt": [-1]}),
    (COMPLETIONS, {"prompt": [1, 2**64]}),
    (COMPLETIONS, {"prompt": ["x", [1, 10**20]]}),
    (CHAT, {"messages": MESSAGES, "stop_token_ids": [10**30]}),
    # Empty and malformed messages and prompts.
    (COMPLETIONS, {"prompt": ""}),
    (COMPLETIONS, {"prompt": [[]]}),
    (CHAT, {"messages": []}),
    (CHAT, {"messages": [{}]}),
    (CHAT, {"messages": [{"role": "user", "content": {"nested": ["object"]}}]}),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
    (CHAT, {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": 5}}]}]}),
    # Text that is not Unicode: lone surrogates, escaped in otherwise valid JSON. All were 500 from the tokenizer.
    (COMPLETIONS, {"prompt": "\ud800"}),
    (CHAT, {"messages": [{"role": "user", "content": "\udfff"}]}),
    (CHAT, {"messages": MESSAGES, "stop": ["\ud800"]}),
    # Deep nesting: 900 levels of schema overflowed Python's stack in the structured-output compiler (500).
    (COMPLETIONS, {"prompt": "hi", "guided_json": NESTED_SCHEMA}),
    (COMPLETIONS, {"prompt": "hi", "guided_json": json.dumps(NESTED_SCHEMA)}),
    (COMPLETIONS, {"prompt": "hi", "guided_json": "[" * 5000 + "]" * 5000}),  # was 500: RecursionError in json
    (CHAT, {"messages": MESSAGES, "response_format": {"type": "json_schema", "json_schema": {"schema": NESTED_SCHEMA}}}),
    # Constraints that cannot compile or cannot be met.
    (COMPLETIONS, {"prompt": "hi", "guided_regex": "("}),
    (COMPLETIONS, {"prompt": "hi", "guided_grammar": "root ::= ("}),
    (CHAT, {"messages": MESSAGES, "guided_choice": []}),
    (CHAT, {"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}),
]


@pytest.mark.parametrize("path, body", HOSTILE, ids=lambda v: v if isinstance(v, str) else json.dumps(v)[:60])
def test_hostile_request_gets_a_4xx_in_openai_shape(small_server, path, body):
    body = {"model": MODEL, "max_tokens": 4, **body}
    # allow_nan: Python's json writes NaN and Infinity, which JSON lacks but many clients send anyway.
    content = json.dumps(body, allow_nan=True).encode()
    response = httpx.post(small_server.url + path, content=content, headers={"content-type": "application/json"},
                          timeout=60)
    _assert_well_answered(response.status_code, response.text, f"{path} {content[:200]!r}")
    assert response.status_code >= 400 or path != COMPLETIONS or "choices" in response.json()


RAW_BODIES = [
    b'{"prompt": "\xff\xfe", "max_tokens": 2}',  # invalid UTF-8
    b"\xff\xff\xff",
    b"[" * 100_000 + b"]" * 100_000,  # nesting past any parser's limit
    b'{"a":' * 3000 + b"1" + b"}" * 3000,
    b'{"prompt": "a", "max_tokens": 1e999}',  # parses to infinity
    b'{"prompt": "a", "temperature": NaN}',
    b"",
    b"null",
    b'"a string"',
    b'{"prompt": "a"',
]


# llama.cpp's, Ollama's and Anthropic's paths too, each answering in its own error shape.
@pytest.mark.parametrize("path", [COMPLETIONS, CHAT, "/completion", "/api/chat", "/api/generate", "/v1/messages"])
def test_bodies_that_are_not_json_objects_get_a_400(small_server, path):
    for content in RAW_BODIES:
        response = httpx.post(small_server.url + path, content=content, headers={"content-type": "application/json"},
                              timeout=60)
        _assert_well_answered(response.status_code, response.text, f"{path} {content[:60]!r}", path)
        # max_tokens is no field of llama.cpp's: there that body is a plain prompt, answered.
        assert response.status_code == 400 or (path == "/completion" and b"max_tokens" in content)


def test_after_the_fuzz_the_server_answers_and_the_kv_pool_is_empty(small_server):
    response = httpx.post(small_server.url + COMPLETIONS, json={"model": MODEL, "prompt": "Hello", "max_tokens": 3},
                          timeout=60)
    assert response.status_code == 200 and response.json()["choices"][0]["text"]
    assert httpx.get(f"{small_server.url}/health").status_code == 200
    # Requests the fuzz cut off by client timeout are aborted; give them a moment, then nothing may hold a block.
    assert settle(small_server.url, MODEL) == {"unfinished": 0, "kv_usage": 0.0}
    assert small_server.process.poll() is None


def test_a_bug_answers_500_in_openai_shape_without_escaping_to_the_server():
    from fastapi import FastAPI

    from tokenmill.server.errors import install_handlers

    app = FastAPI()
    install_handlers(app)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    async def call() -> httpx.Response:
        # raise_app_exceptions: an exception that leaves the app would raise here, as it reaches uvicorn there.
        transport = httpx.ASGITransport(app, raise_app_exceptions=True)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/boom")

    response = asyncio.run(call())
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error" and "a bug" not in response.text
