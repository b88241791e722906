"""The routing policies, free of the server: which model fits, and when a cheap answer is too unsure to keep."""

from collections.abc import Sequence
from dataclasses import dataclass

from tokenmill.outputs import RequestOutput

# The model name that asks the server to choose.
AUTO = "auto"
# `cheapest`: the first model (in --model order, cheap to strong) whose context fits the request.
# `cascade`: that model answers; below the confidence threshold the next fitting model answers instead.
POLICIES = ("cheapest", "cascade")


@dataclass
class Route:
    """A routing decision: the index of the model (in --model order), why, and the reason's kind for metrics."""

    index: int
    reason: str
    kind: str


def fits(prompt_len: int, max_tokens: int | None, max_model_len: int) -> bool:
    """Whether the prompt and max_tokens fit a context, counted as the engine counts them when it admits a request."""
    return prompt_len + (max_tokens or 1) <= max_model_len


def cheapest(prompt_lens: Sequence[int], max_tokens: int | None, max_model_lens: Sequence[int]) -> Route | None:
    """The first model whose context fits the prompt (as that model tokenizes it) and max_tokens; None if none does."""
    for i, (prompt_len, max_model_len) in enumerate(zip(prompt_lens, max_model_lens)):
        if fits(prompt_len, max_tokens, max_model_len):
            return Route(i, "cheapest fits", "fits")
    return None


def mean_logprob(outputs: Sequence[RequestOutput]) -> float:
    """The mean logprob of every generated token of every sample; 0.0 (nothing to doubt) when there are none."""
    logprobs = [lp.logprob for output in outputs for sample in output.outputs for lp in sample.logprobs or []]
    return sum(logprobs) / len(logprobs) if logprobs else 0.0


def escalate_to(confidence: float, threshold: float, answered: int, fitting: Sequence[int]) -> Route:
    """Keep the answer of model `answered` at or above the threshold, else move to the next fitting model after it."""
    if confidence >= threshold:
        return Route(answered, f"cascade: confidence {confidence:.3g} >= {threshold:g}", "confident")
    stronger = [i for i in fitting if i > answered]
    if not stronger:
        return Route(answered, f"cascade: confidence {confidence:.3g} < {threshold:g}, no stronger model fits",
                     "no_stronger")
    return Route(stronger[0], f"cascade: escalated, confidence {confidence:.3g} < {threshold:g}", "escalated")
