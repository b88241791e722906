"""OpenAI request bodies as pydantic models, and their translation to SamplingParams."""

import json
import math
import re
import sys
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from tokenmill.errors import InvalidRequestError
from tokenmill.sampling import SamplingParams
from tokenmill.structured.params import StructuredOutput
from tokenmill.loader.tokenizer import Tokenizer
from tokenmill.structured.tools import chat_prompt, forced_call


T = TypeVar("T")

# OpenAI's own limit on choices per request; more would let one request fill the whole batch.
MAX_N = 128
# Stop strings a request may give (OpenAI takes 4): every token of every sample is checked against each, and 100,000
# of them (a 1.5 MB body) cost 20 ms a token, the engine's whole batch waiting.
MAX_STOPS = 256
# Fields a request may send but the server does not do, with the value that asks for nothing (None: only null
# asks for nothing) and what to use instead.
_REFUSED: dict[str, tuple[Any, str]] = {
    "use_beam_search": (False, "sample n choices instead"),
    "allowed_token_ids": (None, "logit_bias can favour tokens; structured_outputs can restrict the output"),
    "bad_words": ([], "logit_bias -100 bans a token"),
    "logits_processors": ([], "logit_bias and the sampling fields shape the output"),
    "return_tokens_as_token_ids": (False, "tokenize the returned text, or read logprobs' bytes"),
    "truncation_side": ("left", "truncate_prompt_tokens keeps the prompt's last tokens"),
    "logprob_token_ids": (None, "logprobs gives the most likely tokens' log-probabilities"),
    "thinking_token_budget": (None, "max_tokens caps the whole answer, thinking included"),
    "repetition_detection": (None, "repetition_penalty discourages repeats"),
    "guided_whitespace_pattern": (None, "a JSON schema's output takes JSON's whitespace"),
}
# Chat's own: OpenAI's deprecated function calling, vLLM's per-request template and chat echo, audio output.
_CHAT_REFUSED = {
    **_REFUSED,
    "functions": ([], "send them as tools"),
    "function_call": ("none", "send it as tool_choice"),
    "chat_template": (None, "the model's own template renders every chat; chat_template_kwargs sets its variables"),
    "echo": (False, "the conversation sent is the prompt"),
    "modalities": (["text"], "this server answers with text"),
    "add_special_tokens": (False, "the chat template writes the model's special tokens"),
}

# Python's ints are unbounded, but every integer a request carries ends in an int64 tensor or a C++ library.
_INT64 = 2**63
# Nesting deeper than this has no use in a request, and code past the parser (schema compilers, the chat template)
# recurses over it: 900 levels of JSON schema overflowed Python's stack in the structured-output compiler.
MAX_DEPTH = 64


def _or(value: T | None, default: T) -> T:
    return default if value is None else value


class StreamOptions(BaseModel):
    """`stream_options`: whether the stream ends with a usage-only chunk, and (vLLM's) whether each chunk carries the
    usage so far."""

    # Unset, it follows continuous_usage_stats: asking for the running usage implies it, as vLLM (whose default
    # is true) reads it; `{}` alone keeps OpenAI's default, no usage.
    include_usage: bool | None = None
    continuous_usage_stats: bool = False


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


class JSONSchemaFormat(BaseModel):
    """`response_format.json_schema`: a named schema; strict or not, it is enforced (as vLLM does)."""

    name: str | None = None
    description: str | None = None
    # `schema` shadows a BaseModel attribute, hence the alias.
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """`response_format`: free text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    def constraint(self) -> StructuredOutput | None:
        """The constraint this format asks for; None for text."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutput(json_object=True)
        if self.json_schema is None:
            raise InvalidRequestError("response_format of type json_schema needs a json_schema object",
                                      param="response_format.json_schema")
        if self.json_schema.schema_ is None:
            return StructuredOutput(json_object=True)
        return StructuredOutput(json=self.json_schema.schema_)


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: exactly one of a JSON schema, any JSON object, a regex, a choice or a grammar."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    # vLLM's options for how a JSON schema compiles: disable_any_whitespace and disable_additional_properties ask
    # for what every schema here gets (compact JSON, objects closed: see structured.params.closed), so are let be;
    # a whitespace pattern would change the output.
    whitespace_pattern: str | None = None

    def constraint(self) -> StructuredOutput:
        """The constraint (compiled when first used); 400 if it names none or several."""
        if self.whitespace_pattern is not None:
            raise InvalidRequestError("structured_outputs.whitespace_pattern is not supported: JSON comes compact, "
                                      "on one line", param="structured_outputs.whitespace_pattern")
        return StructuredOutput(json=_schema(self.json_, "structured_outputs"), json_object=bool(self.json_object),
                                regex=self.regex, choice=self.choice, grammar=self.grammar, param="structured_outputs")


