"""Request fields to constraints: response_format, vLLM's extras and tool_choice, and the 400s they can give."""

import asyncio
import json
import threading
import time
from unittest.mock import MagicMock

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from tokenmill.config import ServerConfig
from tokenmill.errors import InvalidRequestError
from tokenmill.server.app import build_app
from tokenmill.server.protocol import ChatCompletionRequest, CompletionRequest
from tokenmill.structured.params import NUMBER_STEP, StructuredOutput, bounded_numbers

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


def _chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **fields)


def test_response_formats_become_constraints():
    assert _chat(response_format={"type": "text"}).sampling_params().structured_output is None
    assert _chat(response_format={"type": "json_object"}).sampling_params().structured_output.json_object
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    assert _chat(response_format=fmt).sampling_params().structured_output.json == schema


def test_a_schema_the_library_cannot_compile_is_refused_with_its_message():
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}
    with pytest.raises(InvalidRequestError, match="cannot compile the response_format: .*frobnicate") as caught:
        _chat(response_format=fmt).sampling_params().structured_output.compiled
    assert caught.value.param == "response_format"


def test_a_schema_given_as_json_text_compiles_as_the_same_object_offline_too():
    # The server parsed the text; SamplingParams(structured_output=StructuredOutput(json="...")) sent it to the
    # compiler as it was, without the bound on numbers' decimals: SmolLM2 wrote digits until max_tokens.
    schema = {"type": "object", "properties": {"n": {"type": "number"}}, "required": ["n"]}
    assert StructuredOutput(json=json.dumps(schema)).compiled == StructuredOutput(json=schema).compiled
    with pytest.raises(InvalidRequestError, match="not valid JSON") as refused:
        StructuredOutput(json="{not json", param="guided_json")
    assert refused.value.param == "guided_json"


def test_unknown_response_format_type_is_a_validation_error():
    with pytest.raises(ValidationError):
        _chat(response_format={"type": "yaml"})


def test_vllm_fields_work_on_completions():
    assert CompletionRequest(prompt="x", guided_choice=["a", "b"]).sampling_params().structured_output.choice == [
        "a", "b"]
    json_output = CompletionRequest(prompt="x", guided_json='{"type": "object"}').sampling_params().structured_output
    assert json_output.json == {"type": "object"}
    regex = CompletionRequest(prompt="x", structured_outputs={"regex": "[0-9]+"}).sampling_params().structured_output
    assert regex.regex == "[0-9]+"
    with pytest.raises(InvalidRequestError, match="guided_regex"):
        CompletionRequest(prompt="x", guided_regex="(").sampling_params().structured_output.compiled
    with pytest.raises(InvalidRequestError, match="give one"):
        CompletionRequest(prompt="x", guided_regex="a", guided_choice=["a"]).sampling_params()


def test_tools_belong_to_chat():
    with pytest.raises(InvalidRequestError, match="chat completions"):
        CompletionRequest(prompt="x", tools=TOOLS).sampling_params()


@pytest.mark.parametrize("choice, forced", [(None, False), ("auto", False), ("none", False), ("required", True),
                                             ({"type": "function", "function": {"name": "f"}}, True)])
def test_only_required_and_named_tool_choices_constrain(choice, forced):
    params = _chat(tools=TOOLS, tool_choice=choice).sampling_params()
    assert (params.structured_output is not None) is forced


@pytest.mark.parametrize("name", ["none", "auto", "required"])
def test_a_function_named_like_a_mode_is_still_the_named_choice(name):
    tools = [{"type": "function", "function": {"name": n, "parameters": {"type": "object", "properties": {
        n: {"type": "string"}}}}} for n in (name, "other")]
    request = _chat(tools=tools, tool_choice={"type": "function", "function": {"name": name}})
    params = request.sampling_params()
    assert request.tool_dicts() == tools and request.tool_mode == "named"
    # The output is that function's arguments, and only its: vLLM's named mode, no tokens spent on a wrapper.
    assert params.structured_output.json == tools[0]["function"]["parameters"]


def test_tool_choice_mistakes_are_refused():
    with pytest.raises(InvalidRequestError, match="not among the tools"):
        _chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "g"}}).sampling_params()
    with pytest.raises(InvalidRequestError, match="needs tools"):
        _chat(tool_choice="required").sampling_params()


def test_a_forced_call_wins_over_a_response_format_as_in_vllm():
    # instructor's tool modes send both; it was a 400 "drop response_format".
    both = _chat(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}).sampling_params()
    assert both.structured_output.grammar.startswith('start: "<tool_call>')


