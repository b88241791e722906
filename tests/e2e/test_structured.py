"""Structured output and tool calling through the official openai client against a real server."""

import json

import jsonschema
import pytest
from openai import BadRequestError, OpenAI

MODEL = "smollm2-135m"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Get the local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"], "additionalProperties": False}}}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


def _turn(i: int, question: str, name: str, city: str, result: str, answer: str) -> list[dict]:
    call = {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": json.dumps({"city": city})}}
    return [{"role": "user", "content": question}, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": json.dumps({"result": result})},
            {"role": "assistant", "content": answer}]


# NOTE: SmolLM2-135M never calls a tool from the system prompt alone; after three earlier calls in the conversation it
# does, under `auto`, for this question (and still answers "Tell me a joke." in text): greedy, with every kernel and dtype.
HISTORY = (_turn(0, "What is the weather in London?", "get_weather", "London", "rainy, 12C", "It is rainy in London, 12C.")
           + _turn(1, "What time is it in Madrid?", "get_time", "Madrid", "10:42", "It is 10:42 in Madrid.")
           + _turn(2, "What is the weather in Oslo?", "get_weather", "Oslo", "snow, -3C", "It is snowing in Oslo, -3C."))
AUTO_QUESTION = HISTORY + [{"role": "user", "content": "What time is it in Tokyo?"}]


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_json_schema_output_validates(client):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    for temperature in (0, 1):
        result = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Describe a person."}], temperature=temperature,
            max_tokens=60, response_format={"type": "json_schema",
                                            "json_schema": {"name": "person", "schema": schema, "strict": True}})
        assert result.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(result.choices[0].message.content), schema)


def test_json_object_is_parseable_json(client):
    result = client.completions.create(model=MODEL, prompt="A JSON object describing a cat:", temperature=0,
                                       max_tokens=60, extra_body={"response_format": {"type": "json_object"}})
    assert isinstance(json.loads(result.choices[0].text), dict)


def test_guided_choice_picks_one(client):
    result = client.completions.create(model=MODEL, prompt="Is the sky blue? Answer:", max_tokens=5,
                                       extra_body={"guided_choice": ["yes", "no"]})
    assert result.choices[0].text in ("yes", "no")


def test_bad_schema_is_a_400_with_the_libraries_message(client):
    with pytest.raises(BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=QUESTION, response_format={
            "type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "frobnicate"}}})
    assert "frobnicate" in caught.value.message and caught.value.body["param"] == "response_format"


def _call(client, messages, tool_choice, stream, **extra):
    """One assistant turn as (message dict, finish_reason); a streamed turn is rebuilt from its deltas as a client does."""
    args = dict(model=MODEL, messages=messages, tools=[WEATHER, TIME], tool_choice=tool_choice, temperature=0,
                max_tokens=60) | extra
    if not stream:
        choice = client.chat.completions.create(**args).choices[0]
        return choice.message.model_dump(exclude_none=True), choice.finish_reason
    content, calls, finish_reason = "", {}, None
    for chunk in client.chat.completions.create(**args, stream=True):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            if call.id:  # a call opens with its id, type and name; its arguments follow in later deltas
                calls[call.index] = {"id": call.id, "type": "function",
                                     "function": {"name": call.function.name, "arguments": ""}}
            calls[call.index]["function"]["arguments"] += call.function.arguments or ""
        finish_reason = chunk.choices[0].finish_reason or finish_reason
    message = {"role": "assistant", "content": content or None}
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return message, finish_reason


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("tool_choice", ["auto", "required", {"type": "function", "function": {"name": "get_time"}}])
def test_two_turn_tool_loop(client, tool_choice, stream):
    messages = list(AUTO_QUESTION if tool_choice == "auto" else QUESTION)
    message, finish_reason = _call(client, messages, tool_choice, stream)
    # OpenAI's and vLLM's: "stop" when tool_choice named the function, "tool_calls" when the model chose to call.
    assert finish_reason == ("stop" if isinstance(tool_choice, dict) else "tool_calls")
    messages.append(message)
    for call in message["tool_calls"]:
        arguments = json.loads(call["function"]["arguments"])
        assert isinstance(arguments["city"], str)
        if tool_choice != "required":
            assert call["function"]["name"] == "get_time"
        messages.append({"role": "tool", "tool_call_id": call["id"], "content": json.dumps({"result": "sunny, 18C"})})    # The tool's result is in: under `auto` the model now answers in text; the forced choices hand back to `none`.
    answer, finish_reason = _call(client, messages, "auto" if tool_choice == "auto" else "none", stream)
    assert finish_reason in ("stop", "length") and answer["content"] and "tool_calls" not in answer


@pytest.mark.parametrize("stream", [False, True])
def test_parallel_tool_calls_false_hands_back_the_first_call_alone_under_auto(client, stream):
    # guided_choice pins the answer to two calls in SmolLM2's format, as a model may write them under auto.
    two = ('<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}, '
           '{"name": "get_time", "arguments": {"city": "Tokyo"}}]</tool_call>')
    message, finish_reason = _call(client, QUESTION, "auto", stream, max_tokens=80, parallel_tool_calls=False,
                                   extra_body={"guided_choice": [two]})
    assert finish_reason == "tool_calls"
    assert [call["function"]["name"] for call in message["tool_calls"]] == ["get_weather"]  # OpenAI's and vLLM's


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("tool_choice, max_tokens", [({"type": "function", "function": {"name": "get_time"}}, 2),
                                                     ("required", 6)])
def test_a_forced_call_cut_by_max_tokens_is_a_call_cut_short_not_the_templates_tags(client, stream, tool_choice,
                                                                                    max_tokens):
    # Its <tool_call> text came back as content: LangChain and the agents SDK took the tags for the answer.
    message, finish_reason = _call(client, QUESTION, tool_choice, stream, max_tokens=max_tokens)
    assert finish_reason == "length" and message.get("content") is None
    for call in message.get("tool_calls", []):  # required, cut before a name any tool's begins: no call
        assert call["function"]["name"] in ("get_time", "get_weather")
    assert message.get("tool_calls") or tool_choice == "required"


@pytest.mark.parametrize("stream", [False, True])
def test_a_named_call_spends_its_tokens_on_the_arguments_alone(client, stream):
    # As vLLM's named mode: the <tool_call> wrapper took 23 of max_tokens 16, and the arguments came back empty.
    message, finish_reason = _call(client, QUESTION, {"type": "function", "function": {"name": "get_time"}}, stream,
                                   max_tokens=16)
    (call,) = message["tool_calls"]
    assert finish_reason == "stop" and call["function"]["name"] == "get_time"
    assert set(json.loads(call["function"]["arguments"])) <= {"city"}


def test_a_named_calls_arguments_stream_as_they_come(client):
    # They came in one delta at the end of the call.
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=QUESTION, tools=[WEATHER, TIME], max_tokens=16, temperature=0, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_time"}}))
    deltas = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert deltas[0].id and deltas[0].function.name == "get_time" and all(d.id is None for d in deltas[1:])
    fragments = [d.function.arguments for d in deltas[1:]]
    assert len(fragments) > 2 and isinstance(json.loads("".join(fragments)), dict)


def test_auto_answers_in_text_when_no_tool_fits(client):
    message, finish_reason = _call(client, HISTORY + [{"role": "user", "content": "Tell me a joke."}], "auto", False)
    assert finish_reason in ("stop", "length") and message["content"] and "tool_calls" not in message