def _schema(value: dict[str, Any] | str | None, param: str) -> dict[str, Any] | None:
    """A schema sent as an object or as JSON text (vLLM accepts both)."""
    if not isinstance(value, str):
        return value
    try:
        return representable(json.loads(value), (param,))
    except ValueError as exc:  # JSONDecodeError, or an integer past Python's 4,300 digits
        raise InvalidRequestError(f"{param} is not valid JSON: {exc}", param=param) from exc
    except RecursionError as exc:  # Python's parser gives up on nesting about a thousand deep
        raise InvalidRequestError(f"{param} is nested too deeply to parse", param=param) from exc


def representable(data: Any, root: tuple = ()) -> Any:
    """Refuse what JSON allows but no field can hold: lone UTF-16 surrogates, integers past 64 bits, deep nesting."""
    # NOTE: a loop, not recursion: the body parser already accepted nesting near Python's recursion limit.
    # Containers go on the stack; scalars are checked in place, as a 100k-token prompt has 100k of them.
    stack: list[tuple[tuple, Any]] = [(root, data)]
    while stack:
        path, value = stack.pop()
        if len(path) > MAX_DEPTH:
            where = ".".join(map(str, path[:3]))
            raise InvalidRequestError(f"{where} is nested more than {MAX_DEPTH} levels deep", param=path[0])
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else None
        if items is None:
            _check_scalar(path, value)
            continue
        for key, item in items:
            if isinstance(key, str):
                _check_scalar(path, key)
            if isinstance(item, (dict, list)):
                stack.append(((*path, key), item))
            elif isinstance(item, (str, int)):
                _check_scalar((*path, key), item)
    return data


def _check_scalar(path: tuple, value: Any) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            where = ".".join(map(str, path)) or None
            raise InvalidRequestError(f"{where or 'the body'} holds a lone UTF-16 surrogate ({value[exc.start]!r}), "
                                      "which is not text; send valid Unicode", param=where) from exc
    elif isinstance(value, int) and not -_INT64 <= value < _INT64:
        where = ".".join(map(str, path)) or None
        raise InvalidRequestError(f"{where or 'the body'}: {value} does not fit in 64 bits", param=where)


def _guided_json(value: dict[str, Any] | str | None) -> StructuredOutput | None:
    return None if value is None else StructuredOutput(json=_schema(value, "guided_json"), param="guided_json")


class RequestBody(BaseModel):
    """An API request's body: unknown fields ignored, and nothing no field can hold (see representable)."""

    # Unknown fields are ignored, as OpenAI does, so clients that send newer fields keep working.
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _representable(cls, data: Any) -> Any:
        """Checked before the fields: a lone surrogate would fail in the tokenizer, a huge int in a tensor."""
        return representable(data)


