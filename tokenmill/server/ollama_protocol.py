"""Ollama's API request bodies (/api/chat, /api/generate, /api/embed) and their translation to the chat and
completions requests that answer them."""

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from tokenmill.errors import InvalidRequestError
from tokenmill.server.protocol import (ChatCompletionRequest, CompletionRequest, RequestBody, penalty_window,
                                       translated_chat)

# Ollama's options as the chat and completions fields they set; unset ones take the model's own defaults, as an
# Ollama Modelfile's parameters do. Options for Ollama's runner (num_gpu, num_thread, ...) are let be.
_OPTIONS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p", "seed": "seed",
            "stop": "stop", "repeat_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
            "frequency_penalty": "frequency_penalty"}
# Samplers this engine does not have, at the values that leave them off.
_OFF = {"mirostat": 0, "typical_p": 1.0, "tfs_z": 1.0}


def served_name(name: str) -> str:
    """Ollama's name:tag as a served name: the latest tag is the model itself."""
    return name.removesuffix(":latest")


class OllamaRequest(RequestBody):
    """Fields every generating request shares."""

    model: str
    options: dict[str, Any] | None = None
    format: str | dict[str, Any] | None = None  # "json", or a JSON schema
    stream: bool | None = None  # unset or null: Ollama's default, NDJSON lines
    think: bool | str | None = None  # true, false, or "low" / "medium" / "high"
    keep_alive: Any = None  # models stay loaded here: nothing to unload
    logprobs: bool | None = None  # each output token's logprob (top_logprobs: with its most likely alternatives)
    top_logprobs: int | None = None

    @property
    def loaded(self) -> str:
        """The done_reason of a request that only loads a model: "unload" with keep_alive 0, as Ollama's (every model
        here stays loaded; the answer says what was asked)."""
        return "unload" if self.keep_alive in (0, "0", "0s", "0m") else "load"

    @property
    def streamed(self) -> bool:
        """Whether the answer streams (Ollama's default)."""
        return self.stream is not False

    @property
    def served(self) -> str:
        """The served model it names (answers keep the name as sent)."""
        return served_name(self.model)

    def sampling(self) -> dict[str, Any]:
        """options and format as chat and completions fields; 400 naming the option this engine cannot honour."""
        options = {k: v for k, v in (self.options or {}).items() if v is not None}
        for name, off in _OFF.items():
            if name in options and options[name] != off:
                raise InvalidRequestError(f"options.{name} is not supported: this engine samples with temperature, "
                                          "top_k, top_p, min_p and the penalties", param=f"options.{name}")
        fields = {field: options[name] for name, field in _OPTIONS.items() if name in options}
        if self.penalty_window() == 0:  # repeat_last_n 0 turns the three penalties off, the model's defaults too
            fields |= {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}
        limit = options.get("num_predict")
        # 0 and any negative (-1 no limit, -2 fill the context, as Ollama reads them): ours, the context's end.
        unlimited = isinstance(limit, (int, float)) and not isinstance(limit, bool) and limit <= 0
        if limit is not None and not unlimited:
            fields["max_tokens"] = limit
        if self.format == "json":
            fields["response_format"] = {"type": "json_object"}
        elif isinstance(self.format, dict):
            fields["response_format"] = {"type": "json_schema",
                                         "json_schema": {"name": "format", "schema": self.format}}
        elif self.format:
            raise InvalidRequestError(f"format {self.format!r} must be \"json\" or a JSON schema", param="format")
        return fields

    def penalty_window(self) -> int:
        """options.repeat_last_n (Ollama's default 64) as the penalties' window: 0 none, -1 the whole context."""
        last_n = (self.options or {}).get("repeat_last_n")
        return penalty_window(64 if last_n is None else last_n, "options.repeat_last_n")  # null: unset

    def _logprobs(self) -> dict[str, Any]:
        """logprobs and top_logprobs as chat's fields: chat's logprobs block is Ollama's list, token by token."""
        if not self.logprobs and not self.top_logprobs:
            return {}
        return {"logprobs": True, "top_logprobs": self.top_logprobs or 0}

    def _streaming(self) -> dict[str, Any]:
        """stream as chat's and completions' fields: the last chunk's usage carries the counts and durations."""
        return {"stream": self.streamed, "stream_options": {"include_usage": True} if self.streamed else None}

    def thinking(self) -> dict[str, Any]:
        """think as the chat template's variables: enable_thinking, and a level as reasoning_effort."""
        if self.think is None:
            return {}
        if isinstance(self.think, str) and self.think not in ("low", "medium", "high"):
            raise InvalidRequestError(f"think {self.think!r} must be true, false, \"low\", \"medium\" or \"high\"",
                                      param="think")
        levels = {"reasoning_effort": self.think} if isinstance(self.think, str) else {}
        return {"chat_template_kwargs": {"enable_thinking": bool(self.think)}, **levels}


