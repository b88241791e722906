"""vLLM's request fields beyond OpenAI's: each answered as vLLM answers it, or refused by name, never ignored."""

import json

import httpx
import pytest
from openai import BadRequestError, OpenAI

CHAT = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _events(server, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{server.url}{path}", json={**body, "stream": True}, timeout=60) as response:
        return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]


@pytest.mark.parametrize("prompt, echoed", [
    # Decoded from its ids without special tokens, the echo was "user\nHi".
    ("<|im_start|>user\nHi<|im_end|>", "<|im_start|>user\nHi<|im_end|>"),
    ([1, 9690, 198], "<|im_start|>system\n"),  # token ids read back with their special tokens, as vLLM
])
def test_echo_gives_back_the_prompt_as_sent(client, prompt, echoed):
    out = client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=0, echo=True)
    assert out.choices[0].text == echoed
    several = client.completions.create(model="smollm2-135m", prompt=["a <|im_end|>", "b"], max_tokens=1, echo=True)
    assert [c.text[:len("a <|im_end|>")] for c in several.choices][0] == "a <|im_end|>"
    assert several.choices[1].text.startswith("b")


@pytest.mark.parametrize("path, body", [("/v1/completions", {"prompt": "Hi"}), ("/v1/chat/completions",
                                                                                 {"messages": CHAT})])
def test_continuous_usage_stats_alone_asks_for_the_usage_as_in_vllm(server, path, body):
    # vLLM's include_usage defaults to true: the flag alone got no usage at all.
    chunks = _events(server, path, {**body, "max_tokens": 2, "stream_options": {"continuous_usage_stats": True}})
    assert all(c.get("usage") for c in chunks) and chunks[-1]["choices"] == []
    plain = _events(server, path, {**body, "max_tokens": 2, "stream_options": {}})
    assert all("usage" not in c for c in plain)  # OpenAI's default stays: no usage unless asked


def test_return_token_ids_gives_the_ids_beside_the_text(client, server):
    chat = client.chat.completions.create(model="smollm2-135m", messages=CHAT, max_tokens=3, temperature=0,
                                          extra_body={"return_token_ids": True}).model_dump()
    tokenized = httpx.post(f"{server.url}/tokenize", json={"messages": CHAT}).json()["tokens"]
    assert chat["prompt_token_ids"] == tokenized and len(chat["choices"][0]["token_ids"]) == 3
    streamed = _events(server, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 3, "temperature": 0,
                                                        "return_token_ids": True})
    assert streamed[0]["prompt_token_ids"] == tokenized
    assert [t for c in streamed[1:] for choice in c["choices"] for t in choice["token_ids"]] == \
        chat["choices"][0]["token_ids"]
    done = client.completions.create(model="smollm2-135m", prompt="Hi", max_tokens=3, temperature=0,
                                     extra_body={"return_token_ids": True}).model_dump()
    hi = httpx.post(f"{server.url}/tokenize", json={"prompt": "Hi"}).json()["tokens"]
    assert done["choices"][0]["prompt_token_ids"] == hi and len(done["choices"][0]["token_ids"]) == 3
    pieces = _events(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 3, "temperature": 0,
                                                 "return_token_ids": True})
    assert pieces[0]["choices"][0]["prompt_token_ids"] == hi
    assert all(c["choices"][0]["prompt_token_ids"] is None for c in pieces[1:])
    assert [t for c in pieces for t in c["choices"][0]["token_ids"]] == done["choices"][0]["token_ids"]
    # With tools the text goes through the call parser, which holds some back: the ids come all the same.
    tools = {"messages": CHAT, "max_tokens": 12, "temperature": 0, "return_token_ids": True, "tool_choice": "required",
             "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}
    whole = httpx.post(f"{server.url}/v1/chat/completions", json=tools, timeout=60).json()["choices"][0]["token_ids"]
    parsed = _events(server, "/v1/chat/completions", tools)
    assert [t for c in parsed[1:] for choice in c["choices"] for t in choice["token_ids"]] == whole
    plain = client.completions.create(model="smollm2-135m", prompt="Hi", max_tokens=1).model_dump()
    assert "token_ids" not in plain["choices"][0]


def test_prompt_logprobs_score_each_prompt_token_as_vllm_shows_them(server):
    body = {"model": "smollm2-135m", "prompt": "The capital of France is", "max_tokens": 1, "temperature": 0}
    scored = httpx.post(f"{server.url}/v1/completions", json={**body, "prompt_logprobs": 2}, timeout=60).json()
    echoed = httpx.post(f"{server.url}/v1/completions", json={**body, "echo": True, "logprobs": 2},
                        timeout=60).json()["choices"][0]["logprobs"]
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": body["prompt"]}).json()["tokens"]
    positions = scored["choices"][0]["prompt_logprobs"]
    assert len(positions) == len(ids) and positions[0] is None
    for i, (token_id, position) in enumerate(zip(ids[1:], positions[1:]), 1):
        # The prompt's own token, keyed by its id as vLLM's JSON keys it, then the top alternatives by rank.
        assert next(iter(position)) == str(token_id) and 2 <= len(position) <= 3
        chosen = position[str(token_id)]
        assert chosen["logprob"] == pytest.approx(echoed["token_logprobs"][i], abs=1e-4)
        assert chosen["decoded_token"] == echoed["tokens"][i] and chosen["rank"] >= 1
    chat = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
        "model": "smollm2-135m", "messages": CHAT, "max_tokens": 1, "prompt_logprobs": 0}).json()
    chat_ids = httpx.post(f"{server.url}/tokenize", json={"messages": CHAT}).json()["tokens"]
    assert len(chat["prompt_logprobs"]) == len(chat_ids)  # top level in chat, as vLLM's
    assert all(list(p) == [str(t)] for p, t in zip(chat["prompt_logprobs"][1:], chat_ids[1:]))
    plain = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
    assert "prompt_logprobs" not in plain["choices"][0]


@pytest.mark.parametrize("path, extra, param", [
    ("completions", {"truncation_side": "right", "truncate_prompt_tokens": 1}, "truncation_side"),
    ("completions", {"logprob_token_ids": [28], "logprobs": 1}, "logprob_token_ids"),
    ("chat", {"thinking_token_budget": 10}, "thinking_token_budget"),
    ("chat", {"add_special_tokens": True}, "add_special_tokens"),
    ("chat", {"structured_outputs": {"json_object": True, "whitespace_pattern": " *"}},
     "structured_outputs.whitespace_pattern"),
])
def test_fields_that_would_change_the_answer_are_refused_not_ignored(client, path, extra, param):
    with pytest.raises(BadRequestError) as refused:
        if path == "chat":
            client.chat.completions.create(model="smollm2-135m", messages=CHAT, max_tokens=1, extra_body=extra)
        else:
            client.completions.create(model="smollm2-135m", prompt="Hello there", max_tokens=1, extra_body=extra)
    assert refused.value.body["param"] == param
    # Their no-op values pass.
    ok = client.completions.create(model="smollm2-135m", prompt="Hi", max_tokens=1,
                                   extra_body={"truncation_side": "left", "add_special_tokens": False})
    assert ok.usage.prompt_tokens == 1
