"""SamplingParams: how one request turns logits into tokens, validated on construction."""

import math
import numbers
from dataclasses import dataclass, field

from tokenmill.errors import InvalidRequestError, is_text, whole_number
from tokenmill.structured.params import StructuredOutput

# Temperatures below this sample greedily (as vLLM's): dividing logits by one near float32's smallest overflows them to
# inf, and the softmax of a row holding inf is NaN throughout.
_GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    """Per-request decoding settings, named as in vLLM and the OpenAI API."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # llama.cpp's and Ollama's repeat_last_n: the three penalties look at the last this many tokens, prompt and
    # output alike, as theirs do; None: repetition at every token so far and presence and frequency at the output's
    # (vLLM's and OpenAI's).
    repetition_window: int | None = None
    seed: int | None = None
    # None means "until the context is full", as the OpenAI chat API.
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    # Added to the named tokens' logits before anything else samples them (OpenAI's logit_bias): -100 all but bans
    # a token, 100 all but forces it.
    logit_bias: dict[int, float] | None = None
    ignore_eos: bool = False
    # Cached prompt blocks are shared only among requests with the same salt (vLLM's cache_salt): a tenant cannot
    # learn from a prefix hit's speed what another sent.
    cache_salt: str | None = None
    # Number of top alternatives to return per generated token; None returns no logprobs.
    logprobs: int | None = None
    # Number of top alternatives per prompt token; None skips prompt logprobs (they cost a full LM head
    # per prompt token and bypass the prefix cache, since cached tokens are never computed).
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    # False: control tokens the model writes (<|im_start|>, a tool-call tag) show in the text, as vLLM's option.
    skip_special_tokens: bool = True
    # Scheduling order: a lower value is admitted (and kept through preemption) first, as vLLM's priority.
    priority: int = 0
    # OpenAI's predicted output: text the answer is expected to mostly repeat (an edit of it), drafted from
    # and verified, so the output is the same as without it, only sooner.
    prediction: str | None = None
    # A shape the output must take (JSON schema, regex, choice, grammar), enforced by a token mask in the sampler.
    structured_output: StructuredOutput | None = None
    # Milliseconds from arrival by which the whole answer, and its first token, must be out (the
    # x-tokenmill-deadline-ms / x-tokenmill-ttft-deadline-ms headers); None: no deadline. Under the deadline
    # scheduling policy the earliest feasible deadline is served first and an infeasible one is refused.
    deadline_ms: float | None = None
    ttft_deadline_ms: float | None = None
    # max_tokens as a cap that the context's end may cut short (llama.cpp's n_predict, Ollama's num_predict, the
    # offline LLM's), rather than a length the prompt must leave room for (OpenAI's, whose servers refuse it).
    fit_context: bool = False
    # llama.cpp's sampler order: top_k, top_p and min_p cut the model's own distribution, temperature reshapes what
    # is left (vLLM's, the default: temperature first). min_p 0.05 at temperature 1.5, a common setting, keeps far
    # fewer tokens so.
    temperature_last: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])  # None: none, as vLLM's default
        self.stop_token_ids = list(self.stop_token_ids or [])
        _check(whole_number(self.n) and self.n >= 1, "n", self.n, "must be an integer, at least 1")
        self.n = int(self.n)
        # NOTE: comparisons refuse NaN; the upper bounds refuse Infinity, which would make every probability NaN.
        _check(0 <= self.temperature < float("inf"), "temperature", self.temperature, "must be >= 0 and finite")
        _check(0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]")
        # Past the vocabulary top_k keeps everything; the cap keeps it within the sampler's int64 tensor.
        # 0 is off as well, as in vLLM and llama.cpp (models' generation configs say top_k 0 for "none").
        _check(whole_number(self.top_k) and -1 <= self.top_k < 2**31, "top_k", self.top_k,
               "must be -1 or 0 (off) or an integer in [1, 2**31)")
        _check(0 <= self.min_p <= 1, "min_p", self.min_p, "must be in [0, 1]")
        _check(0 < self.repetition_penalty < float("inf"), "repetition_penalty", self.repetition_penalty,
               "must be > 0 and finite")
        _check(-2 <= self.presence_penalty <= 2, "presence_penalty", self.presence_penalty, "must be in [-2, 2]")
        _check(-2 <= self.frequency_penalty <= 2, "frequency_penalty", self.frequency_penalty, "must be in [-2, 2]")
        _check(self.repetition_window is None or whole_number(self.repetition_window) and self.repetition_window >= 1,
               "repetition_window", self.repetition_window, "must be an integer, at least 1")
        _check(self.max_tokens is None or whole_number(self.max_tokens) and self.max_tokens >= 1, "max_tokens",
               self.max_tokens, "must be an integer, at least 1")
        if self.seed == -1:  # vLLM's way to say unseeded
            self.seed = None
        _check(
            self.seed is None or (whole_number(self.seed) and -(2**63) <= self.seed < 2**63),
            "seed", self.seed, "must be a 64-bit integer",
        )
        # A Python int: a numpy seed would overflow in the sampler's per-position arithmetic (seed * stride).
        self.seed = None if self.seed is None else int(self.seed)
        _check(whole_number(self.min_tokens) and self.min_tokens >= 0, "min_tokens", self.min_tokens,
               "must be an integer >= 0")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens", self.min_tokens,
               f"must be at most max_tokens ({self.max_tokens}), as vLLM requires")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or whole_number(value) and 0 <= value <= 20, name, value, "must be an integer in [0, 20]")
        _check(all(whole_number(t) for t in self.stop_token_ids), "stop_token_ids", self.stop_token_ids,
               "must be integers")
        # Once each: every step of every sample reads them (a million repeats of one id held the engine 82 s).
        self.stop_token_ids = list(dict.fromkeys(self.stop_token_ids))
        _check(all(s for s in self.stop), "stop", self.stop, "must not contain empty strings")
        _check(self.cache_salt is None or isinstance(self.cache_salt, str) and self.cache_salt != ""
               and is_text(self.cache_salt), "cache_salt", self.cache_salt, "must be a non-empty string of text")
        _check(self.logit_bias is None or isinstance(self.logit_bias, dict) and all(
            whole_number(t) and isinstance(b, numbers.Real) and not isinstance(b, bool) and math.isfinite(b)
            for t, b in self.logit_bias.items()),
            "logit_bias", self.logit_bias, "must map token ids to finite numbers")
        _check(isinstance(self.priority, int), "priority", self.priority, "must be an integer")
        for name in ("deadline_ms", "ttft_deadline_ms"):
            value = getattr(self, name)
            _check(value is None or 0 < value < float("inf"), name, value, "must be a positive number of milliseconds")

    @property
    def has_penalties(self) -> bool:
        """Whether penalties apply: they depend on every token before a position, so drafts are not verified under them."""
        return self.repetition_penalty != 1.0 or bool(self.presence_penalty) or bool(self.frequency_penalty)

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax."""
        return self.temperature < _GREEDY_BELOW or self.top_k == 1


def _check(ok: bool, name: str, value: object, rule: str) -> None:
    if not ok:
        raise InvalidRequestError(f"{name}={value!r} {rule}", param=name)
