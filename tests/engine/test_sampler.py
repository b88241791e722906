"""Sampler: truncation rules, penalties, min_tokens, seeds and logprobs on hand-made logits."""

from types import SimpleNamespace

import torch

from tokenmill.engine.sampler import Sampler
from tokenmill.sampling import SamplingParams


def _seq(params: SamplingParams, tokens=(0,), outputs=0, seed=None) -> SimpleNamespace:
    tokens = list(tokens)
    return SimpleNamespace(params=params, token_ids=tokens, output_token_ids=tokens[len(tokens) - outputs:],
                           num_output_tokens=outputs, seed=seed, stop_token_ids=params.stop_token_ids + [0])


LOGITS = torch.tensor([[0.0, 1.0, 3.0, 2.9, -1.0, 0.5]])


def _draws(params: SamplingParams, n: int = 300) -> set[int]:
    sampler = Sampler()
    return {sampler(LOGITS.clone(), [_seq(params)]).token_ids[0][0] for _ in range(n)}


def test_greedy_takes_argmax():
    assert _draws(SamplingParams(temperature=0), 5) == {2}


def test_top_k_top_p_and_min_p_limit_the_candidates():
    assert _draws(SamplingParams(temperature=1.0, top_k=2)) == {2, 3}
    assert _draws(SamplingParams(temperature=1.0, top_p=0.01)) == {2}
    assert _draws(SamplingParams(temperature=1.0, min_p=0.5)) == {2, 3}
    assert len(_draws(SamplingParams(temperature=1.0))) >= 5


def test_repetition_penalty_demotes_seen_tokens():
    params = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert Sampler()(LOGITS.clone(), [_seq(params, tokens=[2])]).token_ids == [[3]]


def test_frequency_and_presence_penalties_count_only_outputs():
    params = SamplingParams(temperature=0, frequency_penalty=0.1)
    # Token 2 generated twice: 3.0 - 0.2 < 2.9.
    assert Sampler()(LOGITS.clone(), [_seq(params, tokens=[5, 2, 2], outputs=2)]).token_ids == [[3]]
    # In the prompt only, it is not penalized.
    assert Sampler()(LOGITS.clone(), [_seq(params, tokens=[2, 2, 5], outputs=1)]).token_ids == [[2]]


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.tensor([[9.0, 1.0, 8.0, 0.0]])
    params = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[2])
    assert Sampler()(logits, [_seq(params, outputs=1)]).token_ids == [[1]]


def test_same_seed_and_position_draw_the_same_token_whatever_the_batch():
    params = SamplingParams(temperature=1.0, seed=7)
    alone = [Sampler()(LOGITS.clone(), [_seq(params, seed=7, outputs=k)]).token_ids[0][0] for k in range(20)]
    batch = torch.cat([torch.randn(3, 6), LOGITS])
    noise = SamplingParams(temperature=1.0)
    batched = [Sampler()(batch.clone(), [_seq(noise)] * 3 + [_seq(params, seed=7, outputs=k)]).token_ids[3][0]
               for k in range(20)]
    assert alone == batched and len(set(alone)) > 1


def test_a_top_p_neighbour_does_not_change_a_seeded_row():
    logits = torch.randn(1, 50_000) * 3
    params = SamplingParams(temperature=1.0, seed=3)
    alone = [Sampler()(logits.clone(), [_seq(params, seed=3, outputs=k)]).token_ids[0][0] for k in range(30)]
    neighbour = _seq(SamplingParams(temperature=1.0, top_p=0.5))
    mixed = [Sampler()(torch.cat([logits, logits]), [_seq(params, seed=3, outputs=k), neighbour]).token_ids[0][0]
             for k in range(30)]
    assert alone == mixed


def test_logprobs_report_the_chosen_token_and_top_alternatives():
    out = Sampler()(LOGITS.clone(), [_seq(SamplingParams(temperature=0, logprobs=2))])
    [lp] = out.logprobs[0]
    expected = torch.log_softmax(LOGITS[0], dim=-1)
    assert lp.token_id == 2 and abs(lp.logprob - expected[2].item()) < 1e-6
    assert [t for t, _ in lp.top] == [2, 3]
