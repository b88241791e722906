"""Sampler: truncation rules, penalties, min_tokens, seeds and logprobs on hand-made logits."""

import math
from types import SimpleNamespace

import pytest
import torch

from tokenmill import ops
from tokenmill.engine.sampler import Sampler
from tokenmill.sampling import SamplingParams
from tokenmill.server.protocol import penalty_window
from tokenmill.structured.params import StructuredOutput


def _seq(params: SamplingParams, tokens=(0,), outputs=0, seed=None) -> SimpleNamespace:
    tokens = list(tokens)
    return SimpleNamespace(params=params, token_ids=tokens, output_token_ids=tokens[len(tokens) - outputs:],
                           num_output_tokens=outputs, seed=seed, stop_token_ids=params.stop_token_ids + [0],
                           logit_bias_tensors=None)


LOGITS = torch.tensor([[0.0, 1.0, 3.0, 2.9, -1.0, 0.5]])


def _draws(params: SamplingParams, n: int = 300) -> set[int]:
    sampler = Sampler()
    return {sampler(LOGITS.clone(), [_seq(params)]).token_ids[0][0] for _ in range(n)}


def test_greedy_takes_argmax():
    assert _draws(SamplingParams(temperature=0), 5) == {2}


def test_a_temperature_near_zero_takes_argmax():
    # 3 / 1e-40 overflows float32: sampled, the row would be NaN throughout and argmax would give token 0.
    assert _draws(SamplingParams(temperature=1e-40), 5) == {2}


def test_top_k_top_p_and_min_p_limit_the_candidates():
    assert _draws(SamplingParams(temperature=1.0, top_k=2)) == {2, 3}
    assert _draws(SamplingParams(temperature=1.0, top_p=0.01)) == {2}
    assert _draws(SamplingParams(temperature=1.0, min_p=0.5)) == {2, 3}
    assert len(_draws(SamplingParams(temperature=1.0))) >= 5
    assert len(_draws(SamplingParams(temperature=1.0, top_k=0))) >= 5  # 0 is off, as -1
    assert len(_draws(SamplingParams(temperature=1.0, top_k=100, top_p=0.999))) >= 5  # past the vocabulary: all


def test_top_p_weighs_the_top_k_survivors_renormalized():
    # 0.4 and 0.3, then 0.3 over 30 tokens; top_k 2 leaves 0.571 and 0.429, of which top_p 0.5 keeps the first
    # alone (vLLM and transformers); measured on the whole distribution, 0.4 < 0.5 kept the second too.
    logits = torch.tensor([[0.4, 0.3] + [0.01] * 30]).log()
    sampler, seq = Sampler(), _seq(SamplingParams(temperature=1.0, top_k=2, top_p=0.5))
    assert {sampler(logits.clone(), [seq]).token_ids[0][0] for _ in range(200)} == {0}


def test_top_k_keeps_the_tokens_tied_with_the_kth():
    logits = torch.tensor([[3.0, 2.0, 2.0, 0.0, -1.0]])
    sampler, seq = Sampler(), _seq(SamplingParams(temperature=1.0, top_k=2))
    assert {sampler(logits.clone(), [seq]).token_ids[0][0] for _ in range(400)} == {0, 1, 2}


def test_repetition_penalty_demotes_seen_tokens():
    params = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert Sampler()(LOGITS.clone(), [_seq(params, tokens=[2])]).token_ids == [[3]]


def test_a_repetition_window_penalizes_the_last_tokens_alone_prompt_included():
    # llama.cpp's and Ollama's repeat_last_n: token 2 is out of the last one, token 3 in it.
    windowed = SamplingParams(temperature=0, repetition_penalty=2.0, repetition_window=1)
    assert Sampler()(LOGITS.clone(), [_seq(windowed, tokens=[2, 0])]).token_ids == [[2]]
    assert Sampler()(LOGITS.clone(), [_seq(windowed, tokens=[0, 2])]).token_ids == [[3]]
    # Presence over the window, the prompt's tokens too (llama.cpp's); without one, only the output's (OpenAI's).
    present = dict(temperature=0, presence_penalty=2.0)
    assert Sampler()(LOGITS.clone(), [_seq(SamplingParams(**present), tokens=[2])]).token_ids == [[2]]
    windowed = SamplingParams(**present, repetition_window=4)
    assert Sampler()(LOGITS.clone(), [_seq(windowed, tokens=[2])]).token_ids == [[3]]
    # repeat_last_n -1, the whole context, is a window past any: the prompt counts as with any other.
    whole = SamplingParams(**present, repetition_window=penalty_window(-1, "repeat_last_n"))
    assert Sampler()(LOGITS.clone(), [_seq(whole, tokens=[2])]).token_ids == [[3]]