class _GenerationRequest(RequestBody):
    """Fields shared by completions and chat completions, plus vLLM's sampling extensions."""

    # Set by the APIs translated to these (Ollama's): max_tokens is a cap that the context's end may cut short,
    # not a length the prompt must leave room for. No field: OpenAI's clients cannot ask for it.
    _fit_context: bool = PrivateAttr(default=False)
    # Theirs too: llama.cpp's and Ollama's repeat_last_n, the penalties' window (SamplingParams.repetition_window).
    _repetition_window: int | None = PrivateAttr(default=None)

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
    response_format: ResponseFormat | None = None
    logit_bias: dict[str, float] | None = None  # token ids as strings, as JSON keys are
    cache_salt: str | None = None  # vLLM's: prompt blocks are shared only with requests of the same salt
    # vLLM's: each prompt token's logprob and its top alternatives, in the response's prompt_logprobs.
    prompt_logprobs: int | None = None
    # Accepted so they can be refused by name rather than silently ignored.
    best_of: int | None = None
    # vLLM's (and OpenAI's older) fields that would change the answer; ignored, they gave a wrong one silently.
    # Refused unless they hold the value that changes nothing (see _refused).
    _refused: ClassVar[dict[str, tuple[Any, str]]] = _REFUSED
    use_beam_search: bool | None = None  # flags typed, so "false" reads as vLLM reads it
    allowed_token_ids: Any = None
    bad_words: Any = None
    logits_processors: Any = None
    return_tokens_as_token_ids: bool | None = None
    truncation_side: str | None = None
    logprob_token_ids: Any = None
    thinking_token_budget: Any = None
    repetition_detection: Any = None
    guided_whitespace_pattern: Any = None
    # vLLM's: the prompt's and each choice's token ids beside the text.
    return_token_ids: bool | None = None
    # vLLM's: keep only the prompt's last this many tokens (a chat's as rendered), so a long history still fits.
    truncate_prompt_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    # Extensions named as in vLLM; null is the default, as there (the OpenAI SDK sends extra_body's None as null).
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    priority: int | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @property
    def include_usage(self) -> bool:
        """True when a streamed response should end with a usage chunk."""
        options = self.stream_options
        return options is not None and _or(options.include_usage, options.continuous_usage_stats)

    @property
    def continuous_usage(self) -> bool:
        """True when each streamed chunk should carry the usage so far (vLLM's continuous_usage_stats)."""
        return self.include_usage and self.stream_options.continuous_usage_stats

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None, defaults: Mapping[str, float],
                         structured: StructuredOutput | None = None) -> SamplingParams:
        """SamplingParams from the shared fields, the model's `defaults` where they are unset; raises
        InvalidRequestError naming the bad field."""
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options is only allowed when stream is true", param="stream_options")
        if self.n is not None and self.n > MAX_N:
            raise InvalidRequestError(f"n={self.n} must be at most {MAX_N}", param="n")
        self._refuse_unsupported()
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stop) > MAX_STOPS:
            raise InvalidRequestError(f"stop has {len(stop)} strings; at most {MAX_STOPS}", param="stop")
        return SamplingParams(
            n=_or(self.n, 1), temperature=_or(self.temperature, defaults.get("temperature", 1.0)),
            top_p=_or(self.top_p, defaults.get("top_p", 1.0)), top_k=_or(self.top_k, defaults.get("top_k", -1)),
            min_p=_or(self.min_p, defaults.get("min_p", 0.0)),
            repetition_penalty=_or(self.repetition_penalty, defaults.get("repetition_penalty", 1.0)),
            presence_penalty=_or(self.presence_penalty, 0.0), frequency_penalty=_or(self.frequency_penalty, 0.0),
            seed=self.seed, max_tokens=max_tokens, min_tokens=_or(self.min_tokens, 0), stop=stop,
            stop_token_ids=_or(self.stop_token_ids, []), logit_bias=self._logit_bias(), cache_salt=self.cache_salt,
            ignore_eos=_or(self.ignore_eos, False), logprobs=logprobs, prompt_logprobs=self.prompt_logprobs,
            include_stop_str_in_output=_or(self.include_stop_str_in_output, False), priority=_or(self.priority, 0),
            skip_special_tokens=_or(self.skip_special_tokens, True),
            prediction=self.prediction.text if self.prediction else None,
            structured_output=structured or self._structured_output(), fit_context=self._fit_context,
            repetition_window=self._repetition_window,
        )

    def _refuse_unsupported(self) -> None:
        for name, (noop, why) in self._refused.items():
            value = getattr(self, name, None)
            if value is not None and value != noop:
                raise InvalidRequestError(f"{name} is not supported: {why}", param=name)
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < 1 \
                and self.truncate_prompt_tokens != -1:
            raise InvalidRequestError(f"truncate_prompt_tokens={self.truncate_prompt_tokens} must be at least 1 (how "
                                      "many of the prompt's last tokens to keep) or -1 (as many as fit)",
                                      param="truncate_prompt_tokens")
        if self.best_of is not None and self.best_of != _or(self.n, 1):
            raise InvalidRequestError("best_of is not supported (as in vLLM's V1 engine); ask for n samples",
                                      param="best_of")
        if self.prompt_logprobs is not None and self.stream:  # as vLLM
            raise InvalidRequestError("prompt_logprobs are not available when stream is true",
                                      param="prompt_logprobs")

    def truncated(self, prompt_ids: list[int], max_model_len: int, max_tokens: int | None) -> list[int]:
        """The prompt's last truncate_prompt_tokens ids (all of them when it is unset); -1 keeps as many as leave
        room in the context for max_tokens (unset: one), as vLLM's -1 cuts to the context."""
        keep = self.truncate_prompt_tokens
        if keep is None:
            return prompt_ids
        if keep > max_model_len:  # else the prompt's length was refused, not the setting that set it
            raise InvalidRequestError(f"truncate_prompt_tokens={keep} is more than this model's context of "
                                      f"{max_model_len} tokens", param="truncate_prompt_tokens")
        if keep == -1:
            keep = max(1, max_model_len - (max_tokens or 1))  # max_tokens past the context: refused as without it
        return prompt_ids[-keep:]

    def _logit_bias(self) -> dict[int, float] | None:
        """OpenAI's logit_bias (token ids as strings) as SamplingParams takes it; biases clamped to [-100, 100], as
        vLLM does."""
        if not self.logit_bias:
            return None
        bias = {}
        for token, value in self.logit_bias.items():
            # re.ASCII: int() refuses digits isdigit() takes ("²"), and numbers past 4,300 digits.
            if not re.fullmatch(r"\s*-?\d{1,18}\s*", token, re.ASCII) or not math.isfinite(value):
                raise InvalidRequestError(f"logit_bias maps token ids to finite numbers; got {token!r}: {value}",
                                          param="logit_bias")
            bias[int(token)] = min(100.0, max(-100.0, value))
        return bias

    def _structured_output(self) -> StructuredOutput | None:
        """The one output constraint asked for: OpenAI's response_format or one of vLLM's fields."""
        given = {
            "response_format": self.response_format.constraint() if self.response_format else None,
            "structured_outputs": self.structured_outputs.constraint() if self.structured_outputs else None,
            "guided_json": _guided_json(self.guided_json),
            "guided_regex": StructuredOutput(regex=self.guided_regex, param="guided_regex")
            if self.guided_regex is not None else None,
            "guided_choice": StructuredOutput(choice=self.guided_choice, param="guided_choice")
            if self.guided_choice is not None else None,
            "guided_grammar": StructuredOutput(grammar=self.guided_grammar, param="guided_grammar")
            if self.guided_grammar is not None else None,
        }
        asked = {name: c for name, c in given.items() if c is not None}
        if len(asked) > 1:
            raise InvalidRequestError(f"{' and '.join(asked)} each constrain the output; give one", param=next(iter(asked)))
        return next(iter(asked.values()), None)


