"""Anthropic's Messages API through Anthropic's official client: the same answers as chat completions, its shapes."""

import anthropic
import pytest
from openai import OpenAI

MODEL = "smollm2-135m"
GREEDY = {"temperature": 0}  # the client takes no sampling fields of its own for this API's newer models
WEATHER = {"name": "get_weather", "description": "The weather in a city now",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def served(start_server):
    return start_server("--api-key", "k")


@pytest.fixture(scope="module")
def client(served) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=served.url, api_key="k", max_retries=0)


@pytest.fixture(scope="module")
def chat(served) -> OpenAI:
    return OpenAI(base_url=f"{served.url}/v1", api_key="k", max_retries=0)


def test_an_answer_is_chats_answer_with_system_as_the_system_message(client, chat):
    expected = chat.chat.completions.create(model=MODEL, max_tokens=24, temperature=0, messages=[
        {"role": "system", "content": "Answer in one word."}, *QUESTION])
    message = client.messages.create(model=MODEL, max_tokens=24, system="Answer in one word.", messages=QUESTION,
                                     extra_body=GREEDY)
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == expected.choices[0].message.content and message.stop_reason == "end_turn"
    usage = message.usage
    assert usage.input_tokens + usage.cache_read_input_tokens == expected.usage.prompt_tokens
    assert usage.output_tokens == expected.usage.completion_tokens and usage.model_extra["cost"] > 0
    assert message.id.startswith("msg_") and message.model == MODEL


def test_a_stream_adds_up_to_the_whole_answer(client):
    whole = client.messages.create(model=MODEL, max_tokens=12, messages=QUESTION, extra_body=GREEDY)
    with client.messages.stream(model=MODEL, max_tokens=12, messages=QUESTION, extra_body=GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text == final.content[0].text
    assert final.stop_reason == whole.stop_reason and final.usage.output_tokens == whole.usage.output_tokens


def test_message_start_counts_the_prompt_before_any_output(client, served):
    # It said 0: clients that read input tokens there (langchain-anthropic) saw none. Then it said the whole prompt
    # while message_delta left the prefix cache's share out: a client adding the two counted the cache twice.
    long = [{"role": "user", "content": "Tell me about the river Seine and the bridges of Paris. " * 8}]
    for _ in range(2):  # the second reads the first's blocks from the prefix cache
        events = list(client.messages.create(model=MODEL, max_tokens=4, messages=long, stream=True,
                                             extra_body=GREEDY))
    start, delta = events[0].message.usage, next(e for e in events if e.type == "message_delta").usage
    assert events[0].type == "message_start" and start.cache_read_input_tokens > 0
    assert (start.input_tokens, start.cache_read_input_tokens) == (delta.input_tokens, delta.cache_read_input_tokens)
    counted = client.messages.count_tokens(model=MODEL, messages=long).input_tokens
    assert start.input_tokens + start.cache_read_input_tokens == counted


def test_a_final_assistant_turn_is_continued_as_anthropics_prefill(client, chat):
    # It was closed as a finished turn and a new one begun: the prefill trick for JSON answers did nothing.
    turns = [*QUESTION, {"role": "assistant", "content": "The capital of France is"}]
    expected = chat.chat.completions.create(model=MODEL, max_tokens=6, temperature=0, messages=turns,
                                            extra_body={"continue_final_message": True, "add_generation_prompt": False})
    message = client.messages.create(model=MODEL, max_tokens=6, messages=turns, extra_body=GREEDY)
    assert message.content[0].text == expected.choices[0].message.content and "Paris" in message.content[0].text


def test_max_tokens_and_stop_sequences_end_an_answer_as_anthropic_says(client):
    cut = client.messages.create(model=MODEL, max_tokens=3, messages=QUESTION, extra_body=GREEDY)
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 3
    stopped = client.messages.create(model=MODEL, max_tokens=30, messages=QUESTION, stop_sequences=["Paris"],
                                     extra_body=GREEDY)
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", "Paris")
    assert "Paris" not in stopped.content[0].text


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_tool_is_a_tool_use_block_with_its_input(client, stream):
    request = {"model": MODEL, "max_tokens": 60, "tools": [WEATHER], "tool_choice": {"type": "tool", "name":
               "get_weather"}, "messages": [{"role": "user", "content": "Weather in Paris?"}], "extra_body": GREEDY}
    if stream:
        with client.messages.stream(**request) as events:
            message = events.get_final_message()
    else:
        message = client.messages.create(**request)
    (call,) = message.content
    assert call.type == "tool_use" and call.name == "get_weather" and set(call.input) == {"city"}
    assert message.stop_reason == "tool_use"


def test_a_tool_result_renders_as_chats_tool_turn(client, chat):
    call = {"id": "t1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    expected = chat.chat.completions.create(
        model=MODEL, max_tokens=20, temperature=0,
        tools=[{"type": "function", "function": {"name": "get_weather", "description": WEATHER["description"],
                                                 "parameters": WEATHER["input_schema"]}}],
        messages=[{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": None, "tool_calls": [call]},
                  {"role": "tool", "tool_call_id": "t1", "content": "18C and sunny"}])
    message = client.messages.create(model=MODEL, max_tokens=20, tools=[WEATHER], extra_body=GREEDY, messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "get_weather",
                                           "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "18C and sunny"}]},
    ])
    assert message.content[0].text == expected.choices[0].message.content


def test_count_tokens_is_the_prompt_an_answer_counts(client):
    message = client.messages.create(model=MODEL, max_tokens=2, messages=QUESTION, extra_body=GREEDY)
    counted = client.messages.count_tokens(model=MODEL, messages=QUESTION)
    assert counted.input_tokens == message.usage.input_tokens + message.usage.cache_read_input_tokens


@pytest.mark.parametrize("fields, param", [
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]}, "messages[0].content[0]"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0]"),
    ({"extra_body": {"mcp_servers": [{"type": "url", "url": "https://example.com", "name": "x"}]}}, "mcp_servers"),
    ({"tool_choice": {"type": "sometimes"}, "tools": [WEATHER]}, "tool_choice"),
    # Named as chat names them, they were stop and tools[0].parameters.
    ({"stop_sequences": [""]}, "stop_sequences"),
    ({"tools": [{**WEATHER, "input_schema": "a city"}]}, "tools[0].input_schema"),
    ({"output_config": {"format": {"type": "xml"}}}, "output_config.format"),
    # Anthropic's 400s, taken before: a temperature in OpenAI's range past 1, a prefill ending in a space.
    ({"extra_body": {"temperature": 1.5}}, "temperature"),
    ({"messages": [*QUESTION, {"role": "assistant", "content": "It is "}]}, "messages[1].content"),
])
def test_what_this_server_cannot_do_is_refused_naming_the_field(client, fields, param):
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.create(**{"model": MODEL, "max_tokens": 4, "messages": QUESTION, **fields})
    assert refused.value.body["error"]["param"] == param


