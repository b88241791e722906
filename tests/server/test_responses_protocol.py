"""The Responses API request as the chat completions request that answers it."""

import pytest

from tokenmill.errors import InvalidRequestError
from tokenmill.server.response_items import ResponseItems
from tokenmill.server.responses_protocol import ResponsesRequest


def test_items_become_chat_turns_and_calls_join_the_assistant_turn_before_them():
    request = ResponsesRequest.model_validate({"instructions": "Be brief.", "input": [
        {"role": "developer", "content": "Use tools."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"},
                                                          {"type": "input_text", "text": "b"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Let me look.", "annotations": []}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "one"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "two"}]},
        {"type": "reasoning", "id": "rs_1", "summary": []},  # another server's: left out, as vLLM leaves it
        {"type": "function_call", "call_id": "c3", "name": "f", "arguments": "{}"},
    ]})
    turns = request.chat_request().conversation()
    assert [(t["role"], t["content"]) for t in turns] == [
        ("system", "Be brief."), ("system", "Use tools."), ("user", "a\nb"), ("assistant", "Let me look."),
        ("tool", "one"), ("tool", "two"), ("assistant", ""),
    ]
    assert [c["id"] for c in turns[3]["tool_calls"]] == ["c1", "c2"] and turns[4]["tool_call_id"] == "c1"
    assert turns[6]["tool_calls"][0]["function"] == {"name": "f", "arguments": "{}"}


def test_flat_tools_formats_and_settings_become_chats_nested_ones():
    request = ResponsesRequest.model_validate({
        "input": "hi", "max_output_tokens": 7, "truncation": "auto", "reasoning": {"effort": "low"},
        "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": True}],
        "tool_choice": {"type": "function", "name": "f"},
        "text": {"format": {"type": "json_schema", "name": "s", "schema": {"type": "object"}, "strict": True}},
        "include": ["reasoning.encrypted_content"],
    })
    chat = request.chat_request()
    assert chat.tools[0].function.name == "f" and chat.tools[0].function.parameters == {"type": "object"}
    assert chat.tool_choice.function.name == "f" and chat.tool_mode == "named"
    assert chat.response_format.json_schema.schema_ == {"type": "object"}
    assert chat.max_completion_tokens == 7 and chat.truncate_prompt_tokens == -1
    assert chat.template_kwargs() == {"reasoning_effort": "low"} and not chat.logprobs


def test_a_function_call_item_without_its_call_id_is_refused_naming_it():
    request = ResponsesRequest.model_validate({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]})
    with pytest.raises(InvalidRequestError) as refused:
        request.chat_request()
    assert refused.value.param == "input[0].call_id"


@pytest.mark.parametrize("fields, param", [
    ({"tools": [{"type": "function", "name": "no spaces allowed"}]}, "tools[0].name"),
    ({"text": {"format": {"type": "json_schema", "name": "s"}}}, "text.format.schema"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].id"),
    ({"reasoning": {"effort": 5}}, "reasoning.effort"),
])
def test_what_chat_or_this_server_refuses_is_named_as_the_responses_field(fields, param):
    # Chat's schema errors came back as param "input" with chat's own pydantic dump for a message.
    with pytest.raises(InvalidRequestError) as refused:
        ResponsesRequest.model_validate({"input": "hi", **fields}).chat_request()
    assert refused.value.param == param and "ChatCompletionRequest" not in str(refused.value)


def test_top_logprobs_alone_asks_for_no_logprobs_as_openai_reads_it():
    chat = ResponsesRequest.model_validate({"input": "hi", "top_logprobs": 2}).chat_request()
    assert not chat.logprobs and chat.top_logprobs is None


def test_a_namespace_tools_functions_are_offered_as_function_tools():
    # Codex sends its sub-agent tools so on every turn: refused as a hosted tool, no Codex request got an answer.
    request = ResponsesRequest.model_validate({"input": "hi", "tools": [
        {"type": "function", "name": "get_goal", "parameters": {"type": "object"}},
        {"type": "namespace", "name": "multi_agent_v1", "description": "Sub-agents.", "tools": [
            {"type": "function", "name": "close_agent", "parameters": {"type": "object"}}]}]})
    assert [t.function.name for t in request.chat_request().tools] == ["get_goal", "close_agent"]
    assert request.namespaces() == {"close_agent": "multi_agent_v1"}


FUNCTION = {"type": "function", "name": "a", "parameters": {"type": "object"}}


@pytest.mark.parametrize("tools, param", [
    ([{"type": "namespace", "name": "n", "tools": [FUNCTION, {**FUNCTION, "name": "b"}]},
      {"type": "function", "name": "bad name"}], "tools[1].name"),  # the request's index, not the flattened list's
    ([{"type": "namespace", "name": "n", "tools": [{"type": "function", "name": "bad name"}]}],
     "tools[0].tools[0].name"),
    ([FUNCTION, {"type": "namespace", "name": "n", "tools": [FUNCTION]}], "tools[1].tools[0].name"),  # twice: whose?
    ([{"type": "namespace", "tools": [FUNCTION]}], "tools[0]"),  # its calls would name no namespace
])
def test_namespace_tools_mistakes_are_named_where_the_request_has_them(tools, param):
    with pytest.raises(InvalidRequestError) as refused:
        ResponsesRequest.model_validate({"input": "hi", "tools": tools}).chat_request()
    assert refused.value.param == param


def test_a_named_tool_choice_with_a_text_format_is_the_forced_call_as_instructor_sends_it():
    # instructor's RESPONSES_TOOLS mode: it was a 400 naming text.format.
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    request = ResponsesRequest.model_validate({
        "input": "John is 25", "tools": [{"type": "function", "name": "User", "parameters": schema}],
        "tool_choice": {"type": "function", "name": "User"},
        "text": {"format": {"type": "json_schema", "name": "User", "schema": schema, "strict": True}}})
    assert request.chat_request().sampling_params().structured_output.param == "tools"


def _message(item_id: str, text: str) -> dict:
    top = [{"token": "x", "logprob": -1.0, "bytes": [120]}] * 20
    return {"type": "message", "id": item_id, "status": "completed", "role": "assistant", "content": [
        {"type": "output_text", "text": text, "annotations": [], "logprobs": [{"token": "x", "top_logprobs": top}]}]}


def test_the_items_kept_for_references_are_the_last_ones_and_only_what_a_prompt_reads():
    kept = ResponseItems(max_items=2, max_chars=12)
    kept.keep([_message("a", "hi"), _message("b", "hello")])
    kept.keep([{"type": "function_call", "id": "c", "call_id": "k", "name": "f", "arguments": "{}", "status": "x"}])
    assert kept.get("a") is None and kept.get("c") == {"type": "function_call", "call_id": "k", "name": "f",
                                                        "arguments": "{}"}
    # Logprobs (7.9 MiB for 1,000 tokens with 20 alternatives each) are not kept: 4,096 such answers were 32 GiB.
    assert kept.get("b") == {"type": "message", "role": "assistant", "content": [{"type": "output_text",
                                                                                  "text": "hello"}]}
    kept.keep([_message("d", "0123456789")])  # past max_chars: the oldest go
    assert kept.get("b") is None and kept.get("c") is not None and kept.get("d") is not None
