"""OpenAI's Responses API request body, and its translation to the chat completions request that answers it."""

import re
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, Field

from tokenmill.errors import InvalidRequestError
from tokenmill.server.protocol import ChatCompletionRequest, RequestBody, required_string, translated_chat

# Include values that ask for output this server shows: a token's logprobs. The others name output of hosted tools
# or reasoning items, which no answer here has, so asking for them changes nothing (Codex asks for
# reasoning.encrypted_content on every turn).
LOGPROBS_INCLUDE = "message.output_text.logprobs"
# Fields that need a response stored by an earlier request; this server keeps none.
_STATEFUL = ("previous_response_id", "conversation", "prompt")
# Chat fields as the Responses API names them, for the `param` of an error the chat path raised.
PARAMS = {"messages": "input", "max_completion_tokens": "max_output_tokens", "response_format": "text.format",
          "reasoning_effort": "reasoning.effort"}


class TextFormat(BaseModel):
    """`text.format`: plain text, any JSON object, or JSON matching the named schema."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    # `schema` shadows a BaseModel attribute, hence the alias.
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(BaseModel):
    """`text`: the output's format."""

    format: TextFormat | None = None


class ResponsesRequest(RequestBody):
    """POST /v1/responses: stateless; each request carries its whole conversation as `input`."""

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: dict[str, Any] | None = None
    stream: bool | None = None
    # Accepted and answered as false: nothing is kept, so a later request cannot name this one.
    store: bool | None = None
    metadata: dict[str, str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    top_logprobs: int | None = None
    include: list[str] | None = None
    user: str | None = None
    background: bool | None = None
    previous_response_id: str | None = None
    conversation: Any = None
    prompt: Any = None
    # vLLM's sampling extensions, as its Responses endpoint takes them.
    seed: int | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: str | list[str] | None = None
    priority: int | None = None
    cache_salt: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None  # beside text.format: a regex, a choice or a grammar

    def chat_request(self, kept: Callable[[str], dict | None] = lambda _: None) -> ChatCompletionRequest:
        """The chat completions request that answers this one, an item_reference read as the item `kept` gives for
        its id (None: not kept); 400 naming the field this server cannot do."""
        for name in _STATEFUL:
            if getattr(self, name) is not None:
                raise InvalidRequestError(f"{name} is not supported: this server stores no responses or prompts; "
                                          "send the whole conversation as input", param=name)
        if self.background:
            raise InvalidRequestError("background is not supported: this server stores no responses to poll; "
                                      "stream the answer instead", param="background")
        if self.max_output_tokens is not None and self.max_output_tokens < 1:  # else chat's field would be named
            raise InvalidRequestError(f"max_output_tokens={self.max_output_tokens} must be at least 1",
                                      param="max_output_tokens")
        logprobs = LOGPROBS_INCLUDE in (self.include or [])  # top_logprobs alone asks for none, as OpenAI's
        chat = {
            "model": self.model, "messages": self._messages(kept), "max_completion_tokens": self.max_output_tokens,
            "temperature": self.temperature, "top_p": self.top_p, "stream": self.stream,
            # The stream's last chunk carries the usage, for the final response.completed event.
            "stream_options": {"include_usage": True} if self.stream else None,
            "tools": [_tool(f, path) for path, f, _ in _offered(self.tools or [])] or None,
            "tool_choice": _tool_choice(self.tool_choice), "parallel_tool_calls": self.parallel_tool_calls,
            "response_format": _response_format(self.text.format) if self.text and self.text.format else None,
            "structured_outputs": self.structured_outputs,
            "logprobs": logprobs or None, "top_logprobs": self.top_logprobs if logprobs else None,
            "truncate_prompt_tokens": -1 if self.truncation == "auto" else None,
            "seed": self.seed, "top_k": self.top_k, "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty, "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty, "stop": self.stop, "priority": self.priority,
            "cache_salt": self.cache_salt, "chat_template_kwargs": self.chat_template_kwargs, "user": self.user,
            # As vLLM: the chat template decides what it means.
            "reasoning_effort": (self.reasoning or {}).get("effort"),
        }
        return translated_chat(chat, PARAMS)

    def namespaces(self) -> dict[str, str]:
        """Each function offered inside a namespace tool, by name, with its namespace's name."""
        return {f["name"]: namespace for _, f, namespace in _offered(self.tools or []) if namespace is not None}

    def _messages(self, kept: Callable[[str], dict | None]) -> list[dict[str, Any]]:
        """`instructions` and `input` as chat messages: function calls join the assistant turn before them, and an
        item_reference is the kept item it names."""
        messages: list[dict[str, Any]] = []
        if self.instructions:
            messages.append({"role": "system", "content": self.instructions})
        if isinstance(self.input, str):
            return messages + [{"role": "user", "content": self.input}]
        for i, item in enumerate(self.input):
            param = f"input[{i}]"
            kind = item.get("type", "message")
            if kind == "item_reference":
                item_id = required_string(item, "id", param)
                if (item := kept(item_id)) is None:
                    raise InvalidRequestError(f"{param}.id {item_id!r} names no item of this server's recent answers "
                                              "(it keeps the last ones only); send the item itself",
                                              param=f"{param}.id")
                kind = item["type"]
            if kind == "message":
                if item.get("role") not in ("user", "assistant", "system", "developer"):
                    raise InvalidRequestError(f"{param}.role must be user, assistant, system or developer",
                                              param=param)
                messages.append({"role": item["role"], "content": _text(item.get("content"), f"{param}.content")})
            elif kind == "function_call":
                call = {"id": required_string(item, "call_id", param), "type": "function",
                        "function": {"name": required_string(item, "name", param),
                                     "arguments": required_string(item, "arguments", param)}}
                if messages and messages[-1]["role"] == "assistant":
                    messages[-1].setdefault("tool_calls", []).append(call)
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif kind == "function_call_output":
                messages.append({"role": "tool", "tool_call_id": required_string(item, "call_id", param),
                                 "content": _text(item.get("output"), f"{param}.output")})
            elif kind == "reasoning":
                continue  # another server's, in a conversation carried over: as vLLM, not part of the prompt
            else:
                raise InvalidRequestError(f"{param} is an item of type {kind!r}, which this server does not take; "
                                          "send message, function_call, function_call_output, reasoning and "
                                          "item_reference items",
                                          param=param)
        if not messages:
            raise InvalidRequestError("input holds no message", param="input")
        return messages


def _text(content: Any, param: str) -> str:
    """A message's content (a string or input_text/output_text/refusal parts) as one string."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequestError(f"{param} must be a string or a list of text parts", param=param)
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        key = "refusal" if kind == "refusal" else "text"
        if kind not in ("input_text", "output_text", "text", "refusal") or not isinstance(part.get(key), str):
            raise InvalidRequestError(f"{param} has a part of type {kind!r}; this model reads text only", param=param)
        parts.append(part[key])
    return "\n".join(parts)  # as chat joins its text parts


def _offered(tools: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], str | None]]:
    """Each tool with the request path it came from and its namespace: a namespace tool's functions (Codex sends its
    sub-agent tools so) are function tools the client runs like any other. 400 for a name given twice, which would
    leave a call's function, or its namespace, ambiguous."""
    offered: list[tuple[str, dict[str, Any], str | None]] = []
    for i, tool in enumerate(tools):
        if tool.get("type") != "namespace":
            offered.append((f"tools[{i}]", tool, None))
            continue
        inner = tool.get("tools")
        if not isinstance(tool.get("name"), str) or not isinstance(inner, list) or \
                not all(isinstance(f, dict) for f in inner):
            raise InvalidRequestError(f"tools[{i}] needs a name and the list of the namespace's function tools",
                                      param=f"tools[{i}]")
        offered += [(f"tools[{i}].tools[{j}]", f, tool["name"]) for j, f in enumerate(inner)]
    seen: set[str] = set()
    for path, tool, _ in offered:
        if tool.get("name") in seen:
            raise InvalidRequestError(f"{path}.name: a function named {tool['name']!r} is offered twice",
                                      param=f"{path}.name")
        if isinstance(tool.get("name"), str):
            seen.add(tool["name"])
    return offered


