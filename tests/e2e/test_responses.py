"""OpenAI's Responses API through the official client: the same answers as chat completions, in its shapes."""

import json

import httpx
import pytest
from openai import BadRequestError, NotFoundError, OpenAI

MODEL = "smollm2-135m"
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city now",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _chat_text(client: OpenAI, messages: list[dict], max_tokens: int) -> tuple[str, object]:
    result = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0)
    return result.choices[0].message.content, result.usage


def test_an_answer_is_chats_answer_with_instructions_as_the_system_message(client):
    messages = [{"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": "What is the capital of France?"}]
    text, usage = _chat_text(client, messages, 24)
    result = client.responses.create(model=MODEL, instructions="Answer in one word.",
                                     input="What is the capital of France?", max_output_tokens=24, temperature=0)
    assert result.output_text == text and "Paris" in text
    assert result.status == "completed" and result.output[0].type == "message"
    assert result.usage.input_tokens == usage.prompt_tokens
    assert result.usage.output_tokens == usage.completion_tokens
    assert result.usage.total_tokens == usage.total_tokens
    assert result.usage.model_extra["cost"] > 0  # tokenmill's cost, kept beside OpenAI's fields
    assert result.store is False and result.id.startswith("resp_")
    raw = httpx.post(f"{client.base_url}responses", json={"model": MODEL, "input": "Hi", "max_output_tokens": 1})
    assert isinstance(raw.json()["created_at"], int)  # whole seconds, as OpenAI's; it was a float


def test_an_answer_cut_by_max_output_tokens_is_incomplete(client):
    result = client.responses.create(model=MODEL, input="Tell me a long story.", max_output_tokens=5, temperature=0)
    assert result.status == "incomplete" and result.incomplete_details.reason == "max_output_tokens"
    assert result.usage.output_tokens == 5 and result.output[0].status == "incomplete"