class CompletionRequest(_GenerationRequest):
    """POST /v1/completions."""

    prompt: str | list[int] | list[str | list[int]]
    max_tokens: int | None = 16
    echo: bool | None = None  # nullable in OpenAI's API: None is False
    logprobs: int | None = None
    suffix: str | None = None
    add_special_tokens: bool | None = None  # vLLM's: a prompt's BOS where the model wants one, unless false

    def sampling_params(self, defaults: Mapping[str, float] | None = None) -> SamplingParams:
        """Validated sampling settings for every prompt of this request (the model's `defaults` where unset)."""
        if self.suffix:
            raise InvalidRequestError("suffix (fill-in-the-middle) is not supported", param="suffix")
        if self.tools or self.tool_choice not in (None, "none"):
            raise InvalidRequestError("tools and tool_choice belong to chat completions (/v1/chat/completions)",
                                      param="tools")
        # The engine generates at least one token: a prompt-only request runs one, which the response leaves out.
        params = self._sampling_params(1 if self.prompt_only else self.max_tokens, self.logprobs, defaults or {})
        if self.echo and self.logprobs is not None:
            if self.prompt_logprobs not in (None, self.logprobs):  # the engine scores the prompt once, one top n
                raise InvalidRequestError(f"prompt_logprobs={self.prompt_logprobs} beside echo with logprobs="
                                          f"{self.logprobs}: give the two the same number", param="prompt_logprobs")
            params.prompt_logprobs = self.logprobs  # echoed prompt tokens carry logprobs too
        return params

    @property
    def prompt_only(self) -> bool:
        """Echo with max_tokens 0: the prompt scored, nothing generated (OpenAI's way to get a text's logprobs)."""
        return bool(self.echo) and self.max_tokens == 0


