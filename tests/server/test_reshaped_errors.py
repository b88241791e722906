"""Errors on Anthropic's and Ollama's paths in their shapes, whatever answered them; other paths untouched."""

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient

from tokenmill.server.errors import APIError, install_handlers, reshape_errors


def _client() -> TestClient:
    app = FastAPI()
    install_handlers(app)
    reshape_errors(app)

    @app.get("/v1/messages/{status}")
    @app.get("/api/chat/{status}")
    @app.get("/v1/chat/{status}")
    async def fail(status: int) -> None:
        raise APIError(status, f"failed with {status}", param="max_tokens" if status == 400 else None)

    @app.get("/v1/messages-stream")
    async def stream() -> StreamingResponse:
        return StreamingResponse(iter([b"event: a\n\n", b"event: b\n\n"]), media_type="text/event-stream")

    return TestClient(app)


def test_each_status_gets_anthropics_error_type():
    client = _client()
    for status, kind in [(400, "invalid_request_error"), (401, "authentication_error"), (404, "not_found_error"),
                         (413, "request_too_large"), (429, "rate_limit_error"), (500, "api_error"),
                         (503, "overloaded_error"), (422, "invalid_request_error")]:
        answer = client.get(f"/v1/messages/{status}")
        assert answer.status_code == status
        assert answer.json()["type"] == "error" and answer.json()["error"]["type"] == kind, status
        assert answer.json()["error"]["message"] == f"failed with {status}"
        assert int(answer.headers["content-length"]) == len(answer.content)
    assert client.get("/v1/messages/400").json()["error"]["param"] == "max_tokens"


def test_other_paths_and_answers_that_are_no_error_pass_as_they_are():
    client = _client()
    assert client.get("/v1/chat/429").json()["error"]["type"] == "invalid_request_error"  # OpenAI's, as set
    assert client.get("/v1/messages-stream").text == "event: a\n\nevent: b\n\n"


def test_ollamas_paths_answer_the_message_alone():
    # Ollama's clients raise ResponseError(body["error"]): OpenAI's object there read as a dict's repr.
    answer = _client().get("/api/chat/404")
    assert answer.status_code == 404 and answer.json() == {"error": "failed with 404"}
