"""Anthropic's Messages API request body, and its translation to the chat completions request that answers it."""

import json
import re
from typing import Any

from pydantic import Field

from tokenmill.errors import InvalidRequestError
from tokenmill.server.protocol import ChatCompletionRequest, RequestBody, required_string, translated_chat

# Chat fields as Anthropic's Messages API names them, for the `param` of an error the chat path raised.
_PARAMS = {"stop": "stop_sequences", "response_format": "output_config.format"}
# Anthropic's tool_choice types as chat's.
_TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}
_BILLING = "x-anthropic-billing-header"


class MessagesRequest(RequestBody):
    """POST /v1/messages: a system prompt, the conversation as user and assistant turns of content blocks."""

    model: str | None = None
    max_tokens: int
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    stream: bool | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)  # Anthropic's range, not OpenAI's 0 to 2
    top_p: float | None = None
    top_k: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    # {"type": "enabled" | "adaptive" | "disabled"}: given to the chat template as Qwen3's enable_thinking.
    thinking: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    mcp_servers: list[Any] | None = None
    structured_outputs: dict[str, Any] | None = None  # vLLM's, as on chat: a JSON schema, regex, choice or grammar
    # {"format": {"type": "json_schema", "schema": ...}}: what the SDK's messages.parse sends (output_format before).
    output_config: dict[str, Any] | None = None
    output_format: dict[str, Any] | None = None

    def chat_request(self) -> ChatCompletionRequest:
        """The chat completions request that answers this one; 400 naming the field this server cannot do."""
        if self.mcp_servers:
            raise InvalidRequestError("mcp_servers is not supported: this server calls no tools itself; give them as "
                                      "tools and run them in the client", param="mcp_servers")
        choice = self.tool_choice or {}
        if choice and choice.get("type") not in (*_TOOL_CHOICES, "tool"):
            raise InvalidRequestError(f"tool_choice of type {choice.get('type')!r} is not one of auto, any, tool, "
                                      "none", param="tool_choice")
        if choice.get("type") == "tool" and not isinstance(choice.get("name"), str):
            raise InvalidRequestError("tool_choice of type tool needs the tool's name", param="tool_choice.name")
        thinking = (self.thinking or {}).get("type")  # enabled, adaptive or disabled
        messages = self._messages()
        # As Anthropic: a final assistant turn of text is a prefill, which the answer continues (decided on the turns
        # as converted: one of only thinking is none, and the user's turn must not be left open).
        prefill = bool(messages) and messages[-1]["role"] == "assistant" and not messages[-1].get("tool_calls")
        text = messages[-1].get("content") if prefill else None
        if isinstance(text, str) and text != text.rstrip():  # Anthropic's 400: the answer would start mid-token
            raise InvalidRequestError("final assistant content cannot end with trailing whitespace",
                                      param=f"messages[{len(self.messages) - 1}].content")
        chat = {
            "model": self.model, "messages": messages, "max_tokens": self.max_tokens,
            "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "stop": self.stop_sequences,
            # The usage on every chunk: message_start counts the prompt's tokens before any output.
            "stream": self.stream,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True} if self.stream else None,
            "continue_final_message": prefill or None, "add_generation_prompt": False if prefill else None,
            "tools": [_tool(t, i) for i, t in enumerate(self.tools)] if self.tools else None,
            "tool_choice": ({"type": "function", "function": {"name": choice.get("name")}}
                            if choice.get("type") == "tool" else _TOOL_CHOICES.get(choice.get("type"))),
            "parallel_tool_calls": False if choice.get("disable_parallel_tool_use") else None,
            "chat_template_kwargs": {"enable_thinking": thinking != "disabled"} if thinking else None,
            "structured_outputs": self.structured_outputs, "response_format": self._response_format(),
        }
        return translated_chat(chat, _PARAMS)

    def _response_format(self) -> dict[str, Any] | None:
        """output_config's format (or the older output_format) as chat's response_format."""
        if self.output_config is not None:
            where, given = "output_config.format", self.output_config.get("format")
        else:
            where, given = "output_format", self.output_format
        if given is None:
            return None
        schema = given.get("schema") if isinstance(given, dict) and given.get("type") == "json_schema" else None
        if not isinstance(schema, dict):
            raise InvalidRequestError(f'{where} must be {{"type": "json_schema", "schema": {{...}}}}', param=where)
        return {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}

    def _messages(self) -> list[dict[str, Any]]:
        """`system` and the turns as chat messages: tool_use blocks become the turn's tool calls, tool_result
        blocks tool messages, thinking blocks (a reasoning model's, replayed) are left out; system turns among the
        messages (Claude Code's reminders) join the system prompt, as vLLM folds them, since templates take one."""
        system = [_text(_without_billing(self.system), "system")] if self.system else []
        messages: list[dict[str, Any]] = []
        for i, message in enumerate(self.messages):
            param = f"messages[{i}]"
            role, content = message.get("role"), message.get("content")
            if role == "system":
                system.append(_text(content, f"{param}.content"))
                continue
            if role not in ("user", "assistant"):
                raise InvalidRequestError(f"{param}.role must be user, assistant or system", param=f"{param}.role")
            blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(blocks, list):
                raise InvalidRequestError(f"{param}.content must be a string or a list of content blocks",
                                          param=f"{param}.content")
            texts, calls = [], []
            for j, block in enumerate(blocks):
                where = f"{param}.content[{j}]"
                kind = block.get("type") if isinstance(block, dict) else None
                if kind == "text":
                    texts.append(required_string(block, "text", where))
                elif kind == "tool_use" and role == "assistant":
                    calls.append({"id": required_string(block, "id", where), "type": "function",
                                  "function": {"name": required_string(block, "name", where),
                                               "arguments": json.dumps(block.get("input", {}))}})
                elif kind == "tool_result" and role == "user":
                    messages.append({"role": "tool", "tool_call_id": required_string(block, "tool_use_id", where),
                                     "content": _text(block.get("content", ""), f"{where}.content")})
                elif kind not in ("thinking", "redacted_thinking") or role != "assistant":
                    raise InvalidRequestError(f"{where} is a block of type {kind!r}, which this server does not "
                                              "take here; this model reads text, tool_use and tool_result blocks",
                                              param=where)
            if texts or calls or not blocks:
                messages.append({"role": role, "content": "\n".join(texts) if texts or not calls else None,
                                 **({"tool_calls": calls} if calls else {})})
        return ([{"role": "system", "content": "\n".join(system)}] if system else []) + messages


