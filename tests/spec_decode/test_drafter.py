"""The drafter's choices: who drafts, how far, and backing off as the batch grows or acceptance falls."""

from types import SimpleNamespace

import pytest

from tokenmill.config import EngineConfig
from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.sequence import Sequence, SequenceStatus
from tokenmill.errors import InvalidRequestError
from tokenmill.sampling import SamplingParams
from tokenmill.spec_decode.config import SpeculativeConfig
from tokenmill.spec_decode.drafter import Drafter
from tokenmill.spec_decode.model_proposer import ModelProposer
from tokenmill.structured.params import StructuredOutput

# A text that repeats itself, so a 2-token tail always has an earlier match to continue.
REPEATING = [5, 6, 7, 8, 9, 10, 11, 12] * 4


def _seq(tokens=REPEATING, outputs=4, max_tokens=100, prediction=(), **params):
    return SimpleNamespace(
        token_ids=list(tokens), output_token_ids=list(tokens[len(tokens) - outputs:]), num_output_tokens=outputs,
        is_decoding=True, max_tokens=max_tokens, params=SamplingParams(**params), prediction_token_ids=list(prediction),
        draft_token_ids=[], drafts_tried=0.0, drafts_accepted=0.0, steps_without_drafts=0,
    )


def _drafter(config: SpeculativeConfig | None, per_step: float = 0.006, per_row: float = 0.0008) -> Drafter:
    """A drafter that has timed decode steps of 1 and 5 rows on a machine with these costs."""
    drafter = Drafter(config)
    drafter.propose([_seq()], None)  # steps are timed only where a sequence could draft
    for rows in (1, 5, 1, 5):
        drafter.observe([(None, 0, rows)], per_step + per_row * rows)
    return drafter


NGRAM = SpeculativeConfig(method="ngram", num_speculative_tokens=4, prompt_lookup_min=2, prompt_lookup_max=3)


def test_a_lone_sequence_drafts_its_repeat_and_a_full_batch_backs_off():
    # A CPU decode step: 6 ms of weight reads whatever the batch, 0.8 ms per row.
    drafter = _drafter(NGRAM)
    alone = _seq()
    drafter.propose([alone], None)
    assert alone.draft_token_ids == [5, 6, 7, 8][: len(alone.draft_token_ids)] and alone.draft_token_ids
    batch = [_seq() for _ in range(32)]
    drafter.propose(batch, None)
    # 32 rows: a draft row now costs 0.8 / 31.6 of a step yielding 32 tokens; a 0.5 guess does not pay.
    assert all(s.draft_token_ids == [] for s in batch)


def test_acceptance_sets_how_far_a_sequence_drafts():
    drafter = _drafter(NGRAM)
    good, bad = _seq(), _seq()
    good.drafts_tried, good.drafts_accepted = 40.0, 39.0
    bad.drafts_tried, bad.drafts_accepted = 40.0, 2.0
    drafter.propose([good, bad], None)
    assert len(good.draft_token_ids) == 4 and bad.draft_token_ids == []
    # Skipping lets the counts decay toward the prior, so it drafts again later.
    assert bad.drafts_tried < 40.0


def test_a_sequence_kept_from_drafting_by_the_fit_probes_and_drafts_on_if_its_guess_holds():
    # A row fitted dearer than a step: a 0.5 prior never pays, and without drafts nothing would change that.
    drafter = _drafter(NGRAM, per_step=0.006, per_row=0.009)
    for emitted, drafts_next in (([5, 6], [5]), ([9], [])):
        seq = _seq()
        for step in range(33):
            drafter.propose([seq], None)
            assert seq.draft_token_ids == ([5] if step == 32 else [])
        drafter.record([seq], [emitted])
        drafter.propose([seq], None)
        assert seq.draft_token_ids == drafts_next


def test_no_drafts_without_a_method_with_penalties_a_grammar_or_at_max_tokens():
    drafter = _drafter(None)
    plain = _seq()
    drafter.propose([plain], None)
    assert plain.draft_token_ids == []
    drafter = _drafter(NGRAM)
    penalized, last = _seq(repetition_penalty=1.2), _seq(outputs=4, max_tokens=5)
    constrained = _seq(structured_output=StructuredOutput(choice=["yes", "no"]))
    nearly = _seq(outputs=4, max_tokens=7)
    nearly.drafts_tried, nearly.drafts_accepted = 40.0, 39.0
    drafter.propose([penalized, last, nearly, constrained], None)
    assert penalized.draft_token_ids == [] and last.draft_token_ids == [] and constrained.draft_token_ids == []
    assert len(nearly.draft_token_ids) == 2  # 3 tokens left: 2 drafts and the token after them


def test_a_predicted_output_drafts_without_a_speculative_config():
    drafter = _drafter(None)
    seq = _seq(tokens=[1, 2, 3, 40, 41], outputs=2, prediction=[40, 41, 42, 43, 44])
    drafter.propose([seq], None)
    assert seq.draft_token_ids[:3] == [42, 43, 44]


