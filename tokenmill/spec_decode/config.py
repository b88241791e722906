"""SpeculativeConfig: the `--speculative-config` JSON, in the keys vLLM users already write."""

import json
from dataclasses import dataclass, fields
from typing import Any

from tokenmill.errors import InvalidRequestError, whole_number

METHODS = ("ngram", "draft_model", "early_exit")


@dataclass
class SpeculativeConfig:
    """How drafts are made: the method and the most tokens guessed per step."""

    # None: worked out as vLLM does, "draft_model" when a model is named (other than vLLM's "[ngram]"), else "ngram".
    method: str | None = None
    # Most draft tokens per sequence and step; the engine drafts fewer when acceptance or load says so, so the
    # default is generous: ngram on `bench spec`'s input-grounded prompts ran 2.35x with 8, 1.93x with 4.
    num_speculative_tokens: int = 8
    # ngram: the longest and shortest tail of the text so far that is looked up earlier in it (as vLLM).
    prompt_lookup_max: int = 5
    prompt_lookup_min: int = 2
    # draft_model: the drafting model (a catalog name, .gguf or HF directory; it must share the tokenizer), and
    # its quantization (auto: as --quantization auto would load it).
    model: str | None = None
    quantization: str = "auto"
    # early_exit: the target's first exit_layer layers, then its final norm and LM head, draft.
    exit_layer: int | None = None
    # True: draft only as far as acceptance and load say it pays; False: always num_speculative_tokens where a
    # draft exists (as vLLM does), e.g. to measure acceptance by position.
    adaptive: bool = True

    def __post_init__(self) -> None:
        counts = {"num_speculative_tokens": self.num_speculative_tokens, "prompt_lookup_max": self.prompt_lookup_max,
                  "prompt_lookup_min": self.prompt_lookup_min, "exit_layer": self.exit_layer}
        for key, value in counts.items():  # JSON's 4.0 or true would pass the range checks and fail every step
            if value is not None and not whole_number(value):
                raise InvalidRequestError(f"{key}={value!r} must be an integer", param="speculative_config")
        self.quantization = "auto" if self.quantization is None else self.quantization  # null: work it out, as vLLM
        for key in ("method", "model", "quantization"):  # {"model": 5} was a TypeError traceback from pathlib
            if (value := getattr(self, key)) is not None and not isinstance(value, str):
                raise InvalidRequestError(f"{key}={value!r} must be a string", param="speculative_config")
        if not isinstance(self.adaptive, bool):  # "no" read as true
            raise InvalidRequestError(f"adaptive={self.adaptive!r} must be true or false", param="speculative_config")
        if self.method is None:
            self.method = "draft_model" if self.model not in (None, "ngram", "[ngram]") else "ngram"
        if self.method not in METHODS:
            raise InvalidRequestError(f"speculative method {self.method!r} is not supported; choose one of "
                                      f"{', '.join(METHODS)}", param="speculative_config")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise InvalidRequestError(f"num_speculative_tokens={self.num_speculative_tokens} must be in [1, 16]",
                                      param="speculative_config")
        if self.method == "draft_model" and not self.model:
            raise InvalidRequestError('method "draft_model" needs "model": the drafting model', param="speculative_config")
        if self.method == "early_exit" and self.exit_layer is None:
            raise InvalidRequestError('method "early_exit" needs "exit_layer": the layers that draft',
                                      param="speculative_config")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise InvalidRequestError(
                f"prompt_lookup_min={self.prompt_lookup_min} and prompt_lookup_max={self.prompt_lookup_max} must "
                "satisfy 1 <= min <= max", param="speculative_config")

    @classmethod
    def parse(cls, value: "str | dict[str, Any] | SpeculativeConfig") -> "SpeculativeConfig":
        """From a JSON string (the flag), a dict (`LLM(speculative_config=...)`) or a config."""
        if isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise InvalidRequestError(f"speculative config is not valid JSON: {e}",
                                          param="speculative_config") from None
        if not isinstance(value, dict):
            raise InvalidRequestError("speculative config must be a JSON object", param="speculative_config")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise InvalidRequestError(f"unknown speculative config keys {unknown}; known: {sorted(known)}",
                                      param="speculative_config")
        return cls(**value)
