"""The dynamic batching policy (token budget, wait limit, sorting) and the engine thread, on fakes."""

import asyncio
import threading
import time

import pytest
import torch

from tokenmill.embeddings.batcher import Batcher, BatchPolicy, plan_batches
from tokenmill.embeddings.engine import BatchStats, EmbeddingEngine


def test_plan_sorts_by_length_and_keeps_padded_size_within_budget():
    lengths = [30, 5, 12, 6, 29, 11]
    plan = plan_batches(lengths, max_batch_tokens=60)
    assert [[lengths[i] for i in batch] for batch in plan] == [[5, 6, 11, 12], [29, 30]]
    for batch in plan:
        assert len(batch) * max(lengths[i] for i in batch) <= 60
    assert sorted(i for batch in plan for i in batch) == list(range(len(lengths)))


def test_plan_runs_an_input_over_the_budget_alone():
    assert plan_batches([100, 3, 4], max_batch_tokens=10) == [[1, 2], [0]]


def test_batch_waits_for_company_until_the_wait_limit():
    batcher: Batcher[str] = Batcher(BatchPolicy(max_batch_tokens=100, max_wait_ms=10))
    assert batcher.wait_time(now=0.0) is None
    batcher.add("a", 5, now=1.000)
    batcher.add("b", 5, now=1.004)
    # The oldest input sets the deadline: 10 ms after it arrived.
    assert batcher.wait_time(now=1.004) == pytest.approx(0.006)
    assert batcher.wait_time(now=1.0101) == 0.0


def test_batch_runs_at_once_when_tokens_reach_the_budget():
    batcher: Batcher[str] = Batcher(BatchPolicy(max_batch_tokens=20, max_wait_ms=1000))
    batcher.add("a", 12, now=0.0)
    assert batcher.wait_time(now=0.0) > 0.9
    batcher.add("b", 8, now=0.0)
    assert batcher.wait_time(now=0.0) == 0.0


def test_take_empties_the_queue_into_sorted_batches():
    batcher: Batcher[str] = Batcher(BatchPolicy(max_batch_tokens=20, max_wait_ms=0))
    for item, n in (("long", 15), ("short", 2), ("mid", 6), ("tiny", 1)):
        batcher.add(item, n, now=0.0)
    assert [[p.item for p in batch] for batch in batcher.take()] == [["tiny", "short", "mid"], ["long"]]
    assert batcher.wait_time(now=5.0) is None and batcher.num_tokens == 0


def test_wait_limit_zero_runs_each_arrival_at_once():
    batcher: Batcher[str] = Batcher(BatchPolicy(max_batch_tokens=1000, max_wait_ms=0))
    batcher.add("a", 3, now=2.0)
    assert batcher.wait_time(now=2.0) == 0.0


class FakeModel:
    """Embeds [ids] as [len(ids), sum(ids)] and records each batch it was given."""

    name = "fake"

    def __init__(self, fail_on: int | None = None) -> None:
        self.batches: list[list[list[int]]] = []
        self.fail_on = fail_on

    def embed(self, inputs: list[list[int]]) -> torch.Tensor:
        self.batches.append(inputs)
        if any(self.fail_on in ids for ids in inputs):
            raise RuntimeError("boom")
        return torch.tensor([[float(len(ids)), float(sum(ids))] for ids in inputs])


def _engine(model: FakeModel, policy: BatchPolicy, stats: list[BatchStats]) -> EmbeddingEngine:
    engine = EmbeddingEngine(model, policy, on_batch=stats.append)  # type: ignore[arg-type]
    engine.start()
    return engine


def test_engine_batches_requests_that_arrive_within_the_wait_limit():
    model, stats = FakeModel(), []
    engine = _engine(model, BatchPolicy(max_batch_tokens=1000, max_wait_ms=200), stats)

    async def main() -> list[torch.Tensor]:
        return await asyncio.gather(engine.embed([[1, 2, 3]]), engine.embed([[4], [5, 6]]), engine.embed([[7, 8]]))

    try:
        first, second, third = asyncio.run(main())
    finally:
        engine.stop()
    assert len(model.batches) == 1  # all four inputs shared one forward pass, shortest first
    assert model.batches[0] == [[4], [5, 6], [7, 8], [1, 2, 3]]
    assert first.tolist() == [[3, 6]] and second.tolist() == [[1, 4], [2, 11]] and third.tolist() == [[2, 15]]
    assert stats[0].num_inputs == 4 and stats[0].num_tokens == 8 and stats[0].padded_tokens == 12
    assert all(0 <= wait < 1 for wait in stats[0].queue_seconds)


def test_engine_with_wait_limit_zero_does_not_hold_a_lone_request():
    model, stats = FakeModel(), []
    engine = _engine(model, BatchPolicy(max_batch_tokens=1000, max_wait_ms=0), stats)
    try:
        start = time.perf_counter()
        asyncio.run(engine.embed([[1]]))
        assert time.perf_counter() - start < 0.5
    finally:
        engine.stop()
    assert stats[0].num_inputs == 1


def test_engine_splits_a_queue_over_the_budget_into_several_passes():
    model, stats = FakeModel(), []
    engine = _engine(model, BatchPolicy(max_batch_tokens=4, max_wait_ms=50), stats)
    try:
        asyncio.run(engine.embed([[1, 1], [2, 2], [3, 3], [4]]))
    finally:
        engine.stop()
    assert model.batches == [[[4], [1, 1]], [[2, 2], [3, 3]]]
    assert all(s.padded_tokens <= 4 for s in stats)


def test_a_failed_batch_fails_its_callers_and_the_engine_keeps_serving():
    model = FakeModel(fail_on=13)
    engine = _engine(model, BatchPolicy(max_batch_tokens=1000, max_wait_ms=0), [])
    try:
        with pytest.raises(RuntimeError, match="boom"):
            asyncio.run(engine.embed([[13]]))
        assert asyncio.run(engine.embed([[2]])).tolist() == [[1, 2]]
        assert engine.is_running
    finally:
        engine.stop()
    assert not engine.is_running


def test_stop_drains_what_is_queued():
    model = FakeModel()
    engine = _engine(model, BatchPolicy(max_batch_tokens=1000, max_wait_ms=100), [])
    futures = engine.submit([[1], [2]])
    engine.stop()
    assert [f.result(timeout=0).tolist() for f in futures] == [[1, 1], [1, 2]]


def test_engine_holds_the_turn_lock_around_each_pass():
    held: list[bool] = []
    turns = threading.Lock()

    class Watching(FakeModel):
        def embed(self, inputs):
            held.append(turns.locked())
            return super().embed(inputs)

    engine = EmbeddingEngine(Watching(), BatchPolicy(max_wait_ms=0), turns=turns)  # type: ignore[arg-type]
    engine.start()
    try:
        asyncio.run(engine.embed([[1]]))
    finally:
        engine.stop()
    assert held == [True]


def test_a_pass_waiting_for_its_turn_bills_the_wait_as_queue_time_not_busy_time():
    # The generative step holding the lock is billed as that engine's busy time already: counted here too, the
    # shared bill would count those seconds twice.
    turns, stats = threading.Lock(), []
    engine = EmbeddingEngine(FakeModel(), BatchPolicy(max_wait_ms=0), turns=turns,  # type: ignore[arg-type]
                             on_batch=stats.append)
    engine.start()
    try:
        with turns:
            future = engine.submit([[1, 2, 3]])[0]
            time.sleep(0.5)
        future.result(timeout=5)
    finally:
        engine.stop()
    [batch] = stats
    assert batch.run_seconds < 0.25 and batch.queue_seconds[0] >= 0.45