def test_record_counts_drafts_by_position():
    drafter = _drafter(NGRAM)
    a, b = _seq(), _seq()
    a.draft_token_ids, b.draft_token_ids = [1, 2, 3], [4, 5]
    drafter.record([a, b], [[1, 2, 7], [9]])
    c = drafter.counters
    assert (c.num_drafts, c.num_draft_tokens, c.num_accepted_tokens) == (2, 5, 2)
    assert c.accepted_per_pos == [1, 1, 0]
    assert (a.drafts_tried, a.drafts_accepted) == (3.0, 2.0) and (b.drafts_tried, b.drafts_accepted) == (1.0, 0.0)


def test_steps_with_a_prompt_chunk_are_left_out_of_the_fit_and_one_size_is_not_enough():
    drafter = Drafter(NGRAM)
    drafter.observe([(None, 0, 1)], 0.006)
    assert drafter.step_times.num_steps == 0  # nobody could draft: nothing to learn from it
    drafter.propose([_seq()], None)
    drafter.observe([(None, 0, 1)], 0.006)
    drafter.observe([(None, 0, 1)], 0.006)
    drafter.observe([(None, 30, 0), (None, 0, 1)], 0.05)
    assert drafter.step_times.num_steps == 2
    # Only plain steps of one row timed: draft, so the next step is of another size; only drafting steps timed:
    # do not, for the same reason.
    assert drafter._threshold(1) == 0.0
    assert Drafter(NGRAM)._threshold(1) == 0.0
    drafting = Drafter(NGRAM)
    drafting.propose([_seq()], None)
    drafting.observe([(None, 0, 5)], 0.0092)
    assert drafting._threshold(1) == 1.0
    drafter.observe([(None, 0, 5)], 0.0092)
    assert abs(drafter.step_times.per_decode_token - 0.0008) < 1e-6 and drafter._threshold(32) > 0.8


def _running(scheduler: Scheduler, seq_id: int, prompt: list[int], outputs: list[int], computed: int) -> Sequence:
    seq = Sequence(seq_id, str(seq_id), 0, prompt, SamplingParams(), 64, [], None, arrival_time=float(seq_id))
    seq.token_ids += outputs
    scheduler.block_manager.allocate(seq, computed)
    seq.num_computed_tokens = computed
    seq.status = SequenceStatus.RUNNING
    scheduler.running.append(seq)
    return seq


def test_a_draft_model_runs_its_rejected_drafts_positions_again_after_steps_without_drafts():
    runner = SimpleNamespace(block_size=16, device="cpu")
    proposer = ModelProposer(None, runner, None, own_cache=True, max_tokens=32)
    starts: list[int] = []
    proposer._next_tokens = lambda chunks: starts.append(chunks[0].start) or [9] * len(chunks)
    scheduler = Scheduler(EngineConfig(model="unused", max_num_seqs=4, max_num_batched_tokens=32),
                          BlockManager(64, 16))
    seq = _running(scheduler, 0, list(range(1, 11)), [7], 10)
    seq.draft_computed = 10  # the draft model has seen every computed token
    seq.detokenizer = SimpleNamespace(add=lambda token_id, check_stop: None)  # no text: no stop strings
    [seq.draft_token_ids] = proposer.propose([seq], [3])  # its pool now holds the guesses at 11 and 12
    scheduler.update(scheduler.schedule(), [seq], [[5]], [None])  # the first guess rejected: 5 at 11
    for token in (6, 6, 6):  # steps without drafts (a long prompt took the budget, say)
        scheduler.update(scheduler.schedule(), [seq], [[token]], [None])
    starts.clear()
    proposer.propose([seq], [1])
    assert starts[0] == 11  # from the first position whose token the draft model has not seen


class _Proposer:
    """Drafts k copies of token 9, whatever the context."""

    def propose(self, seqs, ks):
        return [[9] * k for k in ks]


def test_model_drafts_take_no_block_another_sequences_next_token_needs():
    scheduler = Scheduler(EngineConfig(model="unused", max_num_seqs=4, max_num_batched_tokens=16), BlockManager(3, 4))
    _running(scheduler, 0, [1, 2], [3], 2)  # next token at position 2: in its block
    _running(scheduler, 1, [1, 2, 3, 4], [5], 4)  # next token at position 4: needs the one free block
    early_exit = SpeculativeConfig(method="early_exit", exit_layer=1, num_speculative_tokens=3, adaptive=False)
    Drafter(early_exit, _Proposer()).propose(scheduler.running, scheduler.block_manager)
    # The first's 3 drafts would take that block; the second's fit in the block its own token takes.
    assert [s.draft_token_ids for s in scheduler.running] == [[], [9, 9, 9]]
    assert scheduler.schedule().preempted == []


