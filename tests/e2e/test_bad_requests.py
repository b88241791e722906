"""Bad input gets the right 4xx in OpenAI's error shape, and the server keeps serving."""

import httpx
import pytest

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "hi"}]


def _assert_error(response: httpx.Response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    for word in words:
        assert word in error["message"]
    return error


@pytest.mark.parametrize(
    "path, body, param",
    [
        (COMPLETIONS, {"max_tokens": 4}, "prompt"),  # missing field
        (CHAT, {"max_tokens": 4}, "messages"),
        (CHAT, {"messages": []}, "messages"),
        (COMPLETIONS, {"prompt": "hi", "max_tokens": "ten"}, "max_tokens"),  # wrong type
        (COMPLETIONS, {"prompt": 42}, "prompt"),
        (CHAT, {"messages": "hi"}, "messages"),
        (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        (COMPLETIONS, {"prompt": "hi", "max_tokens": -1}, "max_tokens"),  # out of range
        (COMPLETIONS, {"prompt": "hi", "temperature": -0.5}, "temperature"),
        (CHAT, {"messages": MESSAGES, "top_p": 0}, "top_p"),
        (CHAT, {"messages": MESSAGES, "top_p": 1.5}, "top_p"),
        (COMPLETIONS, {"prompt": "hi", "n": 0}, "n"),
        (CHAT, {"messages": MESSAGES, "max_completion_tokens": 0}, "max_completion_tokens"),
        (CHAT, {"messages": MESSAGES, "top_logprobs": 3}, "top_logprobs"),
        (COMPLETIONS, {"prompt": "hi", "logprobs": 21}, "logprobs"),
        (COMPLETIONS, {"prompt": []}, "prompt"),
        (COMPLETIONS, {"prompt": [-5, 3]}, "prompt"),
        (COMPLETIONS, {"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
        (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages"),
        (CHAT, {"messages": MESSAGES, "n": 129}, "n"),
        (CHAT, {"messages": MESSAGES, "logit_bias": {"99999999": 5}}, "logit_bias"),  # past the vocabulary
        (CHAT, {"messages": MESSAGES, "logit_bias": {"hello": 5}}, "logit_bias"),
        (COMPLETIONS, {"prompt": "hi", "logit_bias": {"\u00b2": 5}}, "logit_bias"),  # a digit int() refuses: was a 500
        (COMPLETIONS, {"prompt": "hi", "logit_bias": {"--5": 5}}, "logit_bias"),
        (COMPLETIONS, {"prompt": "hi", "logit_bias": {"1" * 5000: 5}}, "logit_bias"),  # past int()'s digits
        (COMPLETIONS, {"prompt": "hi", "best_of": 3}, "best_of"),
        # Fields that were ignored though they change the answer: the model never saw these functions, and a
        # client asking for special tokens' text or a truncated prompt got neither.
        (CHAT, {"messages": MESSAGES, "functions": [{"name": "get_weather"}], "function_call": {"name": "x"}},
         "functions"),
        (COMPLETIONS, {"prompt": "hi", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        (COMPLETIONS, {"prompt": "hi", "truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
        (COMPLETIONS, {"prompt": "hi", "n": 2, "use_beam_search": True}, "use_beam_search"),
        (CHAT, {"messages": MESSAGES, "chat_template": "{{ messages[0].content }}"}, "chat_template"),
        (COMPLETIONS, {"prompt": "hi", "prompt_logprobs": 21}, "prompt_logprobs"),
        (COMPLETIONS, {"prompt": "hi", "prompt_logprobs": 2, "stream": True}, "prompt_logprobs"),  # as vLLM
        (COMPLETIONS, {"prompt": "hi", "prompt_logprobs": 2, "echo": True, "logprobs": 3}, "prompt_logprobs"),
        (CHAT, {"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        (CHAT, {"messages": MESSAGES, "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "frobnicate"}}}}, "response_format"),  # the grammar library's message
        (CHAT, {"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
        (COMPLETIONS, {"prompt": "hi", "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        (CHAT, {"messages": [{"role": "user", "content": "hi " * 9000}]}, "messages"),  # too long
        (CHAT, {"messages": MESSAGES, "guided_json": '{"maximum": ' + "1" * 5000 + "}"}, "guided_json"),  # int past
        # Python's 4,300 digits
        # Compiles, but the grammar library gives up on it at the first token (its lexer past its limits).
        (COMPLETIONS, {"prompt": "x", "max_tokens": 3, "guided_regex": "(a{1000}){1000}"}, "guided_regex"),
    ],
)
def test_invalid_request_is_400_with_param(server, path, body, param):
    error = _assert_error(httpx.post(server.url + path, json=body, timeout=60), 400)  # the regex: seconds
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("part", [{"type": "text", "text": None}, {"type": "text", "text": 5},
                                  {"type": "refusal", "refusal": []}])
def test_a_text_part_without_its_string_says_so(server, part):
    # It said "content part of type 'text' is not supported".
    body = {"messages": [{"role": "user", "content": [part]}], "max_tokens": 1}
    error = _assert_error(httpx.post(server.url + CHAT, json=body), 400, f"needs {part['type']!r} as a string")
    assert error["param"] == "messages"


def test_malformed_json_is_400(server):
    response = httpx.post(server.url + COMPLETIONS, content=b'{"prompt": "hi",', headers={"content-type": "application/json"})
    _assert_error(response, 400, "not valid JSON")


def test_body_that_is_not_a_json_object_says_so(server):
    response = httpx.post(server.url + COMPLETIONS, content=b"prompt=hi",
                          headers={"content-type": "application/x-www-form-urlencoded"})
    _assert_error(response, 400, "JSON object")


def test_embeddings_on_a_server_without_an_embedding_model_say_so(server):
    # It answered "the embedding model None does not exist".
    error = _assert_error(httpx.post(server.url + "/v1/embeddings", json={"input": "hi"}), 404, "no embedding models")
    assert "None" not in error["message"]


@pytest.mark.parametrize("value", [[1.5], 5, None, [[1, "a"]]])
def test_embedding_input_of_no_accepted_form_names_the_forms(server, value):
    # A float among token ids was told "Input should be a valid string".
    error = _assert_error(httpx.post(server.url + "/v1/embeddings", json={"input": value}), 400, "token ids")
    assert error["param"] == "input" and "valid string" not in error["message"]


def test_null_means_default_as_in_openai(server):
    # vLLM's extensions too: the OpenAI SDK sends extra_body's None values as null.
    body = {"messages": MESSAGES, "max_tokens": 2, "temperature": None, "top_p": None, "n": None, "stream": None,
            "logprobs": None, "presence_penalty": None, "frequency_penalty": None, "top_k": None, "min_p": None,
            "repetition_penalty": None, "min_tokens": None, "ignore_eos": None, "stop_token_ids": None,
            "include_stop_str_in_output": None, "priority": None, "best_of": None}
    response = httpx.post(server.url + CHAT, json=body)
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 1


def test_echo_null_and_a_replayed_refusal_are_accepted_as_in_openai(server):
    response = httpx.post(server.url + COMPLETIONS, json={"prompt": "hi", "max_tokens": 1, "echo": None})
    assert response.status_code == 200 and not response.json()["choices"][0]["text"].startswith("hi")
    refused = [*MESSAGES, {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't."}]},
               {"role": "user", "content": "ok"}]
    assert httpx.post(server.url + CHAT, json={"messages": refused, "max_tokens": 1}).status_code == 200


def test_replayed_tool_call_arguments_json_cannot_load_are_replayed_as_sent(server):
    arguments = "[" * 1100 + "]" * 1100  # nesting past Python's JSON parser's stack: it was a 500
    messages = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"}]
    response = httpx.post(server.url + CHAT, json={"messages": messages, "max_tokens": 1}, timeout=60)
    assert response.status_code == 200, response.text


def test_unknown_model_is_404(server):
    error = _assert_error(httpx.post(server.url + CHAT, json={"model": "gpt-9", "messages": MESSAGES}), 404, "gpt-9")
    assert error["code"] == "model_not_found" and error["param"] == "model"


def test_unknown_route_is_404_in_openai_shape(server):
    _assert_error(httpx.get(server.url + "/v1/embeddings-nope"), 404)


def test_prompt_longer_than_context_states_both_counts(server):
    response = httpx.post(server.url + COMPLETIONS, json={"prompt": [504] * 9000, "max_tokens": 1})
    error = _assert_error(response, 400, "9000 in the prompt", "1 in the completion")
    assert error["code"] == "context_length_exceeded"
    # OpenAI's and vLLM's opening words, by which litellm raises ContextWindowExceededError (and its fallbacks run).
    assert error["message"].startswith("This model's maximum context length is 8192 tokens. However, you requested "
                                       "9001 tokens")
    response = httpx.post(server.url + COMPLETIONS, json={"prompt": "hi", "max_tokens": 10_000})
    _assert_error(response, 400, "10000 in the completion", "maximum context length is 8192 tokens")


def test_streaming_request_fails_before_the_stream_starts(server):
    body = {"messages": MESSAGES, "stream": True, "temperature": -1}
    with httpx.stream("POST", server.url + CHAT, json=body) as response:
        response.read()
    assert response.headers["content-type"].startswith("application/json")
    _assert_error(response, 400, "temperature")


def test_body_over_the_limit_is_413(server):
    body = b'{"prompt": "' + b"a" * (9 * 1024 * 1024) + b'"}'
    _assert_error(httpx.post(server.url + COMPLETIONS, content=body, headers={"content-type": "application/json"}), 413)


def test_server_keeps_serving_after_bad_requests(server):
    httpx.post(server.url + COMPLETIONS, content=b"nonsense")
    httpx.post(server.url + COMPLETIONS, json={"prompt": "hi", "temperature": -1, "stream": True})
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    response = httpx.post(server.url + COMPLETIONS, json={"prompt": "The capital of France is", "max_tokens": 3,
                                                          "temperature": 0})
    assert response.status_code == 200 and response.json()["choices"][0]["text"].startswith(" Paris")


def test_bad_requests_leave_no_traceback_in_the_server_log(server):
    seen = len(server.log.read_text())
    for body in ({"prompt": "hi", "max_tokens": -1}, {"prompt": "hi", "temperature": -1, "stream": True},
                 {"prompt": [504] * 9000, "max_tokens": 1}, {"prompt": "hi", "logprobs": 21}):
        assert httpx.post(server.url + COMPLETIONS, json=body).status_code == 400
    assert "Traceback" not in server.log.read_text()[seen:]


def test_fields_holding_the_value_that_asks_for_nothing_are_taken(server):
    # Clients that send vLLM's or OpenAI's defaults explicitly must not be refused for it.
    body = {"messages": MESSAGES, "max_tokens": 2, "use_beam_search": "false", "skip_special_tokens": True,
            "bad_words": [], "echo": False, "modalities": ["text"], "function_call": "none", "functions": []}
    assert httpx.post(server.url + CHAT, json=body, timeout=60).status_code == 200
