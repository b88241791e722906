"""OpenAI request bodies as pydantic models, and their translation to SamplingParams."""

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from tokenmill.errors import InvalidRequestError
from tokenmill.sampling import SamplingParams


T = TypeVar("T")

# OpenAI's own limit on choices per request; more would let one request fill the whole batch.
MAX_N = 128


def _or(value: T | None, default: T) -> T:
    return default if value is None else value


class StreamOptions(BaseModel):
    """`stream_options`: whether the stream ends with a usage-only chunk."""

    include_usage: bool = False


class TextPart(BaseModel):
    """One text part of a content list."""

    type: Literal["text"]
    text: str


class Prediction(BaseModel):
    """OpenAI's predicted output: text the answer will mostly repeat, as a string or text parts."""

    type: Literal["content"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        """The predicted text, its parts joined."""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class _GenerationRequest(BaseModel):
    """Fields shared by completions and chat completions, plus vLLM's sampling extensions."""

    # Unknown fields are ignored, as OpenAI does, so clients that send newer fields keep working.
    model_config = ConfigDict(extra="ignore")

    # OpenAI marks these nullable; None means the default, as there.
    model: str | None = None
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    prediction: Prediction | None = None
    # Accepted so they can be refused by name rather than silently ignored.
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    # Extensions named as in vLLM.
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] = Field(default_factory=list)
    include_stop_str_in_output: bool = False
    priority: int = 0

    @property
    def include_usage(self) -> bool:
        """True when a streamed response should end with a usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """SamplingParams from the shared fields; raises InvalidRequestError naming the bad field."""
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options is only allowed when stream is true", param="stream_options")
        if self.n is not None and self.n > MAX_N:
            raise InvalidRequestError(f"n={self.n} must be at most {MAX_N}", param="n")
        self._refuse_unsupported()
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(
            n=_or(self.n, 1), temperature=_or(self.temperature, 1.0), top_p=_or(self.top_p, 1.0), top_k=self.top_k,
            min_p=self.min_p, repetition_penalty=self.repetition_penalty,
            presence_penalty=_or(self.presence_penalty, 0.0), frequency_penalty=_or(self.frequency_penalty, 0.0),
            seed=self.seed, max_tokens=max_tokens,
            min_tokens=self.min_tokens, stop=stop, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
            logprobs=logprobs, include_stop_str_in_output=self.include_stop_str_in_output, priority=self.priority,
            prediction=self.prediction.text if self.prediction else None,
        )

    def _refuse_unsupported(self) -> None:
        if self.logit_bias:
            raise InvalidRequestError("logit_bias is not supported", param="logit_bias")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise InvalidRequestError("response_format other than text (JSON mode) is not supported",
                                      param="response_format")
        if self.tools or self.tool_choice not in (None, "none"):
            raise InvalidRequestError("tools and tool_choice (function calling) are not supported", param="tools")


class CompletionRequest(_GenerationRequest):
    """POST /v1/completions."""

    prompt: str | list[int] | list[str | list[int]]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None

    def sampling_params(self) -> SamplingParams:
        """Validated sampling settings for every prompt of this request."""
        if self.suffix:
            raise InvalidRequestError("suffix (fill-in-the-middle) is not supported", param="suffix")
        params = self._sampling_params(self.max_tokens, self.logprobs)
        if self.echo and self.logprobs is not None:
            params.prompt_logprobs = self.logprobs  # echoed prompt tokens carry logprobs too
        return params


class ChatMessage(BaseModel):
    """One message of a conversation; content is text or a list of text parts."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's content as one string; only text parts are supported."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequestError(
                    f"content part of type {part.get('type')!r} is not supported; this model reads text only",
                    param="messages",
                )
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_GenerationRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    def sampling_params(self) -> SamplingParams:
        """Validated sampling settings; max_completion_tokens wins over the older max_tokens."""
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs set to true", param="top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self._sampling_params(max_tokens, logprobs)

    def conversation(self) -> list[dict[str, str]]:
        """Messages as plain dicts for the chat template; `developer` is OpenAI's newer name for `system`."""
        messages = []
        for m in self.messages:
            message = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if m.name is not None:
                message["name"] = m.name
            messages.append(message)
        return messages