def test_a_draft_model_catches_up_on_a_long_context_within_the_step_budget():
    passes: list[int] = []
    runner = SimpleNamespace(block_size=16, device="cpu")
    proposer = ModelProposer(None, runner, None, own_cache=True, max_tokens=32)
    proposer._next_tokens = lambda chunks: passes.append(sum(len(c.token_ids) for c in chunks)) or [9] * len(chunks)
    scheduler = Scheduler(EngineConfig(model="unused", max_num_seqs=4, max_num_batched_tokens=32),
                          BlockManager(64, 16))
    seq = _running(scheduler, 0, list(range(1, 101)), [7], 100)  # the target prefilled it in 32-token chunks
    drafts = []
    while not drafts:
        [drafts] = proposer.propose([seq], [2])
    assert passes == [32, 32, 32, 5, 1]  # 101 tokens caught up over four steps, then the second draft
    assert drafts == [9, 9] and seq.draft_computed == 102


def test_a_draft_model_far_behind_does_not_take_the_others_drafts():
    runner = SimpleNamespace(block_size=16, device="cpu")
    proposer = ModelProposer(None, runner, None, own_cache=True, max_tokens=32)
    proposer._next_tokens = lambda chunks: [9] * len(chunks)
    scheduler = Scheduler(EngineConfig(model="unused", max_num_seqs=4, max_num_batched_tokens=32),
                          BlockManager(64, 16))
    behind = _running(scheduler, 0, list(range(1, 101)), [7], 100)  # first in line, 101 tokens to catch up
    caught_up = _running(scheduler, 1, [1, 2], [3], 2)
    caught_up.draft_computed = 2
    assert proposer.propose([behind, caught_up], [2, 2]) == [[], [9, 9]]
    assert behind.draft_computed == 31  # the budget's rest: 32 less the other's one token


def test_nothing_is_drafted_while_a_running_prompt_takes_the_whole_budget():
    calls = []
    proposer = SimpleNamespace(propose=lambda seqs, ks: calls.append(ks) or [[9] * k for k in ks])
    scheduler = Scheduler(EngineConfig(model="unused", max_num_seqs=4, max_num_batched_tokens=16), BlockManager(32, 4))
    decode = _running(scheduler, 0, [1, 2], [3], 2)
    prompt = _running(scheduler, 1, list(range(1, 41)), [], 4)  # 36 tokens left: more than the budget
    early_exit = SpeculativeConfig(method="early_exit", exit_layer=1, num_speculative_tokens=3, adaptive=False)
    Drafter(early_exit, proposer).propose(scheduler.running, scheduler.block_manager, budget=16)
    assert calls == [] and decode.draft_token_ids == []  # the scheduler would drop them: the model never runs
    prompt.num_computed_tokens = 36  # 4 left: 16 - 1 - 4 leaves room for the decode's 3 drafts
    Drafter(early_exit, proposer).propose(scheduler.running, scheduler.block_manager, budget=16)
    assert calls == [[3]] and decode.draft_token_ids == [9, 9, 9]


def test_a_lookup_that_finds_nothing_leaves_the_step_budget_to_the_next_sequence():
    no_match, repeating = _seq(list(range(100, 140))), _seq()
    for seq in (no_match, repeating):
        seq.num_uncomputed_tokens = 1
    # Budget 6: the two sequences' own tokens, and 4 left for drafts, which the empty lookup took.
    Drafter(SpeculativeConfig(method="ngram", num_speculative_tokens=4, adaptive=False)).propose(
        [no_match, repeating], None, budget=6)
    assert no_match.draft_token_ids == [] and repeating.draft_token_ids == [5, 6, 7, 8]


@pytest.mark.parametrize("config", ['{"num_speculative_tokens": 4.0}', '{"prompt_lookup_max": true}',
                                    '{"method": "early_exit", "exit_layer": 20.5}'])
def test_a_count_that_is_not_an_integer_is_refused(config):
    with pytest.raises(InvalidRequestError, match="must be an integer"):  # it failed every step it drafted in
        SpeculativeConfig.parse(config)


@pytest.mark.parametrize("config, message", [
    ('{"model": 5}', "model=5 must be a string"),  # a TypeError traceback from pathlib
    ('{"method": "draft_model", "model": ["smollm2-135m"]}', "must be a string"),
    ('{"adaptive": "no"}', "adaptive='no' must be true or false"),  # read as true
])
def test_a_setting_of_the_wrong_kind_is_refused(config, message):
    with pytest.raises(InvalidRequestError, match=message):
        SpeculativeConfig.parse(config)
    # null is vLLM's "work it out": it reached the draft engine's config, refused after the draft model opened.
    assert SpeculativeConfig.parse('{"model": "smollm2-135m", "quantization": null}').quantization == "auto"


@pytest.mark.parametrize("config, method", [('{"model": "smollm2-135m"}', "draft_model"), ('{}', "ngram"),
                                            ('{"model": "[ngram]"}', "ngram"), ('{"model": "ngram"}', "ngram")])
def test_the_method_left_out_is_worked_out_as_vllm_does(config, method):
    # A model named without a method drafted by prompt lookup, never loading the model.
    assert SpeculativeConfig.parse(config).method == method
