"""Perplexity through the engine's prompt logprobs, over sliding windows as in the transformers guide."""

import math
from dataclasses import dataclass

from tokenmill.errors import InvalidRequestError
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
    if not 0 < stride <= context:
        raise InvalidRequestError(f"stride={stride} must be in [1, context={context}]")
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
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": token_ids[b:e]} for b, e, _ in spans], params)
    nll, count = 0.0, 0
    for (begin, end, first), output in zip(spans, outputs):
        # prompt_logprobs[i] scores token begin + i + 1 of the text.
        for lp in output.prompt_logprobs[first - begin - 1 :]:
            nll -= lp.logprob
            count += 1
    return PerplexityResult(math.exp(nll / count), nll / count, count, len(spans))
