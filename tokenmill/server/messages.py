"""POST /v1/messages: Anthropic's Messages API (what Claude Code speaks), answered by the chat completions path.

The answer's content blocks are its thinking (with --reasoning-parser), its text and its tool_use blocks; streamed,
the chat chunks become Anthropic's events: message_start, then per block its start, deltas and stop, then
message_delta (the stop reason and usage) and message_stop.
"""

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import Request, Response

from tokenmill.errors import InvalidRequestError, PromptTooLongError
from tokenmill.router import AUTO
from tokenmill.server.chat import answer_chat
from tokenmill.server.errors import APIError, anthropic_error
from tokenmill.server.messages_protocol import CountTokensRequest, MessagesRequest, their_param
from tokenmill.server.serving import EventStream, named_sse, state_of
from tokenmill.structured.tool_parser import arguments_object


async def create_message(body: MessagesRequest, request: Request, response: Response) -> dict | EventStream:
    """Answer one conversation with a message, or its events when streamed."""
    try:
        answer = await answer_chat(body.chat_request(), request, response)
    except PromptTooLongError as exc:
        raise _too_long(exc) from exc
    except InvalidRequestError as exc:
        exc.param = their_param(exc.param)
        raise
    message_id = f"msg_{uuid.uuid4().hex}"
    if not isinstance(answer, dict):
        return EventStream(_events(answer.chunks, message_id), answer.streams, answer.headers,
                           encode=lambda events: named_sse(events, _error_event))
    choice = answer["choices"][0]
    message = choice["message"]
    calls = message.get("tool_calls") or []
    content = [{"type": "thinking", "thinking": message["reasoning_content"], "signature": ""}] \
        if message.get("reasoning_content") else []
    if message["content"]:
        content.append({"type": "text", "text": message["content"]})
    content += [{"type": "tool_use", "id": c["id"], "name": c["function"]["name"],
                 "input": arguments_object(c["function"]["arguments"])} for c in calls]
    return {"id": message_id, "type": "message", "role": "assistant", "model": answer["model"], "content": content,
            **_stop(choice["finish_reason"], choice["stop_reason"], bool(calls)), "usage": _usage(answer["usage"])}


async def count_tokens(body: CountTokensRequest, request: Request) -> dict:
    """The prompt tokens the conversation is to the model it names, as Anthropic's count_tokens answers."""
    model = state_of(request).model(None if body.model == AUTO else body.model)
    ids = await asyncio.to_thread(body.chat_request().prompt_token_ids, model.tokenizer)
    return {"input_tokens": len(ids)}


def _too_long(exc: PromptTooLongError) -> PromptTooLongError:
    """A prompt past the context in Anthropic's words, which Claude Code reads: to retry with a max_tokens that fits,
    or to compact the conversation."""
    figures = {"prompt_tokens": exc.prompt_tokens, "max_tokens": exc.max_tokens, "context": exc.context}
    if exc.max_tokens is not None and exc.prompt_tokens < exc.context:
        return PromptTooLongError(f"input length and `max_tokens` exceed context limit: {exc.prompt_tokens} + "
                                  f"{exc.max_tokens} > {exc.context}, decrease input length or `max_tokens` and try "
                                  "again", param="max_tokens", **figures)
    return PromptTooLongError(f"prompt is too long: {exc.prompt_tokens} tokens > {exc.context - 1} maximum",
                              param="messages", **figures)


def _stop(finish_reason: str | None, stop_reason: str | int | None, called: bool) -> dict:
    """Chat's finish as Anthropic's stop_reason and stop_sequence."""
    if finish_reason == "length":
        reason = "max_tokens"
    elif called:
        reason = "tool_use"
    elif isinstance(stop_reason, str):  # a stop string, not the model's own end
        reason = "stop_sequence"
    else:
        reason = "end_turn"
    return {"stop_reason": reason, "stop_sequence": stop_reason if reason == "stop_sequence" else None}


def _usage(usage: dict) -> dict:
    """Chat's usage block in Anthropic's names (input_tokens leave out those read from the prefix cache), its cost
    kept."""
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    return {"input_tokens": usage["prompt_tokens"] - cached, "cache_read_input_tokens": cached,
            "cache_creation_input_tokens": 0, "output_tokens": usage["completion_tokens"], "cost": usage["cost"],
            "cost_details": usage["cost_details"]}


async def _events(chunks: AsyncIterator[dict], message_id: str) -> AsyncIterator[dict]:
    """The chat chunks of one choice as Anthropic's stream events; each content block opened, filled and closed."""
    async with aclosing(chunks):
        first = await anext(chunks)  # the role chunk, at once: it names the model that answers
        # The next comes with the first output, once the prefix cache's share of the prompt is known: input_tokens
        # leaves those out, as message_delta's (and Anthropic's) do.
        following = await anext(chunks, None)
        counted = following["usage"] if following is not None else first["usage"]
        cached = counted.get("prompt_tokens_details", {}).get("cached_tokens", 0)
        yield {"type": "message_start", "message": {
            "id": message_id, "type": "message", "role": "assistant", "model": first["model"], "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": counted["prompt_tokens"] - cached, "cache_read_input_tokens": cached,
                      "cache_creation_input_tokens": 0, "output_tokens": 0}}}
        blocks = 0  # content blocks opened so far; the last may be open
        open_kind: str | None = None
        finish_reason = stop_reason = usage = None
        called = False

        def start(block: dict) -> list[dict]:
            nonlocal blocks, open_kind
            events = [{"type": "content_block_stop", "index": blocks - 1}] if open_kind else []
            open_kind, blocks = block["type"], blocks + 1
            return events + [{"type": "content_block_start", "index": blocks - 1, "content_block": block}]

        def delta(kind: str, block: dict, fields: dict) -> list[dict]:
            events = start(block) if open_kind != kind else []
            return events + [{"type": "content_block_delta", "index": blocks - 1, "delta": fields}]

        async for chunk in _after(following, chunks):
            if not chunk["choices"] and chunk.get("usage") is not None:  # the last: the whole usage
                usage = _usage(chunk["usage"])
            for choice in chunk["choices"]:
                finish_reason = choice["finish_reason"] or finish_reason
                stop_reason = choice.get("stop_reason") if choice["finish_reason"] else stop_reason
                fields = choice["delta"]
                events = []
                if text := fields.get("reasoning_content"):
                    events += delta("thinking", {"type": "thinking", "thinking": "", "signature": ""},
                                    {"type": "thinking_delta", "thinking": text})
                if text := fields.get("content"):
                    events += delta("text", {"type": "text", "text": ""}, {"type": "text_delta", "text": text})
                for call in fields.get("tool_calls", []):
                    if "id" in call:  # a call's first delta: its id and name
                        called = True
                        events += start({"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
                                         "input": {}})
                    elif call["function"]["arguments"]:
                        events.append({"type": "content_block_delta", "index": blocks - 1, "delta": {
                            "type": "input_json_delta", "partial_json": call["function"]["arguments"]}})
                for event in events:
                    yield event
        if open_kind:
            yield {"type": "content_block_stop", "index": blocks - 1}
        yield {"type": "message_delta", "delta": _stop(finish_reason, stop_reason, called), "usage": usage}
        yield {"type": "message_stop"}


async def _after(head: dict | None, rest: AsyncIterator[dict]) -> AsyncIterator[dict]:
    """head (unless None), then the rest."""
    if head is not None:
        yield head
    async for item in rest:
        yield item


def _error_event(error: APIError) -> dict:
    """Anthropic's stream error event."""
    return anthropic_error(error.status, error.body["error"])
