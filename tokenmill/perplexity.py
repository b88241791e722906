"""Perplexity through the engine's prompt logprobs, over sliding windows as in the transformers guide."""

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tokenmill.errors import InvalidRequestError, TokenmillError
from tokenmill.llm import LLM
from tokenmill.sampling import SamplingParams


@dataclass
class PerplexityResult:
    """exp(mean negative log-likelihood) over the scored tokens."""

    perplexity: float
    nll: float
    num_tokens: int
    num_windows: int


def windows(num_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) per window; with stride < context every token after the first
    is scored exactly once, each with at least context - stride tokens before it in its window."""
    if context < 2:
        raise InvalidRequestError(f"context={context} must be at least 2: a window scores the tokens after its first")
    # A window's first token is predicted from nothing in it: with stride == context it would go unscored.
    if not 0 < stride < context:
        raise InvalidRequestError(f"stride={stride} must be in [1, context - 1 = {context - 1}]")
    out, scored_until = [], 1  # the first token has nothing before it to be predicted from
    for begin in range(0, max(num_tokens - 1, 1), stride):
        end = min(begin + context, num_tokens)
        out.append((begin, end, max(scored_until, begin + 1)))
        scored_until = end
        if end == num_tokens:
            break
    return out


def perplexity(llm: LLM, token_ids: list[int], context: int, stride: int) -> PerplexityResult:
    """Score token_ids with windows of `context` tokens moved by `stride`; all windows run as one batch."""
    if len(token_ids) < 2:
        raise InvalidRequestError("perplexity needs a text of at least 2 tokens")
    spans = windows(len(token_ids), context, stride)
    # Each window is a prompt that generates one token (the engine's least): it needs a position past its end.
    if context >= llm.engine.max_model_len and len(token_ids) >= llm.engine.max_model_len:
        raise InvalidRequestError(f"context={context} must be below this engine's max_model_len "
                                  f"({llm.engine.max_model_len})")
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": token_ids[b:e]} for b, e, _ in spans], params)
    nll, count = 0.0, 0
    for (begin, end, first), output in zip(spans, outputs):
        # prompt_logprobs[i] scores token begin + i of the text.
        for lp in output.prompt_logprobs[first - begin :]:
            nll -= lp.logprob
            count += 1
    if not math.isfinite(nll):  # a figure nonetheless (exit 0) would pass for a measurement
        raise TokenmillError(f"the model's log-probabilities came out {nll}: it does not run right with these "
                             "settings (its dtype?)")
    return PerplexityResult(math.exp(nll / count), nll / count, count, len(spans))


def llama_cpp_perplexity(
    gguf: Path, token_ids: list[int], context: int, stride: int, threads: int | None
) -> PerplexityResult:
    """The same windows scored by llama.cpp on the same GGUF file (through llama-cpp-python), as a reference."""
    if gguf.suffix != ".gguf":
        raise InvalidRequestError("--peer llama.cpp scores the same GGUF file; give a .gguf model")
    try:
        from llama_cpp import Llama
    except ImportError as exc:
        raise InvalidRequestError("--peer llama.cpp needs llama-cpp-python: `pip install llama-cpp-python`") from exc
    llm = Llama(model_path=str(gguf), n_ctx=context, n_batch=context, n_ubatch=context, logits_all=True,
                n_threads=threads or torch.get_num_threads(), verbose=False)
    spans = windows(len(token_ids), context, stride)
    nll, count = 0.0, 0
    for begin, end, first in spans:
        llm.reset()
        llm.eval(token_ids[begin:end])
        # Row i of the scores follows token begin + i, so it predicts token begin + i + 1.
        rows = torch.from_numpy(np.asarray(llm.scores[first - begin - 1 : end - begin - 1]))
        targets = torch.tensor(token_ids[first:end])[:, None]
        nll -= torch.log_softmax(rows.float(), dim=-1).gather(1, targets).sum().item()
        count += end - first
    return PerplexityResult(math.exp(nll / count), nll / count, count, len(spans))
