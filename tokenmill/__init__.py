"""tokenmill: an LLM inference engine with latency and cost measured."""

from tokenmill.engine.llm_engine import CompletionOutput, LLMEngine, RequestOutput
from tokenmill.errors import (
    InvalidRequestError,
    ModelLoadError,
    ModelNotFoundError,
    PromptTooLongError,
    TokenmillError,
    UnsupportedArchitectureError,
)
from tokenmill.llm import LLM
from tokenmill.sampling import SamplingParams

__all__ = [
    "LLM",
    "LLMEngine",
    "SamplingParams",
    "RequestOutput",
    "CompletionOutput",
    "TokenmillError",
    "InvalidRequestError",
    "ModelLoadError",
    "ModelNotFoundError",
    "PromptTooLongError",
    "UnsupportedArchitectureError",
]