def _tool(tool: dict[str, Any], path: str) -> dict[str, Any]:
    """A Responses function tool (flat) as chat's (nested under `function`)."""
    if tool.get("type") != "function":
        raise InvalidRequestError(f"{path} is of type {tool.get('type')!r}; this server runs no hosted tools, only "
                                  "function tools that the client calls", param=f"{path}.type")
    if not isinstance(tool.get("name"), str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", tool["name"]):
        raise InvalidRequestError(f"{path}.name must be 1 to 64 letters, digits, _ or -", param=f"{path}.name")
    return {"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters", "strict")
                                             if tool.get(k) is not None}}


def _tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if not isinstance(choice, dict):
        return choice
    if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
        raise InvalidRequestError(f"tool_choice of type {choice.get('type')!r} is not supported; name a function "
                                  "tool ({\"type\": \"function\", \"name\": ...}) or use none, auto or required",
                                  param="tool_choice")
    return {"type": "function", "function": {"name": choice["name"]}}


def _response_format(format: TextFormat) -> dict[str, Any]:
    """`text.format` as chat's response_format: the Responses API names the schema's fields one level up."""
    if format.type != "json_schema":
        return {"type": format.type}
    if format.schema_ is None:  # required there, as OpenAI's; chat takes a json_schema without one as any object
        raise InvalidRequestError("text.format of type json_schema needs a schema", param="text.format.schema")
    return {"type": "json_schema", "json_schema": format.model_dump(by_alias=True, exclude={"type"})}
