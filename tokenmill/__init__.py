"""tokenmill: an LLM inference engine with latency and cost measured."""

from typing import TYPE_CHECKING

from tokenmill.errors import (
    InvalidRequestError,
    ModelLoadError,
    ModelNotFoundError,
    PromptTooLongError,
    TokenmillError,
    UnsupportedArchitectureError,
)
from tokenmill.outputs import CompletionOutput, RequestOutput
from tokenmill.sampling import SamplingParams
from tokenmill.structured.params import StructuredOutput

if TYPE_CHECKING:
    from tokenmill.engine.llm_engine import LLMEngine
    from tokenmill.llm import LLM

__all__ = [
    "LLM",
    "LLMEngine",
    "SamplingParams",
    "StructuredOutput",
    "RequestOutput",
    "CompletionOutput",
    "TokenmillError",
    "InvalidRequestError",
    "ModelLoadError",
    "ModelNotFoundError",
    "PromptTooLongError",
    "UnsupportedArchitectureError",
]


def __getattr__(name: str) -> object:
    """LLM and LLMEngine on first use: they import torch, which `tokenmill --help` and `models` never need."""
    if name == "LLM":
        from tokenmill.llm import LLM

        return LLM
    if name == "LLMEngine":
        from tokenmill.engine.llm_engine import LLMEngine

        return LLMEngine
    raise AttributeError(f"module 'tokenmill' has no attribute {name!r}")
