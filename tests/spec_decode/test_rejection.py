"""Sampling with drafts keeps the model's distribution (chi-square tests) and a seeded row's very tokens."""

import pytest
import torch

from types import SimpleNamespace

from tokenmill.engine.sampler import Sampler
from tokenmill.sampling import SamplingParams

DRAWS = 6000
# Chi-square critical value at p = 0.001 for 5 degrees of freedom (6 tokens; where top_p cuts some, fewer, and the
# bound is looser): a correct rule exceeds it once in a thousand runs, and the seed is fixed.
CRITICAL = 20.52


def _seq(params: SamplingParams, seed: int | None = None, outputs: int = 1) -> SimpleNamespace:
    return SimpleNamespace(params=params, token_ids=[0] * outputs, output_token_ids=[0] * outputs,
                           num_output_tokens=outputs, seed=seed, stop_token_ids=[])


def _chi_square(tokens: list[int], probs: torch.Tensor) -> float:
    """Pearson's statistic of tokens against probs, over the tokens probs allows; inf if another was drawn."""
    counts = torch.bincount(torch.tensor(tokens), minlength=len(probs)).double()
    allowed = probs > 0
    if counts[~allowed].any():
        return float("inf")
    expected = probs[allowed].double() * len(tokens)
    return float(((counts[allowed] - expected) ** 2 / expected).sum())


@pytest.fixture
def next_token_probs(tied_lm):
    """A tiny model's next-token logits over its 6 likeliest tokens (top_k keeps the test's bins few)."""
    torch.manual_seed(0)
    logits = tied_lm(torch.tensor([3, 1, 4]))[-1].detach()
    top = logits.topk(6)
    small = top.values - top.values.max()  # renumbered 0..5 below
    return small, torch.softmax(small, dim=-1)


def _first_tokens(logits: torch.Tensor, draft: list[int], params: SamplingParams) -> list[list[int]]:
    """Many sequences verify the same draft over the same logits in one call; each one's emitted tokens."""
    rows = logits.expand(len(draft) + 1, -1)
    out = Sampler()(rows.repeat(DRAWS, 1).clone(), [_seq(params)] * DRAWS, [draft] * DRAWS)
    return out.token_ids


def _truncated(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs (sorted, descending) with top_p's tail cut off, renormalized: what sampling draws from."""
    kept = torch.where(probs.cumsum(0) - probs < top_p, probs, 0.0)
    return kept / kept.sum()


@pytest.mark.parametrize("top_p", [1.0, 0.9])
@pytest.mark.parametrize("draft_token", [0, 2])
def test_first_token_follows_the_models_distribution_with_a_draft(next_token_probs, draft_token, top_p):
    logits, probs = next_token_probs
    expected = _truncated(probs, top_p)
    torch.manual_seed(1)
    emitted = [t[0] for t in _first_tokens(logits, [draft_token], SamplingParams(temperature=1.0, top_p=top_p))]
    assert (expected > 0).sum() >= 3 and _chi_square(emitted, expected) < CRITICAL
    # The draft is accepted as often as the model would have chosen it.
    accepted = sum(t == draft_token for t in emitted) / DRAWS
    assert abs(accepted - expected[draft_token].item()) < 0.03


def test_the_token_after_an_accepted_draft_follows_the_model_too(next_token_probs):
    logits, probs = next_token_probs
    torch.manual_seed(2)
    emitted = _first_tokens(logits, [0, 1], SamplingParams(temperature=1.0))
    seconds = [t[1] for t in emitted if len(t) >= 2]
    assert len(seconds) > 1000 and _chi_square(seconds, probs) < CRITICAL


def test_a_seeded_row_emits_the_same_tokens_with_or_without_a_draft(next_token_probs):
    logits, _ = next_token_probs
    params = SamplingParams(temperature=1.0, top_p=0.9)
    sampler = Sampler()
    for seed in range(40):
        alone = [sampler(logits[None].clone(), [_seq(params, seed, outputs)]).token_ids[0][0] for outputs in (1, 2)]
        for draft_token in range(len(logits)):
            tokens = sampler(logits.expand(2, -1).clone(), [_seq(params, seed)], [[draft_token]]).token_ids[0]
            # The draft is kept exactly when the draw without it picks it, and then the next position's draw follows.
            assert tokens == (alone if draft_token == alone[0] else alone[:1]), (seed, draft_token)


def test_greedy_accepts_the_longest_matching_prefix_then_the_argmax():
    logits = torch.tensor([[0.0, 5.0, 1.0], [0.0, 1.0, 5.0], [5.0, 0.0, 1.0]])
    greedy = SamplingParams(temperature=0)
    assert Sampler()(logits.clone(), [_seq(greedy)], [[1, 2]]).token_ids == [[1, 2, 0]]
    assert Sampler()(logits.clone(), [_seq(greedy)], [[1, 0]]).token_ids == [[1, 2]]
    assert Sampler()(logits.clone(), [_seq(greedy)], [[2, 2]]).token_ids == [[1]]
