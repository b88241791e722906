"""Scheduler: how one step's token budget is shared among decodes, their drafts and prompts."""

from tokenmill.config import EngineConfig
from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.sequence import Sequence, SequenceStatus
from tokenmill.sampling import SamplingParams


def _decoding(scheduler: Scheduler, seq_id: int, drafts: list[int]) -> Sequence:
    """A running sequence with its one next token to compute, and these drafts after it."""
    seq = Sequence(seq_id, str(seq_id), 0, [1, 2], SamplingParams(), 16, [], None, arrival_time=float(seq_id))
    scheduler.block_manager.allocate(seq, 2)
    seq.num_computed_tokens = 1
    seq.status = SequenceStatus.RUNNING
    seq.draft_token_ids = drafts
    scheduler.running.append(seq)
    return seq


def test_drafts_take_only_the_budget_the_other_decodes_leave():
    scheduler = Scheduler(EngineConfig(model="unused", max_num_seqs=4, max_num_batched_tokens=8), BlockManager(32, 4))
    seqs = [_decoding(scheduler, i, [7] * 6 if i < 2 else []) for i in range(4)]
    out = scheduler.schedule()
    # 8 tokens: each of the 4 decodes gets its token, and the first's drafts the 4 left (6 would starve the last two).
    assert dict((seq.seq_id, n) for seq, n in out.scheduled) == {0: 5, 1: 1, 2: 1, 3: 1}
    assert [len(seq.draft_token_ids) for seq in seqs] == [4, 0, 0, 0]


def test_drafts_leave_a_running_prompt_its_next_chunk():
    scheduler = Scheduler(EngineConfig(model="unused", max_num_seqs=4, max_num_batched_tokens=8), BlockManager(32, 4))
    prompt = Sequence(0, "0", 0, list(range(1, 21)), SamplingParams(), 64, [], None, arrival_time=0.0)
    scheduler.block_manager.allocate(prompt, 4)
    prompt.num_computed_tokens = 4
    prompt.status = SequenceStatus.RUNNING
    scheduler.running.append(prompt)
    decodes = [_decoding(scheduler, i, [7] * 6) for i in (1, 2)]
    out = scheduler.schedule()
    # The two decodes' own tokens, then the prompt's chunk takes the 6 left; guesses get none of it.
    assert dict((seq.seq_id, n) for seq, n in out.scheduled) == {1: 1, 2: 1, 0: 6}
    assert [seq.draft_token_ids for seq in decodes] == [[], []]


def _at(scheduler: Scheduler, seq_id: int, tokens: list[int], drafts: list[int], arrival: float) -> Sequence:
    """A running sequence with every token but its last computed, and these drafts after it."""
    seq = Sequence(seq_id, str(seq_id), 0, tokens, SamplingParams(), 16, [], None, arrival_time=arrival)
    scheduler.block_manager.allocate(seq, len(tokens) - 1)
    seq.num_computed_tokens = len(tokens) - 1
    seq.status = SequenceStatus.RUNNING
    seq.draft_token_ids = drafts
    scheduler.running.append(seq)
    return seq


def test_a_lookup_draft_never_takes_the_block_a_later_sequences_next_token_needs():
    # 3 blocks of 4: A holds one, B holds one and its next token (position 4) needs the last one, which A's
    # drafts (positions 2-4) would take. B, or A itself where A arrived later, was preempted for the guess.
    for a_arrival in (0.0, 5.0):
        scheduler = Scheduler(EngineConfig(model="unused", max_num_seqs=4, max_num_batched_tokens=16),
                              BlockManager(3, 4))
        a = _at(scheduler, 0, [1, 2], [7, 7, 7], a_arrival)
        _at(scheduler, 1, [1, 2, 3, 4, 5], [], 1.0)
        out = scheduler.schedule()
        assert out.preempted == [] and dict((seq.seq_id, n) for seq, n in out.scheduled) == {0: 3, 1: 1}
        assert a.draft_token_ids == [7, 7]  # the drafts its own block holds


def test_drafts_under_a_pool_short_of_the_next_tokens_are_dropped_and_the_step_preempts():
    # 3 blocks of 4, all held; B's and C's next tokens each need a new one: the spare count is below zero, where
    # trimming the drafts looped for ever.
    scheduler = Scheduler(EngineConfig(model="unused", max_num_seqs=4, max_num_batched_tokens=16), BlockManager(3, 4))
    a = _at(scheduler, 0, [1, 2], [7, 7], 0.0)
    for seq_id in (1, 2):
        _at(scheduler, seq_id, [1, 2, 3, 4, 5], [], float(seq_id))
    out = scheduler.schedule()
    assert a.draft_token_ids == [] and [seq.seq_id for seq in out.preempted] == [2]
