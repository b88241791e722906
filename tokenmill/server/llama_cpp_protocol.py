"""llama.cpp's native POST /completion body (its server's own API, not OpenAI's), with llama.cpp's defaults, and the
sampling settings it asks for."""

import math
import re
from typing import Any, ClassVar

from tokenmill.errors import InvalidRequestError
from tokenmill.loader.tokenizer import Tokenizer
from tokenmill.sampling import SamplingParams
from tokenmill.server.protocol import CompletionRequest, RequestBody, penalty_window

# /v1/completions fields as llama.cpp names them, for the `param` of an error their checks raise.
_PARAMS = {"max_tokens": "n_predict", "logprobs": "n_probs", "repetition_penalty": "repeat_penalty"}


class NativeCompletionRequest(RequestBody):
    """A prompt (text, token ids, or both mixed) and llama.cpp's sampling fields, unset ones at llama.cpp's defaults."""

    model: str | None = None
    prompt: str | list[int | str | list[int | str]]  # a list of lists is several prompts: refused as such
    n_predict: int = -1  # -1: until the context is full; 0: the prompt only, nothing generated
    temperature: float = 0.8  # at most 0: greedy
    top_k: int = 40  # 0: off
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64  # the penalties' window, as llama.cpp's: 0 turns them off, -1 is the whole context
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: str | list[str] = []
    seed: int = -1  # -1: a random seed
    n_probs: int = 0
    ignore_eos: bool = False
    # [[token id or text, bias or false], ...] or {"token id or text": bias}; false bans the token, text biases each
    # of its tokens.
    logit_bias: list[list[Any]] | dict[str, Any] | None = None
    grammar: str | None = None  # GBNF, llama.cpp's grammar format
    json_schema: dict[str, Any] | None = None
    stream: bool = False
    return_tokens: bool = False
    # Only these fields of the answer; "timings/prompt_n" lifts a nested one to the top under that name (llama.vim).
    response_fields: list[str] | None = None
    # Samplers this engine does not have, at the values that leave them off; other values are refused by name.
    _off: ClassVar[dict[str, Any]] = {"typical_p": 1.0, "mirostat": 0, "dry_multiplier": 0.0, "xtc_probability": 0.0,
                                      "dynatemp_range": 0.0, "n_cmpl": 1, "n": 1, "post_sampling_probs": False}
    typical_p: float = 1.0
    mirostat: int = 0
    dry_multiplier: float = 0.0
    xtc_probability: float = 0.0
    dynatemp_range: float = 0.0
    n_cmpl: int = 1
    n: int = 1  # llama.cpp's other name for n_cmpl (SillyTavern's swipes)
    post_sampling_probs: bool = False
    top_n_sigma: float = -1.0  # at most 0: off (SillyTavern sends 0)

    @property
    def prompt_only(self) -> bool:
        """n_predict 0: the prompt evaluated (and cached), nothing generated."""
        return self.n_predict == 0

    def sampling_params(self) -> SamplingParams:
        """The settings this body asks for, checked as /v1/completions checks them; 400 naming llama.cpp's field."""
        for name, off in self._off.items():
            if getattr(self, name) != off:
                raise InvalidRequestError(f"{name} is not supported: this engine samples with temperature, top_k, "
                                          "top_p, min_p and the penalties", param=name)
        if self.top_n_sigma > 0:
            raise InvalidRequestError("top_n_sigma is not supported: this engine samples with temperature, top_k, "
                                      "top_p, min_p and the penalties", param="top_n_sigma")
        window = penalty_window(self.repeat_last_n, "repeat_last_n")
        if self.n_predict < -1:
            raise InvalidRequestError(f"n_predict={self.n_predict} must be -1 (no limit), 0 (the prompt only) or "
                                      "more", param="n_predict")
        fields = {
            "prompt": [0], "max_tokens": 1 if self.prompt_only else None if self.n_predict == -1 else self.n_predict,
            "temperature": max(self.temperature, 0.0), "top_k": self.top_k if self.top_k > 0 else -1,
            "top_p": self.top_p, "min_p": self.min_p, "stop": self.stop,
            # repeat_last_n 0 turns the three penalties off, as in llama.cpp.
            **({"repetition_penalty": self.repeat_penalty, "presence_penalty": self.presence_penalty,
                "frequency_penalty": self.frequency_penalty} if window != 0 else
               {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}),
            "ignore_eos": self.ignore_eos,
            "seed": self.seed, "logprobs": self.n_probs or None,  # -1, llama.cpp's random seed, is vLLM's too
            "logit_bias": self._logit_bias(), "structured_outputs": self._structured_outputs(),
        }
        request = CompletionRequest.model_validate(fields)
        request._repetition_window = window or None
        try:
            params = request.sampling_params()
        except InvalidRequestError as exc:
            exc.param = self.their_param(exc.param)
            raise
        # As llama-server: past the context the answer stops there, not refused (but the prompt must fit whole).
        params.fit_context = not self.prompt_only
        params.temperature_last = True  # llama.cpp's order, as its samplers list says
        return params

    def their_param(self, param: str | None) -> str | None:
        """The field of this body an error about a /v1/completions field is about."""
        if param == "structured_outputs":
            return "grammar" if self.grammar else "json_schema"
        return _PARAMS.get(param, param)

    def token_biases(self, tokenizer: Tokenizer) -> dict[int, float]:
        """The biases that need the model's tokenizer: logit_bias keys given as text, each of their tokens biased
        (as llama.cpp tokenizes them), and with ignore_eos the end tokens banned (not merely generated through)."""
        biases = {token: value for text, value in self._bias_pairs() if isinstance(text, str)
                  for token in tokenizer.encode(text, add_special_tokens=False, parse_special=False)}
        return biases | ({token: -100.0 for token in tokenizer.eos_token_ids} if self.ignore_eos else {})

    def token_ids(self, tokenizer: Tokenizer) -> list[int]:
        """The prompt's ids: text tokenized (with BOS where the model wants one, when the prompt starts with text),
        ids as given."""
        parts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if len(parts) > 1 and all(isinstance(p, str) for p in parts) or any(isinstance(p, list) for p in parts):
            raise InvalidRequestError("a list of prompts (strings or token-id lists) is several prompts, which this "
                                      "server answers one per request; send each alone", param="prompt")
        ids: list[int] = []
        for i, part in enumerate(parts):
            ids += tokenizer.encode(part, add_special_tokens=i == 0) if isinstance(part, str) else [part]
        if not ids:
            raise InvalidRequestError("prompt is empty; give text or token ids", param="prompt")
        return ids

    def _logit_bias(self) -> dict[str, float] | None:
        """llama.cpp's biases of token ids as OpenAI's: ids (as text) to a bias, a ban (false) as -100."""
        return {str(token): value for token, value in self._bias_pairs() if isinstance(token, int)} or None

    def _bias_pairs(self) -> list[tuple[int | str, float]]:
        """Each logit_bias entry as (token id, or text to tokenize, bias), as llama.cpp reads them: in the list form
        a number is an id and a string is text; in the object form a key that is a whole number is an id. A bias is
        clamped to [-100, 100] (as OpenAI's), false bans the token."""
        listed = not isinstance(self.logit_bias, dict)
        pairs = self.logit_bias.items() if not listed else self.logit_bias or []
        checked: list[tuple[int | str, float]] = []
        for pair in pairs:
            if len(pair) != 2:
                raise InvalidRequestError("logit_bias entries are [token id or text, bias]", param="logit_bias")
            token, value = pair
            if not listed and re.fullmatch(r"\s*[+-]?\d{1,18}\s*", token, re.ASCII):
                token = int(token)
            id_or_text = isinstance(token, str) and token or isinstance(token, int) and not isinstance(token, bool)
            if not id_or_text or isinstance(token, int) and token < 0:
                raise InvalidRequestError(f"logit_bias takes token ids (0 or more) or text; got {token!r}",
                                          param="logit_bias")
            value = -100.0 if value is False else value
            # abs() < inf, not math.isfinite: an integer past a float's range is finite, and clamped below.
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) < math.inf:
                raise InvalidRequestError(f"logit_bias of token {token!r} must be a finite number or false",
                                          param="logit_bias")
            checked.append((token, float(min(100, max(-100, value)))))
        return checked

    def _structured_outputs(self) -> dict[str, Any] | None:
        """The grammar (GBNF, in llguidance's Lark dialect) or the JSON schema the output must follow."""
        if self.grammar and self.json_schema is not None:
            raise InvalidRequestError("give grammar or json_schema, not both", param="grammar")
        if self.json_schema is not None:
            return {"json": self.json_schema}
        if not self.grammar:
            return None
        from llguidance.gbnf_to_lark import gbnf_to_lark  # imported where used: llguidance is 6 MiB

        try:
            return {"grammar": gbnf_to_lark(self.grammar)}
        except Exception as exc:  # the converter raises a bare Exception for most of a grammar's mistakes
            raise InvalidRequestError(f"grammar is not valid GBNF: {exc}", param="grammar") from exc