class CountTokensRequest(MessagesRequest):
    """POST /v1/messages/count_tokens: a Messages request without max_tokens."""

    max_tokens: int | None = None


def _without_billing(system: str | list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """The system prompt without Claude Code's billing block, whose hash changes every request: at the prompt's
    start it left nothing of the rest (20,000 tokens of instructions and tools) to the prefix cache. vLLM drops it
    too."""
    if isinstance(system, str):
        return system
    return [b for b in system if not (isinstance(b, dict) and str(b.get("text", "")).startswith(_BILLING))]


def _text(content: Any, param: str) -> str:
    """A string, or text blocks joined (as chat joins its text parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(b, dict) and b.get("type") == "text"
                                         and isinstance(b.get("text"), str) for b in content):
        return "\n".join(b["text"] for b in content)
    raise InvalidRequestError(f"{param} must be a string or a list of text blocks; this model reads text only",
                              param=param)


def _tool(tool: dict[str, Any], i: int) -> dict[str, Any]:
    """An Anthropic tool (name, description, input_schema) as chat's function tool."""
    if "input_schema" not in tool:  # a server tool (web_search_..., bash_...), run by Anthropic's servers
        raise InvalidRequestError(f"tools[{i}] has no input_schema; this server runs no server tools, only tools "
                                  "the client runs", param=f"tools[{i}]")
    function = {"name": tool.get("name"), "parameters": tool["input_schema"]}
    if tool.get("description") is not None:
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


def their_param(param: str | None) -> str | None:
    """A chat field an error names, as this API names it: a tool's parameters are its input_schema."""
    if param is None:
        return None
    return _PARAMS.get(param) or re.sub(r"^(tools\[\d+\])\.parameters\b", r"\1.input_schema", param)