class FunctionDefinition(BaseModel):
    """A function the model may call: its name, what it does, and a JSON schema of its arguments."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(BaseModel):
    """One entry of `tools`."""

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    """The function a named tool_choice picks."""

    name: str


class NamedToolChoice(BaseModel):
    """`tool_choice` naming one function the model must call."""

    type: Literal["function"]
    function: NamedFunction


class FunctionCall(BaseModel):
    """A call's function name and its arguments as JSON text."""

    name: str
    arguments: str


class ToolCallMessage(BaseModel):
    """One call in an assistant message's `tool_calls`."""

    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    """One message of a conversation; content is text or a list of text parts."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    # An assistant turn's calls, and which call a `tool` turn answers.
    tool_calls: list[ToolCallMessage] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """The message's content as one string; only text parts are supported."""
        return content_text(self.content)


def penalty_window(last_n: Any, param: str) -> int:
    """llama.cpp's and Ollama's repeat_last_n as the penalties' window: 0 (no penalties at all) as 0, -1 (the whole
    context, the prompt counted as with any window) as a window past any context, else the count of last tokens;
    400 naming param for anything else."""
    if isinstance(last_n, bool) or not isinstance(last_n, int) or last_n < -1:
        raise InvalidRequestError(f"{param}={last_n!r} must be -1 (the whole context), 0 (no penalties) or a number "
                                  "of last tokens", param=param)
    return sys.maxsize if last_n == -1 else last_n


def content_text(content: str | list[dict[str, Any]] | None) -> str:
    """A message's content (a string, OpenAI's text parts, or None beside tool calls) as one string."""
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        # An assistant's refusal part is its text too, as vLLM reads it, so a replayed conversation keeps it.
        if kind not in ("text", "refusal"):
            raise InvalidRequestError(f"content part of type {kind!r} is not supported; this model reads text only",
                                      param="messages")
        if not isinstance(part.get(kind), str):  # it said type 'text' is not supported: the part's text is wrong
            raise InvalidRequestError(f"a content part of type {kind!r} needs {kind!r} as a string", param="messages")
        parts.append(part[kind])
    return "\n".join(parts)  # as vLLM joins them for templates that take a string


