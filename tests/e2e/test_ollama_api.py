"""Ollama's API through Ollama's official client: the same answers as /v1, in Ollama's shapes."""

import json

import httpx
import numpy as np
import ollama
import pytest

from tokenmill.loader import catalog

MODEL, EMBEDDER = "smollm2-135m", "all-minilm-l6-v2"
GREEDY = {"temperature": 0, "num_predict": 8}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def served(start_server):
    catalog.pull(EMBEDDER)  # before the server starts, so its start-up timeout does not include the download
    return start_server("--model", MODEL, "--model", EMBEDDER)


@pytest.fixture(scope="module")
def client(served) -> ollama.Client:
    return ollama.Client(host=served.url)


def _v1(served, path: str, body: dict) -> dict:
    return httpx.post(f"{served.url}/v1/{path}", json={"model": MODEL, **body}, timeout=60).json()


def test_a_chat_is_v1s_answer_with_ollamas_counts_and_durations(client, served):
    expected = _v1(served, "chat/completions", {"messages": QUESTION, "max_tokens": 8, "temperature": 0})
    answer = client.chat(model=f"{MODEL}:latest", messages=QUESTION, options=GREEDY)
    assert answer.message.content == expected["choices"][0]["message"]["content"]
    assert answer.model == f"{MODEL}:latest"  # the name as asked, as Ollama echoes it
    assert answer.done and answer.done_reason == expected["choices"][0]["finish_reason"]
    assert (answer.prompt_eval_count, answer.eval_count) == (expected["usage"]["prompt_tokens"],
                                                             expected["usage"]["completion_tokens"])
    cut = client.chat(model=MODEL, messages=QUESTION, options={"temperature": 0, "num_predict": 2})
    assert (cut.done_reason, cut.eval_count) == ("length", 2)
    assert 0 < answer.prompt_eval_duration < answer.total_duration and answer.eval_duration > 0
    streamed = list(client.chat(model=MODEL, messages=QUESTION, options=GREEDY, stream=True))
    assert "".join(part.message.content for part in streamed) == answer.message.content
    assert [part.done for part in streamed] == [False] * (len(streamed) - 1) + [True]


def test_a_stream_is_ndjson_by_default_one_object_a_line(served):
    # Ollama streams unless told not to, and its clients parse every line: a blank one breaks them.
    body = {"model": MODEL, "messages": QUESTION, "options": GREEDY}
    with httpx.stream("POST", f"{served.url}/api/chat", content=json.dumps(body), timeout=60) as answer:
        assert answer.headers["content-type"].startswith("application/x-ndjson")
        lines = list(answer.iter_lines())
    objects = [json.loads(line) for line in lines]  # each line whole JSON, none blank
    assert objects[-1]["done"] and objects[-1]["usage"]["cost"] > 0  # tokenmill's cost beside Ollama's counts
    assert objects[0]["created_at"].endswith("Z") and len(objects[0]["created_at"]) == 30


