"""A streamed Responses answer ends with the same output items, statuses included, as the whole answer has."""

import asyncio

import pytest

from tokenmill.server.responses import _events, _output
from tokenmill.server.responses_protocol import ResponsesRequest

BODY = ResponsesRequest.model_validate({"input": "hi", "max_output_tokens": 5})
CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": '}}


def _chunk(delta: dict, finish: str | None = None) -> dict:
    return {"model": "m", "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def _streamed(deltas: list[dict]) -> list[dict]:
    async def chunks():
        yield _chunk({"role": "assistant", "content": ""})
        for i, delta in enumerate(deltas):
            yield _chunk(delta, "length" if i == len(deltas) - 1 else None)

    kept: list[dict] = []

    async def collect() -> list[dict]:
        return [event async for event in _events(chunks(), BODY, "resp_1", 0.0, kept.extend)]

    output = asyncio.run(collect())[-1]["response"]["output"]
    assert kept == output  # what a later item_reference may name: the items as the final response has them
    return output


@pytest.mark.parametrize("deltas, message", [
    # Thinking cut by max_tokens: the stream closed it complete, the whole answer incomplete. It is the last item:
    # no empty message follows it.
    ([{"reasoning_content": "hmm"}], {"content": None, "reasoning_content": "hmm"}),
    # Text, then a call cut short: the whole answer marked the message incomplete too.
    ([{"content": "Let me check."}, {"tool_calls": [{"index": 0, "id": "c1", "type": "function",
                                                    "function": {"name": "f", "arguments": ""}}]},
      {"tool_calls": [{"index": 0, "function": {"arguments": '{"a": '}}]}],
     {"content": "Let me check.", "tool_calls": [CALL]}),
])
def test_an_answer_cut_by_max_tokens_marks_only_its_last_item_incomplete_whole_or_streamed(deltas, message):
    whole = _output({"message": {"role": "assistant", **message}, "logprobs": None, "finish_reason": "length"},
                    "incomplete", {})
    statuses = [(o["type"], o["status"]) for o in whole]
    assert [(o["type"], o["status"]) for o in _streamed(deltas)] == statuses
    assert [s for _, s in statuses] == ["completed"] * (len(statuses) - 1) + ["incomplete"]


def test_a_failure_mid_stream_ends_it_with_each_apis_own_error_event():
    # OpenAI's names the code and numbers it on; Anthropic's nests the error's type and message.
    import json

    from tokenmill.errors import InvalidRequestError
    from tokenmill.server import messages, responses
    from tokenmill.server.serving import named_sse

    async def failing():
        yield {"type": "response.created"}
        raise InvalidRequestError("the deadline cannot be met", param="x")

    async def lines(error, numbered: bool) -> list[str]:
        return [line async for line in named_sse(failing(), error, numbered)]

    openai = asyncio.run(lines(responses._error_event, True))
    assert openai[0].startswith("event: response.created\n") and openai[1].startswith("event: error\n")
    assert json.loads(openai[1].split("data: ", 1)[1]) == {
        "type": "error", "code": "invalid_request_error", "message": "the deadline cannot be met", "param": "x",
        "sequence_number": 1}
    anthropic = asyncio.run(lines(messages._error_event, False))
    assert json.loads(anthropic[1].split("data: ", 1)[1]) == {  # param kept, as in its whole answers' errors
        "type": "error", "error": {"type": "invalid_request_error", "message": "the deadline cannot be met",
                                   "param": "x"}}
