"""--reasoning-parser on a real server: the thinking comes as reasoning_content, whole, streamed and in Responses.

SmolLM2 does not think; a choice constraint makes it write the tags a reasoning model writes.
"""

import pytest
from openai import OpenAI

ANSWER = "<think>The user greets me.</think>\n\nHello!"
FORCED = {"structured_outputs": {"choice": [ANSWER]}}
MESSAGES = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def client(start_server) -> OpenAI:
    server = start_server("--reasoning-parser", "qwen3")
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_a_whole_answer_carries_its_thinking_apart(client):
    message = client.chat.completions.create(model="smollm2-135m", messages=MESSAGES, max_tokens=40, temperature=0,
                                             extra_body=FORCED).choices[0].message
    assert message.content == "Hello!" and message.model_extra["reasoning_content"] == "The user greets me."


def test_a_stream_carries_it_apart_in_deltas_that_add_up(client):
    stream = client.chat.completions.create(model="smollm2-135m", messages=MESSAGES, max_tokens=40, temperature=0,
                                            stream=True, extra_body=FORCED)
    reasoning, content = "", ""
    for chunk in stream:
        for choice in chunk.choices:
            reasoning += (choice.delta.model_extra or {}).get("reasoning_content") or ""
            content += choice.delta.content or ""
    assert (reasoning, content) == ("The user greets me.", "Hello!")


@pytest.mark.parametrize("stream", [False, True])
def test_include_reasoning_false_leaves_the_thinking_out_as_vllm(client, stream):
    # It was ignored: the thinking came back all the same.
    answer = client.chat.completions.create(model="smollm2-135m", messages=MESSAGES, max_tokens=40, temperature=0,
                                            stream=stream, extra_body={**FORCED, "include_reasoning": False})
    deltas = [c.choices[0].delta for c in answer if c.choices] if stream else [answer.choices[0].message]
    assert "".join(d.content or "" for d in deltas) == "Hello!"
    assert not any((d.model_extra or {}).get("reasoning_content") for d in deltas)


@pytest.mark.parametrize("stream", [False, True])
def test_the_responses_api_answers_a_reasoning_item_then_the_message(client, stream):
    request = {"model": "smollm2-135m", "input": "Hi", "max_output_tokens": 40, "temperature": 0, "extra_body": FORCED}
    if stream:
        with client.responses.stream(**request) as events:
            deltas = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
            result = events.get_final_response()
        assert deltas == "The user greets me."
    else:
        result = client.responses.create(**request)
    reasoning, message = result.output
    assert reasoning.type == "reasoning" and reasoning.content[0].text == "The user greets me."
    assert message.type == "message" and result.output_text == "Hello!"


@pytest.mark.parametrize("stream", [False, True])
def test_anthropics_messages_api_answers_a_thinking_block_then_the_text(client, stream):
    import anthropic

    messages = anthropic.Anthropic(base_url=str(client.base_url).removesuffix("/v1/"), api_key="unused",
                                   max_retries=0).messages
    request = {"model": "smollm2-135m", "max_tokens": 40, "messages": MESSAGES,
               "extra_body": {"temperature": 0, **FORCED}}
    if stream:
        with messages.stream(**request) as events:
            message = events.get_final_message()
    else:
        message = messages.create(**request)
    thinking, text = message.content
    assert (thinking.type, thinking.thinking) == ("thinking", "The user greets me.")
    assert (text.type, text.text) == ("text", "Hello!")


def test_empty_thinking_is_no_reasoning_item_whole_or_streamed(client):
    # The whole answer had a reasoning item for "<think></think>", the stream none.
    request = {"model": "smollm2-135m", "input": "Hi", "max_output_tokens": 20, "temperature": 0,
               "extra_body": {"structured_outputs": {"choice": ["<think></think>Hi"]}}}
    with client.responses.stream(**request) as events:
        streamed = events.get_final_response()
    whole = client.responses.create(**request)
    assert [o.type for o in streamed.output] == [o.type for o in whole.output] == ["message"]


def test_deepseek_r1_leaves_an_answer_a_grammar_holds_from_its_first_token_alone(start_server):
    # Such an answer can never write </think>: deepseek_r1 took all of it for thinking, a forced call and a JSON
    # answer came back with no content and no tool_calls.
    server = start_server("--reasoning-parser", "deepseek_r1")
    deepseek = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    weather = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    called = deepseek.chat.completions.create(model="smollm2-135m", messages=MESSAGES, tools=weather, temperature=0,
                                              tool_choice="required", max_tokens=30).choices[0].message
    assert called.tool_calls and called.tool_calls[0].function.name == "get_weather"
    answer = deepseek.chat.completions.create(model="smollm2-135m", messages=MESSAGES, max_tokens=10, temperature=0,
                                              response_format={"type": "json_object"}).choices[0].message
    assert answer.content and "reasoning_content" not in (answer.model_extra or {})


def test_without_the_flag_the_thinking_stays_in_the_content(server):
    plain = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    message = plain.chat.completions.create(model="smollm2-135m", messages=MESSAGES, max_tokens=40, temperature=0,
                                            extra_body=FORCED).choices[0].message
    assert message.content == ANSWER and "reasoning_content" not in (message.model_extra or {})
