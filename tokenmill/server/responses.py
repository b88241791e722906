"""POST /v1/responses: OpenAI's Responses API, stateless, answered by the chat completions path and re-shaped.

The conversation comes whole in `input` (messages, function calls and their outputs, or references to output items
this server returned lately: response_items.py); the answer's output items
are its thinking (with --reasoning-parser), a message and the function calls the model made, as OpenAI's.
Streamed, the chat chunks become Responses events: response.created, then per output item its added, delta and
done events, then response.completed (or response.incomplete when max_output_tokens cut the answer).
"""

import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

from fastapi import Request, Response

from tokenmill.errors import InvalidRequestError
from tokenmill.server.chat import answer_chat
from tokenmill.server.errors import APIError
from tokenmill.server.responses_protocol import PARAMS, ResponsesRequest
from tokenmill.server.serving import EventStream, named_sse, state_of


async def create_response(body: ResponsesRequest, request: Request, response: Response) -> dict | EventStream:
    """Answer one conversation with a response object, or its events when streamed."""
    kept = state_of(request).response_items
    chat = body.chat_request(kept.get)
    try:
        answer = await answer_chat(chat, request, response)
    except InvalidRequestError as exc:
        exc.param = PARAMS.get(exc.param, exc.param)
        raise
    response_id, created = _id("resp"), int(time.time())  # whole seconds, as OpenAI's and vLLM's
    # As OpenAI's store (on unless false): the output items kept for a later request's item_reference.
    keep = kept.keep if body.store is not False else lambda items: None
    if isinstance(answer, dict):
        choice = answer["choices"][0]
        status = _status(choice["finish_reason"])
        output = _output(choice, status, body.namespaces())
        keep(output)
        return {**_response(body, response_id, created, answer["model"], status), "output": output,
                "usage": _usage(answer["usage"])}
    events = _events(answer.chunks, body, response_id, created, keep)
    return EventStream(events, answer.streams, answer.headers,
                       encode=lambda chunks: named_sse(chunks, _error_event, numbered=True))


async def stored_response(response_id: str) -> None:
    """GET, DELETE or cancel of a stored response: this server stores none."""
    raise APIError(404, f"no response {response_id!r}: this server stores no responses (each is answered as if "
                   "store were false)", param="response_id", code="response_not_found")


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"  # OpenAI's: resp_..., msg_..., fc_...


def _status(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def _response(body: ResponsesRequest, response_id: str, created: int, model: str, status: str) -> dict:
    """The response object's fields besides its output and usage: the request's settings echoed, as OpenAI's."""
    return {
        "id": response_id, "object": "response", "created_at": created, "status": status, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens, "model": model,
        "output": [], "parallel_tool_calls": body.parallel_tool_calls is not False, "previous_response_id": None,
        "reasoning": body.reasoning, "store": False, "temperature": body.temperature,
        "text": {"format": body.text.format.model_dump(by_alias=True, exclude_none=True)
                 if body.text and body.text.format else {"type": "text"}},
        "tool_choice": body.tool_choice or "auto", "tools": body.tools or [], "top_p": body.top_p,
        "truncation": body.truncation or "disabled", "usage": None, "metadata": body.metadata or {},
        "user": body.user,
    }


def _message(text: str, logprobs: list[dict] | None, status: str) -> dict:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}
    return {"type": "message", "id": _id("msg"), "status": status, "role": "assistant",
            "content": [part]}


def _reasoning(text: str, status: str) -> dict:
    """The thinking a --reasoning-parser split off, as OpenAI's reasoning item with its text."""
    return {"type": "reasoning", "id": _id("rs"), "summary": [], "status": status,
            "content": [{"type": "reasoning_text", "text": text}]}


def _call(call_id: str, name: str, arguments: str, status: str, namespaces: dict[str, str]) -> dict:
    """A function_call item; a function offered inside a namespace tool names its namespace, as OpenAI's."""
    return {"type": "function_call", "id": _id("fc"), "call_id": call_id, "name": name, "arguments": arguments,
            "status": status, **({"namespace": namespaces[name]} if name in namespaces else {})}


def _output(choice: dict, status: str, namespaces: dict[str, str]) -> list[dict]:
    """A chat choice's message as output items: its thinking, its text (left out when the model only called), then
    each call."""
    message = choice["message"]
    calls = message.get("tool_calls") or []
    # As a stream closes them: the last item has the answer's status (max_tokens may have cut it), the others are
    # complete; an answer of nothing is an empty message, and empty thinking is no item.
    items = [_reasoning(message["reasoning_content"], "completed" if message["content"] or calls else status)] \
        if message.get("reasoning_content") else []
    if message["content"] or not (calls or items):
        logprobs = choice["logprobs"]["content"] if choice["logprobs"] else None
        items.append(_message(message["content"] or "", logprobs, "completed" if calls else status))
    return items + [_call(c["id"], c["function"]["name"], c["function"]["arguments"],
                          status if i == len(calls) - 1 else "completed", namespaces) for i, c in enumerate(calls)]


def _usage(usage: dict) -> dict:
    """Chat's usage block in the Responses API's names, its cost kept."""
    return {
        "input_tokens": usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]},
        "output_tokens": usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage["total_tokens"], "cost": usage["cost"], "cost_details": usage["cost_details"],
    }


