"""Typed errors for mistakes a user can fix; the CLI and server turn them into one-line messages."""

import numbers


def whole_number(value: object) -> bool:
    """An integer, as a count in settings and requests must be: not a bool, nor a float that happens to be whole."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_text(text: str) -> bool:
    """False for a string holding lone surrogates: what Python makes of bytes that are not UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class TokenmillError(Exception):
    """Base class for every error caused by user input rather than a bug."""


class ModelNotFoundError(TokenmillError):
    """A model name or path that names nothing loadable."""


class ModelLoadError(TokenmillError):
    """A model file that exists but cannot be read (corrupt, truncated, missing tensors)."""


class UnsupportedArchitectureError(TokenmillError):
    """A model whose architecture this engine does not implement."""


class InvalidRequestError(TokenmillError):
    """A request whose parameters are out of range or inconsistent."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        # The offending field, reported as OpenAI's error `param` by the server.
        self.param = param


class PromptTooLongError(InvalidRequestError):
    """A prompt (plus requested tokens) that does not fit the model's context or the KV pool."""

    def __init__(self, message: str, param: str | None = None, prompt_tokens: int = 0, max_tokens: int | None = None,
                 context: int = 0) -> None:
        super().__init__(message, param)
        # The figures, for an API that words the error its own way (Anthropic's, which Claude Code parses).
        self.prompt_tokens, self.max_tokens, self.context = prompt_tokens, max_tokens, context