def test_a_repetition_penalty_near_zero_promotes_the_seen_token_when_sampling_too():
    # 3 / 1e-38 is within float32, but not once divided by the temperature: the row would be NaN and the
    # draw token 0 (SmolLM2's EOS).
    params = SamplingParams(temperature=0.5, repetition_penalty=1e-38)
    sampler = Sampler()
    assert {sampler(LOGITS.clone(), [_seq(params, tokens=[2])]).token_ids[0][0] for _ in range(20)} == {2}
    # llama.cpp's order cuts the untempered row, which the penalty pushes past float's range as well.
    params = SamplingParams(temperature=0.5, repetition_penalty=1e-45, min_p=0.1, temperature_last=True)
    assert {sampler(LOGITS.clone(), [_seq(params, tokens=[2])]).token_ids[0][0] for _ in range(20)} == {2}


def test_logit_bias_shifts_the_named_tokens_before_penalties_and_on_draft_rows():
    greedy = SamplingParams(temperature=0, logit_bias={2: -100.0})
    assert Sampler()(LOGITS.clone(), [_seq(greedy)]).token_ids == [[3]]  # 2 all but banned
    assert _draws(SamplingParams(temperature=1.0, logit_bias={4: 100.0}), 50) == {4}  # 4 all but forced
    # Repetition divides the biased logit, as vLLM orders them: (1.0 + 2.5) / 2 = 1.75 loses to 0.5 + 2.0 = 2.5;
    # penalizing first, 1.0 / 2 + 2.5 = 3.0 would win.
    both = SamplingParams(temperature=0, logit_bias={1: 2.5, 5: 2.0, 2: -10.0, 3: -10.0}, repetition_penalty=2.0)
    assert Sampler()(LOGITS.clone(), [_seq(both, tokens=[1])]).token_ids == [[5]]
    # A sequence with a bias and drafts: every row biased, so the draft of token 4 is accepted and 4 follows it.
    rows = LOGITS.repeat(2, 1)
    assert Sampler()(rows, [_seq(SamplingParams(temperature=0, logit_bias={4: 100.0}))], [[4]]).token_ids == [[4, 4]]


def test_frequency_and_presence_penalties_count_only_outputs():
    params = SamplingParams(temperature=0, frequency_penalty=0.1)
    # Token 2 generated twice: 3.0 - 0.2 < 2.9.
    assert Sampler()(LOGITS.clone(), [_seq(params, tokens=[5, 2, 2], outputs=2)]).token_ids == [[3]]
    # In the prompt only, it is not penalized.
    assert Sampler()(LOGITS.clone(), [_seq(params, tokens=[2, 2, 5], outputs=1)]).token_ids == [[2]]


@pytest.mark.parametrize("penalty, expected", [(0.2, 3), (0.08, 2)])
def test_a_presence_penalty_counts_a_generated_token_once(penalty, expected):
    # Token 2 generated twice: 3.0 - 0.2 < 2.9 drops it, 3.0 - 0.08 keeps it (not 3.0 - 2 * 0.08, frequency's rule).
    params = SamplingParams(temperature=0, presence_penalty=penalty)
    assert Sampler()(LOGITS.clone(), [_seq(params, tokens=[5, 2, 2], outputs=2)]).token_ids == [[expected]]


def test_temperature_sharpens_the_distribution_draws_come_from():
    torch.manual_seed(0)
    draws = 6000
    out = Sampler()(LOGITS.repeat(draws, 1), [_seq(SamplingParams(temperature=0.5))] * draws).token_ids
    counts = torch.bincount(torch.tensor([t[0] for t in out]), minlength=6).double()
    expected = torch.softmax(LOGITS[0] / 0.5, -1).double() * draws
    kept = expected > 5
    # Pearson's chi-square with 3 degrees of freedom (4 tokens kept) at p = 0.0001: 21.1. At temperature 1 the
    # counts land hundreds away from these.
    assert ((counts[kept] - expected[kept]) ** 2 / expected[kept]).sum() < 21.1


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


@pytest.mark.parametrize("seed", [-1, 2**40, 2**63 - 1])
def test_any_64_bit_seed_is_taken_and_draws_the_same_tokens_again(seed):
    # Clients send random 63-bit seeds, and -1; OpenAI and vLLM take any 64-bit integer.
    params = SamplingParams(temperature=1.0, seed=seed)
    draws = [[Sampler()(LOGITS.clone(), [_seq(params, seed=seed, outputs=k)]).token_ids[0][0] for k in range(20)]
             for _ in range(2)]
    assert draws[0] == draws[1] and len(set(draws[0])) > 1


def test_seeds_2_to_the_32_apart_draw_differently():
    # The CPU generator keeps a seed's low 32 bits; the high ones must still count.
    logits = torch.zeros(1, 1000)  # uniform: 20 equal draws of 20 pairs by chance is about 1e-60
    params = SamplingParams(temperature=1.0)
    same = sum(Sampler()(logits.clone(), [_seq(params, seed=s)]).token_ids[0][0]
               == Sampler()(logits.clone(), [_seq(params, seed=s + 2**32)]).token_ids[0][0] for s in range(20))
    assert same < 3


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
    assert [t for t, _ in lp.top] == [2, 3] and lp.rank == 1