async def _events(chunks: AsyncIterator[dict], body: ResponsesRequest, response_id: str, created: int,
                  keep: Callable[[list[dict]], None]) -> AsyncIterator[dict]:
    """The chat chunks of one choice as Responses events, each output item opened, filled and closed in turn."""
    async with aclosing(chunks):
        first = await anext(chunks)  # the role chunk, at once: it names the model that answers
        head = _response(body, response_id, created, first["model"], "in_progress")
        yield {"type": "response.created", "response": head}
        yield {"type": "response.in_progress", "response": head}
        items: list[dict] = []  # every output item so far; the last may be open
        open_item: dict | None = None
        logprobs: list[dict] = []  # the open message's, all of them
        pending: list[dict] = []  # logprobs of tokens whose text has not come out yet
        usage, status, deadline = None, "completed", None

        def close(last: bool = False) -> list[dict]:
            """Events that finish the open item, if any; the last item has the answer's status (cut or not)."""
            nonlocal open_item
            if open_item is None:
                return []
            item, open_item = open_item, None
            index = len(items) - 1
            if item["type"] == "function_call":
                item = {**item, "status": status if last else "completed"}
                events = [{"type": "response.function_call_arguments.done", "item_id": item["id"],
                           "output_index": index, "name": item["name"], "arguments": item["arguments"]}]
            elif item["type"] == "reasoning":
                item = {**item, "status": status if last else "completed"}
                events = [{"type": "response.reasoning_text.done", "item_id": item["id"], "output_index": index,
                           "content_index": 0, "text": item["content"][0]["text"]}]
            else:
                part = item["content"][0]
                part["logprobs"] = logprobs + pending
                item = {**item, "status": status if last else "completed"}
                events = [{"type": "response.output_text.done", "item_id": item["id"], "output_index": index,
                           "content_index": 0, "text": part["text"], "logprobs": part["logprobs"]},
                          {"type": "response.content_part.done", "item_id": item["id"], "output_index": index,
                           "content_index": 0, "part": part}]
            items[index] = item
            return events + [{"type": "response.output_item.done", "output_index": index, "item": item}]

        def start(item: dict) -> list[dict]:
            """Events that finish the open item and open this one (announced empty)."""
            nonlocal open_item
            events = close()
            open_item = item
            items.append(item)
            index = len(items) - 1
            events.append({"type": "response.output_item.added", "output_index": index,
                           "item": {**item, "content": []} if "content" in item else {**item}})
            if item["type"] == "message":
                logprobs.clear()
                events.append({"type": "response.content_part.added", "item_id": item["id"], "output_index": index,
                               "content_index": 0, "part": {**item["content"][0]}})
            return events

        async for chunk in chunks:
            if "usage" in chunk and chunk["usage"] is not None and not chunk["choices"]:
                usage = _usage(chunk["usage"])
            deadline = chunk.get("deadline_status", deadline)
            for choice in chunk["choices"]:
                delta = choice["delta"]
                if choice["finish_reason"] is not None:
                    status = _status(choice["finish_reason"])
                if choice["logprobs"]:
                    pending += choice["logprobs"]["content"]
                if text := delta.get("reasoning_content"):
                    if open_item is None or open_item["type"] != "reasoning":
                        for event in start(_reasoning("", "in_progress")):
                            yield event
                    open_item["content"][0]["text"] += text
                    yield {"type": "response.reasoning_text.delta", "item_id": open_item["id"],
                           "output_index": len(items) - 1, "content_index": 0, "delta": text}
                if text := delta.get("content"):
                    if open_item is None or open_item["type"] != "message":
                        for event in start(_message("", None, "in_progress")):
                            yield event
                    open_item["content"][0]["text"] += text
                    yield {"type": "response.output_text.delta", "item_id": open_item["id"],
                           "output_index": len(items) - 1, "content_index": 0, "delta": text, "logprobs": pending}
                    logprobs.extend(pending)
                    pending = []
                for call in delta.get("tool_calls", []):
                    if "id" in call:  # a call's first delta: its id and name
                        for event in start(_call(call["id"], call["function"]["name"], "", "in_progress",
                                                 body.namespaces())):
                            yield event
                    elif call["function"]["arguments"]:
                        open_item["arguments"] += call["function"]["arguments"]
                        yield {"type": "response.function_call_arguments.delta", "item_id": open_item["id"],
                               "output_index": len(items) - 1, "delta": call["function"]["arguments"]}
        if not items:  # an empty answer is still a message, as whole
            for event in start(_message("", None, "in_progress")):
                yield event
        for event in close(last=True):
            yield event
        keep(items)
        final = {**_response(body, response_id, created, head["model"], status), "output": items, "usage": usage}
        if deadline is not None:
            final["deadline_status"] = deadline
        yield {"type": f"response.{status}", "response": final}


def _error_event(error: APIError) -> dict:
    """OpenAI's stream error event."""
    fields = error.body["error"]
    return {"type": "error", "code": fields["code"] or fields["type"], "message": fields["message"],
            "param": fields["param"]}
