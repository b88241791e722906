"""Anthropic's Messages request as the chat completions request that answers it."""

import pytest

from tokenmill.errors import InvalidRequestError
from tokenmill.server.messages_protocol import MessagesRequest

TOOL = {"name": "f", "description": "d", "input_schema": {"type": "object", "properties": {}}}


def test_blocks_become_chat_turns_tool_uses_the_turns_calls_and_tool_results_tool_turns():
    request = MessagesRequest.model_validate({"max_tokens": 8, "system": [{"type": "text", "text": "Be brief."}],
                                              "messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm", "signature": "s"},
                                          {"type": "text", "text": "Checking."},
                                          {"type": "tool_use", "id": "t1", "name": "f", "input": {"x": 1}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                      "content": [{"type": "text", "text": "18C"}]},
                                     {"type": "text", "text": "And tomorrow?"}]},
    ]})
    turns = request.chat_request().conversation()
    assert [(t["role"], t["content"]) for t in turns] == [
        ("system", "Be brief."), ("user", "Weather?"), ("assistant", "Checking."), ("tool", "18C"),
        ("user", "And tomorrow?")]
    assert turns[2]["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"x": 1}'}
    assert turns[3]["tool_call_id"] == "t1"


@pytest.mark.parametrize("choice, mode, parallel", [
    ({"type": "auto"}, "auto", None), ({"type": "any"}, "required", None), ({"type": "none"}, "none", None),
    ({"type": "tool", "name": "f", "disable_parallel_tool_use": True}, "named", False),
])
def test_tool_choice_becomes_chats(choice, mode, parallel):
    chat = MessagesRequest.model_validate({"max_tokens": 8, "messages": [{"role": "user", "content": "hi"}],
                                           "tools": [TOOL], "tool_choice": choice}).chat_request()
    assert chat.tool_mode == mode and chat.parallel_tool_calls is parallel
    assert chat.tools[0].function.parameters == TOOL["input_schema"]


def test_thinking_reaches_the_template_as_qwen3s_switch():
    chat = MessagesRequest.model_validate({"max_tokens": 8, "messages": [{"role": "user", "content": "hi"}],
                                           "thinking": {"type": "disabled"}}).chat_request()
    assert chat.template_kwargs() == {"enable_thinking": False}


def test_a_tool_name_chat_refuses_is_named_as_the_tools_field():
    with pytest.raises(InvalidRequestError) as refused:
        MessagesRequest.model_validate({"max_tokens": 8, "messages": [{"role": "user", "content": "hi"}],
                                        "tools": [{**TOOL, "name": "no spaces"}]}).chat_request()
    assert refused.value.param == "tools[0].name"