def test_a_replayed_tool_call_and_its_result_render_as_chat_renders_them(client, served):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    ours = [*QUESTION, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "Sunny", "tool_name": "get_weather"}]
    openai = [*QUESTION, {"role": "assistant", "content": "", "tool_calls": [
        {"id": None, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": "Sunny", "name": "get_weather"}]
    counted = httpx.post(f"{served.url}/tokenize", json={"model": MODEL, "messages": openai, "tools": tools}).json()
    answer = client.chat(model=MODEL, messages=ours, tools=tools, options={"num_predict": 1})
    assert answer.prompt_eval_count == counted["count"]


def test_a_format_schema_holds_the_answer(client):
    schema = {"type": "object", "properties": {"capital": {"type": "string"}}, "required": ["capital"]}
    answer = client.chat(model=MODEL, messages=QUESTION, format=schema, options={"temperature": 0,
                                                                                 "num_predict": 30})
    assert isinstance(json.loads(answer.message.content)["capital"], str)


def test_generate_is_a_one_turn_chat_and_raw_a_plain_completion(client, served):
    chat = client.chat(model=MODEL, messages=QUESTION, options=GREEDY)
    templated = client.generate(model=MODEL, prompt=QUESTION[0]["content"], options=GREEDY)
    assert templated.response == chat.message.content and templated.done
    plain = _v1(served, "completions", {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0})
    raw = client.generate(model=MODEL, prompt="The capital of France is", raw=True, options=GREEDY)
    assert raw.response == plain["choices"][0]["text"] and raw.eval_count == 8
    loaded = client.generate(model=MODEL, prompt="")  # how Ollama's clients load a model
    assert loaded.done and loaded.done_reason == "load"
    # And unload it (Open WebUI's "unload"): models stay loaded here, but the answer says what was asked.
    assert client.generate(model=MODEL, prompt="", keep_alive=0).done_reason == "unload"


def test_embed_gives_v1s_vectors(client, served):
    expected = httpx.post(f"{served.url}/v1/embeddings", json={"model": EMBEDDER, "input": ["a cat", "a dog"]},
                          timeout=60).json()["data"]
    answer = client.embed(model=EMBEDDER, input=["a cat", "a dog"])
    assert np.allclose(answer.embeddings, [d["embedding"] for d in expected], atol=1e-5)
    assert answer.prompt_eval_count > 0
    legacy = client.embeddings(model=EMBEDDER, prompt="a cat")
    assert np.allclose(legacy.embedding, expected[0]["embedding"], atol=1e-5)
    # As /v1/embeddings' dimensions: it was ignored, 384 numbers where 128 were asked for.
    short = client.embed(model=EMBEDDER, input=["a cat"], dimensions=128).embeddings[0]
    assert len(short) == 128 and np.isclose(np.linalg.norm(short), 1.0, atol=1e-5)


def test_the_model_listings_clients_read_first(client, served):
    names = {m.model for m in client.list().models}
    assert names == {f"{MODEL}:latest", f"{EMBEDDER}:latest"}
    assert {m.model for m in client.ps().models} == names
    shown = client.show(MODEL)
    assert "<|im_start|>" in shown.template and "num_ctx 8192" in shown.parameters
    assert shown.modelinfo["llama.context_length"] == 8192 and "completion" in shown.capabilities
    version = httpx.get(f"{served.url}/api/version").json()["version"]
    assert tuple(int(part) for part in version.split(".")) >= (0, 6, 4)  # what Copilot and Open WebUI compare
    assert httpx.head(f"{served.url}/").status_code == 200  # Enchanted's check that a server is there


def test_num_predict_is_a_cap_the_context_may_cut_short(start_server):
    # As Ollama's: past the context it was a 400 naming max_tokens, for every long prompt of a client with a
    # max-tokens setting.
    short = ollama.Client(host=start_server("--max-model-len", "64").url)
    answer = short.generate(model=MODEL, prompt="word " * 50, raw=True, options={"num_predict": 100,
                                                                               "temperature": 0})
    assert answer.done_reason == "length" and answer.prompt_eval_count + answer.eval_count == 64


@pytest.mark.parametrize("call, status", [
    (lambda c: c.chat(model="gpt-9", messages=QUESTION), 404),  # Ollama's clients pull on a 404
    (lambda c: c.chat(model="gpt-9", messages=[]), 404),  # loading a model checks it is there
    (lambda c: c.generate(model="gpt-9", prompt=""), 404),
    (lambda c: c.chat(model=MODEL, messages=[{**QUESTION[0], "images": ["AAAA"]}]), 400),
    (lambda c: c.chat(model=MODEL, messages=QUESTION, options={"mirostat": 2}), 400),
    (lambda c: c.chat(model=MODEL, messages=QUESTION, think="extreme"), 400),  # not a level: it passed unchecked
    # Ollama's "does not support thinking": SmolLM2's template has no thinking, and no parser is on (it was ignored).
    (lambda c: c.chat(model=MODEL, messages=QUESTION, think=True), 400),
    (lambda c: c.generate(model=MODEL, prompt="Hi", think="high"), 400),
    (lambda c: c.generate(model=MODEL, prompt="Hi", raw=True, think=True), 400),
    (lambda c: c.generate(model=MODEL, prompt="def f(", suffix="return 1"), 400),
    (lambda c: c.chat(model=EMBEDDER, messages=QUESTION), 400),
    # As Ollama: raw leaves the system prompt out, so one beside it is refused (it was dropped without a word).
    (lambda c: c.generate(model=MODEL, prompt="Hi", raw=True, system="Be brief."), 400),
    # One embedding per input or none: an empty one was dropped and every vector after it moved up a place.
    (lambda c: c.embed(model=EMBEDDER, input=["a", "", "b"]), 400),
])
def test_what_this_server_cannot_do_is_ollamas_error(client, call, status):
    with pytest.raises(ollama.ResponseError) as refused:
        call(client)
    assert refused.value.status_code == status and refused.value.error  # {"error": "..."}, a message


def test_null_means_the_default_as_in_ollama(served):
    # stream null was a 400; as Ollama reads it, it is unset: a streamed answer.
    body = {"model": MODEL, "messages": QUESTION, "options": GREEDY, "stream": None}
    lines = httpx.post(f"{served.url}/api/chat", json=body, timeout=60).text.splitlines()
    assert len(lines) > 1 and json.loads(lines[-1])["done"]
    loaded = httpx.post(f"{served.url}/api/chat", json={"model": MODEL, "messages": None}, timeout=60).json()
    assert loaded["done_reason"] == "load"


def test_the_durations_are_the_engines_own(served):
    # The prompt's up to the first token, the output's after it: from the engine's clock, also where a tool call's
    # text was held back (the clock started at the first text shown, so nearly all of it counted as the prompt's).
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    for stream in (False, True):
        body = {"model": MODEL, "messages": QUESTION, "tools": tools, "options": GREEDY, "stream": stream}
        answer = json.loads(httpx.post(f"{served.url}/api/chat", json=body, timeout=60).text.splitlines()[-1])
        latency = answer["usage"]["latency"]
        assert answer["prompt_eval_duration"] == int(latency["time_to_first_token_seconds"] * 1e9)
        assert answer["total_duration"] == int(latency["end_to_end_seconds"] * 1e9) > answer["prompt_eval_duration"]
        assert answer["eval_duration"] > 0


def test_a_final_assistant_turn_is_a_prefill_continued(client, served):
    # Ollama's templates leave it open; it was closed and a new reply began after it.
    steered = [*QUESTION, {"role": "assistant", "content": "The capital of France is"}]
    answer = client.chat(model=MODEL, messages=steered, options=GREEDY)
    continued = _v1(served, "chat/completions", {"messages": steered, "continue_final_message": True,
                                                 "add_generation_prompt": False, "temperature": 0, "max_tokens": 8})
    assert answer.message.content == continued["choices"][0]["message"]["content"]
    assert answer.prompt_eval_count == continued["usage"]["prompt_tokens"]
    assert "thinking" not in client.show(MODEL).capabilities


def test_any_negative_num_predict_is_no_limit(client):
    # Ollama reads every negative as no limit; -3 was a 400 naming max_tokens.
    answer = client.generate(model=MODEL, prompt="Say hi.", options={"num_predict": -3, "temperature": 0})
    assert answer.done and answer.eval_count > 0


def test_a_chat_past_the_context_drops_its_oldest_turns(start_server):
    # As Ollama truncates (system turns and the last kept); it was a 400 for every long conversation. Cut before a
    # user turn (templates that want roles to alternate refuse another start), leaving room for num_predict.
    short = start_server("--max-model-len", "105")
    system = {"role": "system", "content": "Be brief."}
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"Message number {i} is about the sea."}
             for i in range(9)]
    body = {"model": MODEL, "messages": [system, *turns], "stream": False,
            "options": {"num_predict": 8, "temperature": 0}}
    answer = httpx.post(f"{short.url}/api/chat", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    counted = answer.json()["prompt_eval_count"]
    fitting = [k for k in range(1, 10, 2) if httpx.post(f"{short.url}/tokenize", json={
        "messages": [system, *turns[-k:]]}, timeout=60).json()["count"] + 8 <= 105]
    expected = httpx.post(f"{short.url}/tokenize", json={"messages": [system, *turns[-max(fitting):]]},
                          timeout=60).json()["count"]
    assert counted == expected and counted + 8 <= 105 and max(fitting) < 9
    refused = httpx.post(f"{short.url}/api/chat", json={**body, "truncate": False}, timeout=60)
    assert refused.status_code == 400 and "maximum context length is 105" in refused.json()["error"]


@pytest.mark.parametrize("path, field", [("chat", "messages"), ("generate", "prompt")])
def test_logprobs_come_as_ollamas_list_whole_and_streamed(served, path, field):
    # They were dropped as unknown fields: no logprobs in the answer.
    body = {"model": MODEL, field: QUESTION if field == "messages" else "Name a colour.", "options": GREEDY,
            "logprobs": True, "top_logprobs": 2}
    whole = httpx.post(f"{served.url}/api/{path}", json={**body, "stream": False}, timeout=60).json()
    entries = whole["logprobs"]
    assert len(entries) == whole["eval_count"] and all(len(e["top_logprobs"]) == 2 for e in entries)
    text = whole["message"]["content"] if path == "chat" else whole["response"]
    assert b"".join(bytes(e["bytes"]) for e in entries).decode().startswith(text)  # and the end token, counted
    streamed = httpx.post(f"{served.url}/api/{path}", json=body, timeout=60).text
    lines = [json.loads(line) for line in streamed.splitlines()]
    assert [e for line in lines for e in line.get("logprobs", [])] == entries
    refused = httpx.post(f"{served.url}/api/{path}", json={**body, "top_logprobs": 21, "stream": False}, timeout=60)
    assert refused.status_code == 400 and "top_logprobs" in refused.json()["error"]


def test_repeat_last_n_0_turns_the_penalties_off(client):
    # Open WebUI and SillyTavern forward repeat_last_n: it was dropped, and repeat_penalty hit every prompt token.
    prompt, options = "1, 2, 3, 1, 2, 3, 1, 2,", {"temperature": 0, "num_predict": 6}

    def answer(**extra) -> str:
        return client.generate(model=MODEL, prompt=prompt, raw=True, options={**options, **extra}).response

    plain = answer()
    assert answer(repeat_penalty=3.0, repeat_last_n=-1) != plain
    assert answer(repeat_penalty=3.0, repeat_last_n=0) == plain


def test_repeat_last_n_0_sets_the_penalties_off_over_the_models_defaults_and_null_is_unset():
    # Dropped, the penalty came back from the model's defaults, over the whole context; null was a 400.
    from tokenmill.server.ollama_protocol import OllamaChatRequest

    def params(**options):
        body = OllamaChatRequest(model=MODEL, messages=QUESTION, options=options)
        return body.chat_request().sampling_params({"repetition_penalty": 1.3})

    off = params(repeat_last_n=0, repeat_penalty=1.5, presence_penalty=0.5)
    assert (off.repetition_penalty, off.presence_penalty, off.repetition_window) == (1.0, 0.0, None)
    unset = params(repeat_last_n=None)
    assert (unset.repetition_penalty, unset.repetition_window) == (1.3, 64)
