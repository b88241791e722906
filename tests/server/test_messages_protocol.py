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


@pytest.mark.parametrize("thinking, enabled", [("disabled", False), ("enabled", True), ("adaptive", True)])
def test_thinking_reaches_the_template_as_qwen3s_switch(thinking, enabled):
    # Claude Code sends "adaptive" for newer models: it switched thinking off.
    chat = MessagesRequest.model_validate({"max_tokens": 8, "messages": [{"role": "user", "content": "hi"}],
                                           "thinking": {"type": thinking}}).chat_request()
    assert chat.template_kwargs() == {"enable_thinking": enabled}


def test_claude_codes_system_turns_join_the_system_prompt_and_its_billing_block_is_dropped():
    # Its system turns among the messages were a 400; its billing block, whose hash changes every request, began
    # the prompt, so nothing after it was ever served from the prefix cache.
    request = MessagesRequest.model_validate({"max_tokens": 8, "system": [
        {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1; cch=abc123;"},
        {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}], "messages": [
        {"role": "user", "content": "hi"}, {"role": "system", "content": "Reminder: be brief."},
        {"role": "user", "content": "again"}]})
    turns = request.chat_request().conversation()
    assert [(t["role"], t["content"]) for t in turns] == [
        ("system", "You are Claude Code.\nReminder: be brief."), ("user", "hi"), ("user", "again")]


def test_a_final_assistant_turn_is_a_prefill_the_answer_continues():
    chat = MessagesRequest.model_validate({"max_tokens": 8, "messages": [
        {"role": "user", "content": "JSON please"}, {"role": "assistant", "content": "{"}]}).chat_request()
    assert chat.continue_final_message and chat.add_generation_prompt is False


def test_a_final_turn_of_only_replayed_thinking_is_no_prefill():
    # Its thinking is left out, so the user's turn came last and was continued: the model went on with the user's
    # text instead of answering it.
    chat = MessagesRequest.model_validate({"max_tokens": 8, "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "x"}]}]}).chat_request()
    assert not chat.continue_final_message and chat.add_generation_prompt is not False


def test_a_tool_choice_of_a_tool_without_its_name_is_refused_naming_it():
    with pytest.raises(InvalidRequestError) as refused:
        MessagesRequest.model_validate({"max_tokens": 8, "messages": [{"role": "user", "content": "hi"}],
                                        "tools": [TOOL], "tool_choice": {"type": "tool"}}).chat_request()
    assert refused.value.param == "tool_choice.name"


def test_a_tool_name_chat_refuses_is_named_as_the_tools_field():
    with pytest.raises(InvalidRequestError) as refused:
        MessagesRequest.model_validate({"max_tokens": 8, "messages": [{"role": "user", "content": "hi"}],
                                        "tools": [{**TOOL, "name": "no spaces"}]}).chat_request()
    assert refused.value.param == "tools[0].name"


def test_a_conversation_left_empty_once_its_replayed_thinking_is_dropped_is_a_400():
    # An IndexError, a 500: every turn was folded away before the prefill check read the last.
    with pytest.raises(InvalidRequestError) as refused:
        MessagesRequest.model_validate({"max_tokens": 8, "messages": [
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "x"}]}]}
        ).chat_request()
    assert refused.value.param == "messages"
