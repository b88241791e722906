"""Deadlines in the engine: earliest-deadline-first order, refusal on arrival, dropping while waiting, met/missed."""

from dataclasses import dataclass

import pytest

from tokenmill.config import EngineConfig
from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.deadlines import WARMUP_STEPS, DeadlineError, DeadlineKeeper
from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.sequence import Sequence
from tokenmill.sampling import SamplingParams
from tokenmill.server.metrics import Metrics


@pytest.fixture(scope="module")
def engine(make_engine):
    return make_engine(max_num_seqs=2, max_num_batched_tokens=64)


@dataclass
class FixedStepTimes:
    """A step-time fit that says what the test sets, as if measured over many steps."""

    per_step: float
    per_prefill_token: float = 0.0
    num_steps: int = 100
    per_decode_token: float = 0.0

    def observe(self, prefill_tokens: int, decode_tokens: int, seconds: float) -> None:
        pass  # the test, not the real steps, sets the engine's speed


@pytest.fixture
def slow_steps(engine, monkeypatch):
    """Step times as if each step took 50 ms (plus 1 ms per prompt token)."""
    times = FixedStepTimes(per_step=0.05, per_prefill_token=0.001)
    monkeypatch.setattr(engine.deadlines, "times", times)
    return times


def _waiting_ids(engine) -> list[str]:
    return [seq.request_id for seq in engine.scheduler.waiting]


def test_waiting_queue_serves_earliest_deadline_first_then_priority_and_arrival(engine):
    waiting = {}
    for policy in ("deadline", "fcfs"):
        config = EngineConfig(model=engine.config.model, max_num_seqs=2, scheduling_policy=policy)
        scheduler = Scheduler(config, BlockManager(8, 16))
        for i, (name, params) in enumerate([
            ("none-low-priority", SamplingParams(priority=1)), ("none", SamplingParams()),
            ("loose", SamplingParams(deadline_ms=9000)), ("tight", SamplingParams(ttft_deadline_ms=500)),
        ]):
            detokenizer = IncrementalDetokenizer(engine.tokenizer, [1], [], False)
            scheduler.add(Sequence(i, name, 0, [1], params, 4, [], detokenizer, arrival_time=float(i)))
        waiting[policy] = [seq.request_id for seq in scheduler.waiting]
    assert waiting["deadline"] == ["tight", "loose", "none", "none-low-priority"]
    assert waiting["fcfs"] == ["none", "loose", "tight", "none-low-priority"]


def test_infeasible_deadline_is_refused_on_arrival_with_the_estimate_and_nothing_queued(engine, slow_steps):
    free = engine.block_manager.num_free_blocks
    with pytest.raises(DeadlineError, match=r"refused: the answer \(40 tokens at most\) is estimated to end") as info:
        engine.add_request("late", "Hello there", SamplingParams(max_tokens=40, deadline_ms=500))
    # 40 steps of 50 ms: about 2 s, well past 500 ms.
    assert 1900 < info.value.estimate_ms < 2500
    assert not engine.has_unfinished() and "late" not in engine.requests
    assert engine.block_manager.num_free_blocks == free
    with pytest.raises(DeadlineError, match="first token is estimated"):  # 300 prompt tokens: 5 chunks, 0.55 s
        engine.add_request("late-ttft", list(range(300, 600)), SamplingParams(max_tokens=1, ttft_deadline_ms=200))
    engine.add_request("fits", "Hello there", SamplingParams(max_tokens=4, deadline_ms=1000))
    engine.abort("fits")


def test_sequences_queued_for_a_slot_are_counted_as_holding_it(engine, slow_steps):
    # Two slots and nothing running: four 20-token requests (or one of n=4) were all admitted against 1.5 s, though
    # the last two start only once the first two's 20 steps (1 s) are done and end at about 2 s.
    params = SamplingParams(max_tokens=20, ignore_eos=True, deadline_ms=1500)
    try:
        engine.add_request("s0", "Hello there", params)
        engine.add_request("s1", "Hello there", params)
        with pytest.raises(DeadlineError, match="estimated to end"):
            engine.add_request("s2", "Hello there", params)
        with pytest.raises(DeadlineError, match="estimated to end"):
            engine.add_request("n4", "Hello there", SamplingParams(n=4, max_tokens=20, ignore_eos=True,
                                                                   deadline_ms=2500))
    finally:
        for request_id in ("s0", "s1"):
            engine.abort(request_id)
    engine.add_request("n2", "Hello there", SamplingParams(n=2, max_tokens=20, ignore_eos=True, deadline_ms=1500))
    engine.abort("n2")


def test_fcfs_policy_never_refuses(engine):
    config = EngineConfig(model=engine.config.model, scheduling_policy="fcfs")
    keeper = DeadlineKeeper(config, engine.scheduler)
    keeper.times = FixedStepTimes(per_step=1.0)
    detokenizer = IncrementalDetokenizer(engine.tokenizer, [1], [], False)
    keeper.check_new([Sequence(0, "x", 0, [1], SamplingParams(deadline_ms=1), 50, [], detokenizer, 0.0)], 10.0)
    assert keeper.infeasible(10.0) == []


