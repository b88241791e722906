"""Sampling with drafts keeps the model's distribution: chi-square tests that a biased rule fails."""

import pytest
import torch

from types import SimpleNamespace

from tokenmill.engine.sampler import Sampler
from tokenmill.sampling import SamplingParams

DRAWS = 6000
# Chi-square critical value at p = 0.001 for 5 degrees of freedom (6 tokens): a correct rule exceeds it once
# in a thousand runs, and the seed is fixed.
CRITICAL = 20.52


def _seq(params: SamplingParams) -> SimpleNamespace:
    return SimpleNamespace(params=params, token_ids=[0], output_token_ids=[0], num_output_tokens=1, seed=None,
                           stop_token_ids=[])


def _chi_square(tokens: list[int], probs: torch.Tensor) -> float:
    counts = torch.bincount(torch.tensor(tokens), minlength=len(probs)).double()
    expected = probs.double() * len(tokens)
    return float(((counts - expected) ** 2 / expected).sum())


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


@pytest.mark.parametrize("draft_token", [0, 3])
def test_first_token_follows_the_models_distribution_with_a_draft(next_token_probs, draft_token):
    logits, probs = next_token_probs
    torch.manual_seed(1)
    emitted = _first_tokens(logits, [draft_token], SamplingParams(temperature=1.0))
    assert _chi_square([t[0] for t in emitted], probs) < CRITICAL
    # The draft is accepted as often as the model would have chosen it.
    accepted = sum(len(t) == 2 for t in emitted) / DRAWS
    assert abs(accepted - probs[draft_token].item()) < 0.03


def test_the_token_after_an_accepted_draft_follows_the_model_too(next_token_probs):
    logits, probs = next_token_probs
    torch.manual_seed(2)
    emitted = _first_tokens(logits, [0, 1], SamplingParams(temperature=1.0))
    seconds = [t[1] for t in emitted if len(t) >= 2]
    assert len(seconds) > 1000 and _chi_square(seconds, probs) < CRITICAL


def test_a_biased_rule_fails_the_same_test(next_token_probs, monkeypatch):
    # The classic mistake: on rejection, draw again from p rather than from p without the draft token.
    logits, probs = next_token_probs
    accept = Sampler._accept
    monkeypatch.setattr(Sampler, "_accept", staticmethod(
        lambda drafts, seqs, chosen, residual, draft_probs, uniform: accept(drafts, seqs, chosen, chosen,
                                                                            draft_probs, uniform)))
    torch.manual_seed(1)
    emitted = _first_tokens(logits, [0], SamplingParams(temperature=1.0))
    assert _chi_square([t[0] for t in emitted], probs) > 5 * CRITICAL


def test_greedy_accepts_the_longest_matching_prefix_then_the_argmax():
    logits = torch.tensor([[0.0, 5.0, 1.0], [0.0, 1.0, 5.0], [5.0, 0.0, 1.0]])
    greedy = SamplingParams(temperature=0)
    assert Sampler()(logits.clone(), [_seq(greedy)], [[1, 2]]).token_ids == [[1, 2, 0]]
    assert Sampler()(logits.clone(), [_seq(greedy)], [[1, 0]]).token_ids == [[1, 2]]
    assert Sampler()(logits.clone(), [_seq(greedy)], [[2, 2]]).token_ids == [[1]]