class OllamaMessage(BaseModel):
    """One chat turn; a tool call's arguments come as an object, a tool result names its tool."""

    role: str
    content: str | None = None
    images: list[str] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    thinking: str | None = None  # a reasoning model's, replayed: left out, as chat leaves it
    tool_name: str | None = None


class OllamaChatRequest(OllamaRequest):
    """POST /api/chat."""

    messages: list[OllamaMessage] | None = None  # none (or null): Ollama's way to load the model
    tools: list[dict[str, Any]] | None = None
    truncate: bool | None = None  # unset: the oldest turns are dropped where the chat passes the context

    def chat_request(self) -> ChatCompletionRequest:
        """The chat completions request that answers this one."""
        messages = []
        for i, message in enumerate(self.messages or []):
            if message.images:
                raise InvalidRequestError(f"{self.model!r} does not support images; this server's models read text",
                                          param=f"messages[{i}].images")
            turn: dict[str, Any] = {"role": message.role.lower(), "content": message.content or ""}
            if message.tool_calls:
                turn["tool_calls"] = [_call(call, f"messages[{i}].tool_calls[{j}]")
                                      for j, call in enumerate(message.tool_calls)]
            if message.tool_name is not None:
                turn["name"] = message.tool_name
            messages.append(turn)
        # A final assistant turn is a prefill, continued as Ollama's templates leave it open (a reply steered to
        # start with "{"); it was answered from scratch after it.
        prefill = bool(messages) and messages[-1]["role"] == "assistant" and "tool_calls" not in messages[-1]
        fields = {"model": self.served, "messages": messages, "tools": self.tools or None, **self._streaming(),
                  **self.sampling(), **self.thinking(), **self._logprobs(),
                  **({"continue_final_message": True, "add_generation_prompt": False} if prefill else {})}
        return _capped(translated_chat(fields, {"max_tokens": "options.num_predict", "response_format": "format"}),
                       self.penalty_window())


class OllamaGenerateRequest(OllamaRequest):
    """POST /api/generate: a prompt, through the model's chat template unless raw."""

    prompt: str | None = None  # none (or null, or ""): Ollama's way to load the model
    system: str | None = None
    raw: bool = False
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None
    images: list[str] | None = None

    def refusals(self) -> None:
        """400 for what this server does not do (fill-in-the-middle, a per-request template, images, a returned
        context), and for what raw leaves out, as Ollama says."""
        if self.raw and (self.system or self.template or self.context):
            raise InvalidRequestError("raw mode does not support template, system, or context", param="raw")
        if self.context:
            raise InvalidRequestError("context is not supported: send the conversation to /api/chat", param="context")
        if self.suffix:
            raise InvalidRequestError(f"{self.model!r} does not support insert (suffix)", param="suffix")
        if self.template:
            raise InvalidRequestError("template is not supported: the model's own chat template renders the prompt",
                                      param="template")
        if self.images:
            raise InvalidRequestError(f"{self.model!r} does not support images", param="images")
        if self.raw and (self.logprobs or self.top_logprobs):
            raise InvalidRequestError("logprobs are given for the templated form here; send the prompt without raw",
                                      param="logprobs")

    def chat_request(self) -> ChatCompletionRequest:
        """The prompt (and system) as a one-turn chat, for the templated form."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        fields = {"model": self.served, "messages": [*messages, {"role": "user", "content": self.prompt}],
                  **self._streaming(), **self.sampling(), **self.thinking(), **self._logprobs()}
        return _capped(translated_chat(fields, {"max_tokens": "options.num_predict", "response_format": "format"}),
                       self.penalty_window())

    def completion_request(self) -> CompletionRequest:
        """The raw form: the prompt as it is, as a plain completion."""
        fields = {"model": self.served, "prompt": self.prompt, **self._streaming(),
                  "max_tokens": None, **self.sampling()}
        try:
            return _capped(CompletionRequest.model_validate(fields), self.penalty_window())
        except ValidationError as exc:
            raise InvalidRequestError(f"options: {exc.errors()[0]['msg']}", param="options") from exc


class OllamaEmbedRequest(RequestBody):
    """POST /api/embed (input: a string or strings) and the older /api/embeddings (prompt: one string)."""

    model: str
    input: str | list[str] | None = None
    prompt: str | None = None
    truncate: bool = True
    dimensions: int | None = None  # the embeddings' first this many numbers, renormalized, as /v1/embeddings'
    keep_alive: Any = None


Request = TypeVar("Request", ChatCompletionRequest, CompletionRequest)


def _capped(request: Request, window: int | None) -> Request:
    """The request with num_predict a cap, as Ollama's is: the context's end may cut the answer short; its penalties
    over the last `window` tokens."""
    request._fit_context = True
    request._repetition_window = window or None
    return request


def _call(call: dict[str, Any], where: str) -> dict[str, Any]:
    """An Ollama tool call (arguments an object) as chat's (arguments as JSON text)."""
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise InvalidRequestError(f"{where}.function must name the function called", param=f"{where}.function")
    arguments = function.get("arguments") or {}
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": call.get("id"), "type": "function", "function": {"name": function["name"], "arguments": text}}
