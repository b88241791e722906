"""The API-key check on the header as Starlette hands it over (bytes decoded as Latin-1)."""

from starlette.datastructures import Headers

from tokenmill.server.auth import admitted


def _header(text: str, name: str = "authorization") -> Headers:
    """A header a client sent as UTF-8, as the server reads it."""
    return Headers(raw=[(name.encode(), text.encode("utf-8"))])


def test_a_key_of_other_letters_sent_as_utf8_is_admitted_and_its_latin1_spelling_is_not():
    # The key's UTF-8 bytes were refused and the Latin-1 spelling (other bytes) admitted.
    assert admitted(_header("Bearer clé"), "clé")
    assert not admitted(Headers(raw=[(b"authorization", "Bearer clé".encode("latin-1"))]), "clé")


def test_the_scheme_is_case_blind_and_the_key_exact():
    assert admitted(_header("bearer s3cret"), "s3cret") and admitted(_header("Bearer  s3cret"), "s3cret")
    assert not admitted(_header("Bearer s3cret2"), "s3cret") and not admitted(_header("Basic s3cret"), "s3cret")
    assert admitted(Headers(), None) and not admitted(Headers(), "s3cret")


def test_anthropics_x_api_key_header_carries_the_key_too():
    # Anthropic's clients (Claude Code) send the key so: /v1/messages was a 401 for them whatever the key.
    assert admitted(_header("s3cret", "x-api-key"), "s3cret")
    assert not admitted(_header("wrong", "x-api-key"), "s3cret")


def _app_client(**config):
    """The whole app over a stub engine, without its lifespan: the engine threads never start."""
    from unittest.mock import MagicMock

    from fastapi.testclient import TestClient

    from tokenmill.config import ServerConfig
    from tokenmill.server.app import build_app

    return TestClient(build_app({"m": MagicMock(max_model_len=64)}, ServerConfig(**config)))


def test_a_browser_page_on_another_origin_may_call_the_api_with_the_key_as_vllm_allows():
    # No CORS at all: a web UI on another origin (allowed by vLLM and llama.cpp by default) got its preflight
    # refused with a 401 and no Access-Control-Allow-Origin.
    client = _app_client(api_key="s3cret")
    origin = {"Origin": "http://localhost:3000"}
    preflight = client.options("/v1/chat/completions", headers={
        **origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == "*"
    models = client.get("/v1/models", headers={**origin, "Authorization": "Bearer s3cret"})
    assert models.status_code == 200 and models.headers["access-control-allow-origin"] == "*"
    refused = client.get("/v1/models", headers=origin)  # the page can read why
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == "*"


def test_allowed_origins_limit_which_pages_may_call_the_api():
    client = _app_client(allowed_origins=("https://ui.example",))
    assert client.get("/v1/models", headers={"Origin": "https://ui.example"}).headers[
        "access-control-allow-origin"] == "https://ui.example"
    other = client.get("/v1/models", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    preflight = client.options("/v1/models", headers={"Origin": "https://evil.example",
                                                      "Access-Control-Request-Method": "GET"})
    assert preflight.status_code == 400


def test_tokenize_and_detokenize_need_the_key_as_v1_does():
    client = _app_client(api_key="s3cret")
    for path, body in (("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1]}),
                       ("/completion", {"prompt": "hi"}), ("/completions", {"prompt": "hi"}),
                       ("/apply-template", {"messages": [{"role": "user", "content": "hi"}]}),
                       ("/api/chat", {"model": "m", "messages": []})):
        refused = client.post(path, json=body)
        assert refused.status_code == 401
        assert refused.json()["error"] if path.startswith("/api/") else \
            refused.json()["error"]["code"] == "invalid_api_key"  # Ollama's shape: the message alone
        # Before the body is read, as on /v1: a malformed body without the key was a 400 about the body.
        assert client.post(path, content=b"{not json", headers={"content-type": "application/json"}).status_code == 401