def test_a_tokens_rank_counts_the_tokens_at_least_as_likely_as_vllm_v1():
    logits = torch.tensor([[0.0, 0.0, -1.0], [-1.0, 0.0, 0.0]])  # ties at the top: argmax takes the first
    out = Sampler()(logits, [_seq(SamplingParams(temperature=0, logprobs=0)) for _ in range(2)])
    assert [lp.rank for [lp] in out.logprobs] == [2, 2]
    # Only the rows that ask are ranked: a neighbour without logprobs shifts nothing.
    plain, asking = _seq(SamplingParams(temperature=0)), _seq(SamplingParams(temperature=0, logprobs=0))
    out = Sampler()(logits.clone(), [plain, asking])
    assert out.logprobs[0] is None and out.logprobs[1][0].rank == 2
    [_, tied, last] = Sampler().prompt_logprobs(torch.tensor([[0.0, 0.0, -1.0]] * 3), [0, 1, 2], 0)
    assert (tied.rank, last.rank) == (2, 3)


@pytest.mark.parametrize("kind", ["normal", "ties", "mostly -inf", "some NaN", "all NaN", "all -inf"])
def test_argmax_rows_is_torch_s_first_maximum_nan_above_all(kind):
    from tokenmill.engine.sampler import _argmax

    assert ops.available(), "the C++ ops must build on the test machine"
    gen = torch.Generator().manual_seed(0)
    # Widths about the C++ op's 8-lane vectors and 32-wide steps, and SmolLM2's vocabulary with a ragged end.
    for n in (1, 7, 8, 9, 31, 32, 33, 65, 1000, 49155):
        x = torch.randn(6, n, generator=gen)
        if kind == "ties":
            x = torch.randint(0, 3, (6, n), generator=gen).float()
        elif kind == "mostly -inf":
            x[torch.rand(6, n, generator=gen) < 0.9] = float("-inf")
        elif kind == "some NaN":
            x[torch.rand(6, n, generator=gen) < 0.01] = float("nan")
        elif kind == "all NaN":
            x[:] = float("nan")
        elif kind == "all -inf":
            x[:] = float("-inf")
        assert torch.equal(_argmax(x), x.max(dim=-1).indices), (kind, n)
        assert torch.equal(_argmax(x[::2]), x[::2].max(dim=-1).indices), (kind, n)  # rows further apart


def test_logit_bias_tensors_are_built_once_per_sequence():
    # Rebuilt from the dict each step, a 40,000-entry bias made every step of its batch 6x slower.
    seq = _seq(SamplingParams(temperature=0, logit_bias={4: 100.0}))
    sampler = Sampler()
    assert sampler(LOGITS.clone(), [seq]).token_ids == [[4]]
    built = seq.logit_bias_tensors
    assert sampler(LOGITS.clone(), [seq]).token_ids == [[4]] and seq.logit_bias_tensors is built


class _TwoTokens:
    """A grammar that allows tokens 2 and 3 only (llguidance's bitmask: one 32-bit word per 32 tokens)."""

    vocab_size = 8

    def mask(self) -> torch.Tensor:
        return torch.tensor([[(1 << 2) | (1 << 3)]], dtype=torch.int32)


def test_a_constrained_rows_logprobs_are_over_the_tokens_its_grammar_allows():
    # As vLLM, which masks before reading logprobs: a guided_choice answer came back at rank 24,907, its top
    # alternatives tokens the grammar forbids.
    params = SamplingParams(temperature=0, logprobs=2, structured_output=StructuredOutput(choice=["a"]))
    seq = SimpleNamespace(**vars(_seq(params)), grammar=_TwoTokens())
    logits = torch.tensor([[0.0, 9.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    out = Sampler()(logits, [seq])
    (logprob,) = out.logprobs[0]
    assert out.token_ids == [[2]] and {t for t, _ in logprob.top} == {2, 3}
    assert logprob.logprob == pytest.approx(math.log(0.5), abs=1e-6) and logprob.rank == 2  # the tie counts


def test_temperature_last_cuts_the_models_own_distribution_as_llama_cpp():
    # llama.cpp's order (its /completion's samplers list says it): min_p at a high temperature kept every token.
    hot = dict(temperature=100.0, min_p=0.5)
    assert _draws(SamplingParams(**hot, temperature_last=True)) == {2, 3}
    assert len(_draws(SamplingParams(**hot))) > 2


def test_temperature_last_weighs_top_p_before_min_p_as_llama_cpp():
    # llama.cpp's top_p weighs what top_k left; min_p last. Weighed after min_p's cut, token 2 had 0.958 of the mass
    # before it and was dropped, where llama.cpp keeps it (0.92 < 0.95).
    probs = torch.tensor([[0.6, 0.32, 0.04] + [0.001] * 40])
    logits = probs.log()
    params = SamplingParams(temperature=1.0, top_p=0.95, min_p=0.05, temperature_last=True)
    sampler = Sampler()
    drawn = {sampler(logits.clone(), [_seq(params)]).token_ids[0][0] for _ in range(400)}
    assert drawn == {0, 1, 2}