def test_step_time_fit_leaves_out_the_warm_up_steps(engine):
    keeper = DeadlineKeeper(engine.config, engine.scheduler)
    for _ in range(WARMUP_STEPS):
        keeper.observe([(None, 0, 1)], 30.0)  # first calls: allocations, kernel selection
    for _ in range(10):
        keeper.observe([(None, 0, 1)], 0.05)
    assert keeper.times.num_steps == 10
    assert keeper.times.per_step + keeper.times.per_decode_token == pytest.approx(0.05)


def test_late_answer_is_marked_missed_and_counted(engine, monkeypatch, drain):
    # Before enough steps are measured nothing is refused: "late" runs and ends after its 1 ms.
    monkeypatch.setattr(engine.deadlines, "times", FixedStepTimes(per_step=1.0, num_steps=0))
    engine.add_request("late", "Hello there", SamplingParams(max_tokens=3, ignore_eos=True, deadline_ms=1))
    engine.add_request("roomy", "Hello there", SamplingParams(max_tokens=3, deadline_ms=600_000))
    engine.add_request("plain", "Hello there", SamplingParams(max_tokens=3))
    finals = drain(engine)
    assert finals["late"].outputs[0].finish_reason == "length"  # served in full, but late: marked so
    assert finals["late"].metrics.deadline_status == "missed"
    assert finals["roomy"].metrics.deadline_status == "met"
    assert finals["plain"].metrics.deadline_status is None
    metrics = Metrics("m")
    for output in finals.values():
        metrics.observe_finished(output)
    counts = {s.labels["outcome"]: s.value for family in metrics.registry.collect()
              if family.name == "tokenmill:deadline_requests" for s in family.samples if s.name.endswith("_total")}
    assert counts == {"met": 1.0, "missed": 1.0, "refused": 0.0, "dropped": 0.0}


def test_request_that_becomes_infeasible_while_waiting_is_dropped_and_frees_its_blocks(engine, slow_steps):
    free = engine.block_manager.num_free_blocks
    engine.add_request("busy-1", "Hello there", SamplingParams(max_tokens=30, ignore_eos=True))
    engine.add_request("busy-2", "Hello there", SamplingParams(max_tokens=30, ignore_eos=True))
    engine.step()  # both slots taken
    # Its slot frees in 29 steps of 50 ms: about 1.6 s with its own tokens, within 3 s.
    engine.add_request("waits", "Hello there", SamplingParams(max_tokens=4, deadline_ms=3000))
    assert _waiting_ids(engine) == ["waits"]
    slow_steps.per_step = 0.5  # the engine slowed down: the slot now frees in about 14 s
    outputs = engine.step()
    dropped = [o for o in outputs if o.request_id == "waits"]
    assert len(dropped) == 1 and dropped[0].finished
    assert dropped[0].metrics.deadline_status == "dropped"
    assert dropped[0].metrics.deadline_error.startswith("dropped while waiting: the answer")
    assert "waits" not in engine.requests and not engine.scheduler.waiting
    engine.abort("busy-1")
    engine.abort("busy-2")
    assert engine.block_manager.num_free_blocks == free


def test_a_request_already_served_is_not_dropped_when_a_sample_of_it_waits(engine, slow_steps, drain):
    engine.add_request("busy", "Hello there", SamplingParams(max_tokens=30, ignore_eos=True))
    # Two samples for the one free slot: the second waits for it, its request already streaming.
    engine.add_request("pair", "Hello there", SamplingParams(n=2, max_tokens=30, ignore_eos=True, deadline_ms=3000))
    engine.step()
    engine.step()
    assert [seq.request_id for seq in engine.scheduler.waiting] == ["pair"]
    slow_steps.per_step = 0.5  # now far too slow for the waiting sample to finish in time
    finals = drain(engine)
    # Answered (met or missed by the clock; the estimate said too late), not dropped with its work lost.
    assert finals["pair"].metrics.deadline_status in ("met", "missed")
    assert [sample.finish_reason for sample in finals["pair"].outputs] == ["length", "length"]


def test_samples_of_one_prompt_are_estimated_to_compute_it_once(engine, slow_steps):
    # 320 prompt tokens: 20 full blocks the other three samples take from the first once it has computed them.
    # Counting the prompt four times estimated the first token at 1.7 s; computed once (5 chunks + 3 blocks'
    # worth), it is about 0.6 s.
    params = SamplingParams(n=4, max_tokens=1, ttft_deadline_ms=1200)
    engine.add_request("n4", list(range(700, 1020)), params)
    engine.abort("n4")
    # With prompt logprobs too: the first sample scores the prompt, the others take its blocks (they computed
    # their own, and were estimated so, until the scheduler let them look the blocks up).
    engine.add_request("n4-logprobs", list(range(700, 1020)), SamplingParams(n=4, max_tokens=1, prompt_logprobs=0,
                                                                              ttft_deadline_ms=1200))
    engine.abort("n4-logprobs")