class ChatCompletionRequest(_GenerationRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # vLLM's extensions: open the assistant's reply (the default unless continuing), or continue the final
    # message as written (an assistant's: a prefilled answer).
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    # vLLM's too: the chat template's own variables, such as Qwen3's enable_thinking.
    chat_template_kwargs: dict[str, Any] | None = None
    # Given to the template as those variables are, as vLLM gives them: documents for a template that writes them
    # in (retrieval-augmented chats: Command R's, Granite's), and OpenAI's reasoning_effort (gpt-oss's reads it).
    documents: list[dict[str, Any]] | None = None
    reasoning_effort: str | None = None
    # vLLM's: false leaves a --reasoning-parser's thinking out of the answer.
    include_reasoning: bool | None = None
    _refused: ClassVar[dict[str, tuple[Any, str]]] = _CHAT_REFUSED
    functions: Any = None
    function_call: Any = None
    chat_template: Any = None
    echo: bool | None = None
    modalities: Any = None
    add_special_tokens: bool | None = None

    def sampling_params(self, defaults: Mapping[str, float] | None = None) -> SamplingParams:
        """Validated sampling settings (the model's `defaults` where unset); max_completion_tokens wins over the older
        max_tokens."""
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs set to true", param="top_logprobs")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:
            raise InvalidRequestError(f"top_logprobs={self.top_logprobs} must be in [0, 20]", param="top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        # Checked here, not by SamplingParams, so that the error names the field the client sent.
        if self.max_completion_tokens is not None and self.max_completion_tokens < 1:
            raise InvalidRequestError(f"max_completion_tokens={self.max_completion_tokens} must be at least 1",
                                      param="max_completion_tokens")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self._sampling_params(max_tokens, logprobs, defaults or {}, self._forced_call())

    @property
    def tool_mode(self) -> str:
        """How tools are used: "none", "auto", "required", or "named" (tool_choice names the function to call)."""
        if not self.tools:
            if self.tool_choice not in (None, "none"):
                raise InvalidRequestError("tool_choice needs tools to choose from", param="tool_choice")
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            name = self.tool_choice.function.name
            if name not in {t.function.name for t in self.tools}:
                raise InvalidRequestError(f"tool_choice names {name!r}, which is not among the tools",
                                          param="tool_choice")
            return "named"  # not the name itself: a function may be called "none" or "auto"
        return self.tool_choice or "auto"

    @property
    def forced_name(self) -> str | None:
        """The function a named tool_choice picks; None for any other choice."""
        return self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else None

    @property
    def forced_names(self) -> tuple[str, ...]:
        """The functions a required call may name (any of the tools); none otherwise (a named function's output is
        its arguments alone)."""
        return tuple(t.function.name for t in self.tools or []) if self.tool_mode == "required" else ()

    def tool_dicts(self) -> list[dict[str, Any]]:
        """The tools as plain dicts for the chat template, or none when tool_choice is "none"."""
        if self.tool_mode == "none":
            return []
        return [t.model_dump(exclude_none=True) for t in self.tools or []]

    def _forced_call(self) -> StructuredOutput | None:
        """With "required" or a named function, the grammar that makes the answer a call that parses; it wins over a
        response_format, which shapes text answers (as OpenAI's, and vLLM's, which puts the tools' schema in its
        place): instructor sends both."""
        if self.tool_mode in ("none", "auto"):
            return None
        return forced_call(self.tool_dicts(), self.forced_name, self.parallel_tool_calls is not False)

    def prompt_token_ids(self, tokenizer: Tokenizer) -> list[int]:
        """The conversation and its tools rendered with tokenizer's chat template, as the prompt's token ids."""
        return chat_prompt(tokenizer, self.conversation(), self.tool_dicts(), self.tool_mode not in ("none", "auto"),
                           self.add_generation_prompt, bool(self.continue_final_message), self.template_kwargs())

    def template_kwargs(self) -> dict[str, Any] | None:
        """The chat template's own variables: documents and reasoning_effort, then chat_template_kwargs (which win,
        as vLLM applies them last)."""
        given = {"documents": self.documents, "reasoning_effort": self.reasoning_effort}
        kwargs = {**{k: v for k, v in given.items() if v is not None}, **(self.chat_template_kwargs or {})}
        return kwargs or None

    def conversation(self) -> list[dict[str, Any]]:
        """Messages as plain dicts for the chat template; `developer` is OpenAI's newer name for `system`."""
        messages = []
        for m in self.messages:
            message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if m.name is not None:
                message["name"] = m.name
            if m.tool_calls:
                message["tool_calls"] = [c.model_dump() for c in m.tool_calls]
            if m.tool_call_id is not None:
                message["tool_call_id"] = m.tool_call_id
            messages.append(message)
        return messages


def translated_chat(fields: dict[str, Any], names: Mapping[str, str]) -> ChatCompletionRequest:
    """The chat request another API's request (Responses, Anthropic's Messages) translates to; an error chat's schema
    finds in what passed through (a tool's name, say) names that API's field (`names`: chat's name to its own)."""
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = _their_field(error["loc"], names)
        raise InvalidRequestError(f"{where}: {error['msg']}", param=where) from exc


def _their_field(loc: tuple, names: Mapping[str, str]) -> str:
    """A chat field's error location as the other API's field: ("tools", 0, "function", "name") is tools[0].name;
    anything in messages is the conversation's whole (a system prompt or instructions shift the indices)."""
    if loc[0] == "messages":
        return names.get("messages", "messages")
    where = names.get(loc[0], str(loc[0]))
    for part in loc[1:]:
        if part != "function":  # chat nests a tool's fields under it; the other APIs do not
            where += f"[{part}]" if isinstance(part, int) else f".{part}"
    return where


def required_string(item: dict[str, Any], key: str, where: str) -> str:
    """item[key], which must be a string; 400 naming where.key."""
    if not isinstance(item.get(key), str):
        raise InvalidRequestError(f"{where}.{key} must be a string", param=f"{where}.{key}")
    return item[key]