def test_tool_history_reaches_the_conversation():
    request = ChatCompletionRequest(messages=[
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ])
    assistant, tool = request.conversation()
    assert assistant["tool_calls"][0]["function"] == {"name": "f", "arguments": "{}"}
    assert tool == {"role": "tool", "content": "42", "tool_call_id": "c1"}


@pytest.mark.parametrize("schema", [{"type": "number", "const": 0.1}, {"type": "number", "enum": [1.1, 2.5]},
                                    {"type": "number", "minimum": 0.001, "maximum": 0.001},
                                    {"type": "number", "minimum": 0.1000001, "maximum": 0.1000009}])
def test_a_number_schema_allowing_few_values_keeps_them(schema):
    # The step every other number gets (params.NUMBER_STEP) would leave these no value: "Unsatisfiable schema".
    assert "multipleOf" not in bounded_numbers(schema)
    assert StructuredOutput(json=schema).compiled


def test_a_free_number_gets_the_step():
    assert bounded_numbers({"type": "number", "minimum": 0, "maximum": 1})["multipleOf"] == NUMBER_STEP


@pytest.mark.parametrize("path, request_class, body", [
    ("/v1/completions", CompletionRequest, {"prompt": "hi"}),
    ("/v1/chat/completions", ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}]}),
])
def test_a_requests_grammar_compiles_off_the_event_loop(monkeypatch, path, request_class, body):
    # A large regex or choice list took seconds to compile, with every other request's stream stalled behind it; and
    # on asyncio's shared pool, a few slow compiles queued every other request's tokenizing behind them.
    compiled_on = []

    def compile_grammar(self):
        compiled_on.append(threading.current_thread().name)
        raise InvalidRequestError("stop here", param="guided_regex")

    monkeypatch.setattr(StructuredOutput, "_compile", compile_grammar)
    engine = MagicMock(max_model_len=64, **{"source.sampling_defaults": {}})
    client = TestClient(build_app({"m": engine}, ServerConfig()))
    assert client.post(path, json={"model": "m", "guided_regex": "a+", **body}).status_code == 400
    assert len(compiled_on) == 1 and compiled_on[0].startswith("grammar-compile")


def test_more_stop_strings_than_a_request_may_give_are_refused_by_name():
    # Each token of each sample is checked against every one: 100,000 (a 1.5 MB body) cost 20 ms a token.
    with pytest.raises(InvalidRequestError, match="stop has 257 strings; at most 256") as refused:
        CompletionRequest(prompt="x", stop=[f"s{i}" for i in range(257)]).sampling_params()
    assert refused.value.param == "stop"
    assert CompletionRequest(prompt="x", stop=[f"s{i}" for i in range(256)]).sampling_params().stop[-1] == "s255"


def test_a_deadline_counts_the_time_the_grammar_took_to_compile(monkeypatch, make_engine):
    # Arrival was stamped once the grammar had compiled and the prompt was tokenized: 1.2 s of compiling was
    # invisible to a 1 s deadline, answered "met".
    compile_grammar = StructuredOutput._compile

    def slow(self):
        time.sleep(1.2)
        return compile_grammar(self)

    body = {"model": "m", "prompt": "The capital of France is", "max_tokens": 1, "guided_regex": "[a-z ]+"}
    with TestClient(build_app({"m": make_engine()}, ServerConfig())) as client:
        # Warm: the first constrained request builds the grammar library's vocabulary (2 s) on the engine thread.
        warm = client.post("/v1/completions", json=body, headers={"x-tokenmill-deadline-ms": "1000"})
        assert warm.status_code == 200
        monkeypatch.setattr(StructuredOutput, "_compile", slow)
        response = client.post("/v1/completions", json=body, headers={"x-tokenmill-deadline-ms": "1000"})
    assert response.status_code == 429 or response.headers["x-tokenmill-deadline"] == "missed"


def test_two_requests_grammars_compile_at_once(monkeypatch):
    # functools.cached_property held one lock for every instance while computing (Python 3.11): the two compile
    # threads compiled one grammar at a time, a slow one holding up every other constrained request.
    compile_grammar, running, peak, lock = StructuredOutput._compile, [0], [0], threading.Lock()

    def slow(self):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.3)
        with lock:
            running[0] -= 1
        return compile_grammar(self)

    monkeypatch.setattr(StructuredOutput, "_compile", slow)

    async def both() -> None:
        await asyncio.gather(StructuredOutput(regex="a+").compile_off_loop(),
                             StructuredOutput(regex="b+").compile_off_loop())

    asyncio.run(both())
    assert peak[0] == 2