def test_a_stream_is_openais_event_sequence_and_adds_up_to_the_whole_answer(client, server):
    whole = client.responses.create(model=MODEL, input="Say hello.", max_output_tokens=20, temperature=0)
    with client.responses.stream(model=MODEL, input="Say hello.", max_output_tokens=20, temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response() if whole.status == "completed" else None
    types = [e.type for e in events]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          f"response.{whole.status}"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(deltas) == whole.output_text and len(deltas) > 1
    last = events[-1].response
    assert last.output[0].content[0].text == whole.output_text and last.usage.output_tokens == whole.usage.output_tokens
    assert len({e.response.id for e in events if hasattr(e, "response")}) == 1
    if final is not None:
        assert final.output_text == whole.output_text
    # Each event named on its own line too, as OpenAI's stream (and vLLM's) names them.
    raw = httpx.post(f"{server.url}/v1/responses", json={"input": "Hi", "max_output_tokens": 2, "stream": True})
    assert raw.text.startswith("event: response.created\ndata: {") and "[DONE]" not in raw.text


def test_a_named_function_is_called_with_arguments_that_parse(client):
    result = client.responses.create(model=MODEL, input="What is the weather in Paris?", tools=[WEATHER],
                                     tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=40,
                                     temperature=0)
    (call,) = result.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id
    assert set(json.loads(call.arguments)) == {"city"}


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_to_a_function_inside_a_namespace_names_its_namespace(client, stream):
    request = {"model": MODEL, "input": "What is the weather in Paris?", "max_output_tokens": 40, "temperature": 0,
               "tools": [{"type": "namespace", "name": "weather", "description": "Weather tools", "tools": [WEATHER]}],
               "tool_choice": {"type": "function", "name": "get_weather"}}
    if stream:
        with client.responses.stream(**request) as events:
            result = events.get_final_response()
    else:
        result = client.responses.create(**request)
    (call,) = result.output
    assert (call.type, call.name, call.namespace) == ("function_call", "get_weather", "weather")


def test_a_streamed_call_arrives_as_argument_deltas(client):
    with client.responses.stream(model=MODEL, input="What is the weather in Paris?", tools=[WEATHER],
                                 tool_choice="required", max_output_tokens=40, temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    (call,) = final.output
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert call.type == "function_call" and deltas == done.arguments == call.arguments
    assert "city" in json.loads(call.arguments)


def test_function_call_items_and_their_outputs_render_as_chats_tool_turns(client):
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    chat_tools = [{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}]
    chat = client.chat.completions.create(model=MODEL, max_tokens=20, temperature=0, tools=chat_tools, messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "18C and sunny"},
    ])
    result = client.responses.create(model=MODEL, max_output_tokens=20, temperature=0, tools=[WEATHER], input=[
        {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "18C and sunny"},
    ])
    assert result.output_text == chat.choices[0].message.content
    assert result.usage.input_tokens == chat.usage.prompt_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_a_reference_to_an_item_this_server_returned_is_that_item(client, stream):
    # The Vercel AI SDK sends {"type": "item_reference", "id": ...} for the turns this server answered (its store is
    # on by default): every second turn was a 400.
    first = {"model": MODEL, "input": "Hi", "max_output_tokens": 6, "temperature": 0}
    answer = client.responses.create(**first, stream=stream)
    if stream:  # the last event's (response.incomplete: 6 tokens cut the answer)
        *_, last = answer
        answer = last.response
    said = [{"role": "assistant", "content": answer.output_text}]
    referred = [{"type": "item_reference", "id": answer.output[0].id}]
    results = [client.responses.create(model=MODEL, max_output_tokens=6, temperature=0, input=[
        {"role": "user", "content": "Hi"}, *item, {"role": "user", "content": "And?"}]) for item in (said, referred)]
    assert results[1].output_text == results[0].output_text
    assert results[1].usage.input_tokens == results[0].usage.input_tokens
    unkept = client.responses.create(**first, store=False)  # as OpenAI's: nothing of it to name later
    with pytest.raises(BadRequestError) as refused:
        client.responses.create(model=MODEL, max_output_tokens=1,
                                input=[{"type": "item_reference", "id": unkept.output[0].id}])
    assert refused.value.body["param"] == "input[0].id"


def test_a_json_schema_format_constrains_the_text(client):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
              "required": ["answer"], "additionalProperties": False}
    result = client.responses.create(model=MODEL, input="Is Paris in France?", max_output_tokens=30, temperature=0,
                                     text={"format": {"type": "json_schema", "name": "reply", "schema": schema}})
    assert json.loads(result.output_text)["answer"] in ("yes", "no")


def test_logprobs_come_with_each_output_token_when_included(client):
    result = client.responses.create(model=MODEL, input="Say hi.", max_output_tokens=6, temperature=0,
                                     include=["message.output_text.logprobs"], top_logprobs=2)
    logprobs = result.output[0].content[0].logprobs
    assert len(logprobs) == result.usage.output_tokens
    assert all(len(lp.top_logprobs) == 2 and lp.top_logprobs[0].logprob >= lp.top_logprobs[1].logprob
               for lp in logprobs)


@pytest.mark.parametrize("fields, param", [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"background": True}, "background"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]},
     "input[0].content"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].id"),  # an item this server never returned
    ({"text": {"format": {"type": "bogus"}}}, "text.format.type"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"input": []}, "input"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"tool_choice": {"type": "file_search"}, "tools": [WEATHER]}, "tool_choice"),
])
def test_what_this_server_cannot_do_is_refused_naming_the_field(client, fields, param):
    with pytest.raises(BadRequestError) as refused:
        client.responses.create(**{"model": MODEL, "input": "Hi", "max_output_tokens": 4, **fields})
    assert refused.value.body["param"] == param


def test_no_response_is_stored_to_retrieve(client):
    with pytest.raises(NotFoundError) as missing:
        client.responses.retrieve("resp_123")
    assert "stores no responses" in missing.value.body["message"]
    with pytest.raises(NotFoundError):
        client.responses.cancel("resp_123")