def test_the_key_is_taken_as_anthropics_clients_send_it(served):
    # x-api-key, not Authorization: Bearer; a wrong one is refused as any is.
    wrong = anthropic.Anthropic(base_url=served.url, api_key="nope", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        wrong.messages.create(model=MODEL, max_tokens=2, messages=QUESTION)


def test_errors_come_in_anthropics_shape(served, client):
    # They came in OpenAI's: no top-level "type": "error", and invalid_request_error for every status.
    import httpx

    url = f"{served.url}/v1/messages"
    for headers, body, status, kind in [
        ({"x-api-key": "nope"}, {}, 401, "authentication_error"),
        ({"x-api-key": "k"}, {"model": "gpt-9", "max_tokens": 2, "messages": QUESTION}, 404, "not_found_error"),
        ({"x-api-key": "k"}, {"max_tokens": 2}, 400, "invalid_request_error"),
    ]:
        answer = httpx.post(url, headers=headers, json=body)
        assert answer.status_code == status
        assert answer.json()["type"] == "error" and answer.json()["error"]["type"] == kind, answer.text
    # Other paths keep OpenAI's shape.
    assert "type" not in httpx.post(f"{served.url}/v1/chat/completions", headers={"x-api-key": "nope"}).json()


def test_a_prompt_past_the_context_is_worded_as_anthropics_which_claude_code_parses(client):
    # Claude Code asks for 32,000 tokens by default; on this error it retries with a max_tokens that fits.
    import re

    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.create(model=MODEL, max_tokens=8190, messages=QUESTION)
    figures = re.search(r"input length and `max_tokens` exceed context limit: (\d+) \+ (\d+) > (\d+)",
                        refused.value.message)
    assert figures and int(figures[2]) == 8190 and int(figures[3]) == 8192
    assert int(figures[1]) == client.messages.count_tokens(model=MODEL, messages=QUESTION).input_tokens


def test_messages_parse_gets_json_of_its_schema(client):
    # output_config was dropped: the SDK's messages.parse got prose and failed to validate it.
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        country: str

    parsed = client.messages.parse(model=MODEL, max_tokens=40, messages=QUESTION, output_format=City,
                                   extra_body=GREEDY)
    assert isinstance(parsed.parsed_output, City) and parsed.stop_reason == "end_turn"
