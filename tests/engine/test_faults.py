"""Fault injection on the real model: a request that fails alone, a failing step, a stuck step; no block leaks."""

import asyncio
import threading
import time

import pytest

from tokenmill import LLM
from tokenmill.engine.async_engine import AsyncEngine, EngineStalledError, EngineStepError
from tokenmill.engine.sampler import Sampler
from tokenmill.outputs import accumulate
from tokenmill.sampling import SamplingParams

PROMPTS = {"first": "The capital of France is", "bad": "Once upon a time", "last": "1, 2, 3, 4,"}
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(make_engine):
    return make_engine(max_num_batched_tokens=64)


def _alone(engine, drain, request_id: str, params: SamplingParams = GREEDY) -> list[int]:
    engine.add_request(request_id, PROMPTS[request_id], params)
    return drain(engine)[request_id].outputs[0].token_ids


def _break_sampler(monkeypatch, request_id: str) -> None:
    """Sampling fails for any batch holding request_id once it has two output tokens."""
    original = Sampler._mask_early_stops

    def broken(self, logits, seqs, offsets):
        if any(seq.request_id == request_id and seq.num_output_tokens >= 2 for seq in seqs):
            raise RuntimeError("injected sampler fault")
        return original(self, logits, seqs, offsets)

    monkeypatch.setattr(Sampler, "_mask_early_stops", broken)


def _assert_pool_empty(engine) -> None:
    bm = engine.block_manager
    assert not engine.has_unfinished() and not engine.requests
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_a_sampler_error_in_one_request_fails_it_alone(engine, monkeypatch, drain):
    # A repetition penalty on a neighbour: the batch fails after penalties were written, and sampling each
    # sequence again must not penalize twice.
    penalized = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, repetition_penalty=1.5)
    expected = {"first": _alone(engine, drain, "first"), "last": _alone(engine, drain, "last", penalized)}
    _break_sampler(monkeypatch, "bad")
    engine.add_request("first", PROMPTS["first"], GREEDY)
    engine.add_request("bad", PROMPTS["bad"], GREEDY)
    engine.add_request("last", PROMPTS["last"], penalized)
    finals = drain(engine)
    failures = engine.take_failures()
    assert list(failures) == ["bad"] and "injected sampler fault" in str(failures["bad"])
    assert finals["bad"].outputs[0].finish_reason == "abort" and len(finals["bad"].outputs[0].token_ids) == 2
    assert {rid: finals[rid].outputs[0].token_ids for rid in expected} == expected
    _assert_pool_empty(engine)


def test_offline_generate_ends_a_failed_request_with_error_and_finishes_the_others(smollm2_path, monkeypatch, caplog):
    llm = LLM(str(smollm2_path))
    _break_sampler(monkeypatch, "offline-1")
    first, bad, last = llm.generate(list(PROMPTS.values()), GREEDY)
    assert bad.outputs[0].finish_reason == "error" and len(bad.outputs[0].token_ids) == 2
    assert "injected sampler fault" in caplog.text
    assert [o.outputs[0].finish_reason for o in (first, last)] == ["length", "length"]
    assert not llm.engine.failures  # taken, not piling up call after call
    _assert_pool_empty(llm.engine)


def test_a_failed_request_keeps_the_text_it_held_back_for_a_stop_string(engine, monkeypatch, drain):
    _break_sampler(monkeypatch, "bad")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, stop=["a stop string it never writes"])
    engine.add_request("bad", PROMPTS["bad"], params)
    sample = drain(engine)["bad"].outputs[0]
    assert list(engine.take_failures()) == ["bad"]
    assert sample.text and sample.text == engine.tokenizer.decode(sample.token_ids)
    _assert_pool_empty(engine)


def _break_detokenizer(seq) -> None:
    """seq's detokenizer raises from its fourth token on."""
    add = seq.detokenizer.add

    def broken(token_id, check_stop=True):
        if seq.num_output_tokens >= 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected detokenizer fault")
        return add(token_id, check_stop)

    seq.detokenizer.add = broken


def test_a_detokenizer_error_in_one_request_fails_it_alone(engine, drain):
    expected = {"first": _alone(engine, drain, "first"), "last": _alone(engine, drain, "last")}
    for request_id in PROMPTS:
        engine.add_request(request_id, PROMPTS[request_id], GREEDY)
    # The middle sequence of the batch: the ones after it must still be recorded, once.
    _break_detokenizer(engine.requests["bad"].seqs[0])
    finals = drain(engine)
    assert list(engine.take_failures()) == ["bad"]
    assert finals["bad"].outputs[0].finish_reason == "abort"
    assert {rid: finals[rid].outputs[0].token_ids for rid in expected} == expected
    _assert_pool_empty(engine)


class _FailingDecode:
    """A tokenizer whose decode of any ids holding `poison` raises, every time, as a decoding bug would."""

    def __init__(self, tokenizer, poison: int) -> None:
        self.tokenizer, self.poison = tokenizer, poison

    def decode(self, ids: list[int]) -> str:
        if self.poison in ids:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected decode fault")
        return self.tokenizer.decode(ids)

    def is_special(self, token_id: int) -> bool:
        return self.tokenizer.is_special(token_id)


def test_a_decode_that_fails_again_as_its_request_is_aborted_fails_that_request_alone(engine, drain):
    expected = {"first": _alone(engine, drain, "first"), "last": _alone(engine, drain, "last")}
    poison = _alone(engine, drain, "bad")[3]
    for request_id in PROMPTS:
        engine.add_request(request_id, PROMPTS[request_id], GREEDY)
    detokenizer = engine.requests["bad"].seqs[0].detokenizer
    # Its text from the poisoned token on is never read: the abort that follows would decode the same ids again.
    detokenizer.tokenizer = _FailingDecode(detokenizer.tokenizer, poison)
    finals = drain(engine)
    assert list(engine.take_failures()) == ["bad"]
    assert finals["bad"].outputs[0].finish_reason == "abort"
    assert {rid: finals[rid].outputs[0].token_ids for rid in expected} == expected
    _assert_pool_empty(engine)


def _serve(engine, scenario, watchdog_timeout: float | None = None):
    """Run scenario(front) against an AsyncEngine over engine, then stop it."""

    async def main():
        front = AsyncEngine(engine, watchdog_timeout=watchdog_timeout)
        front.start()
        try:
            return await scenario(front)
        finally:
            await front.stop()

    return asyncio.run(main())


async def _tokens(front: AsyncEngine, request_id: str) -> list[int]:
    stream = await front.add_request(request_id, engine_prompt(front, request_id), GREEDY, 0.0)
    whole = None
    async for output in stream:
        whole = accumulate(whole, output)
    return whole.outputs[0].token_ids


def engine_prompt(front: AsyncEngine, request_id: str) -> list[int]:
    return front.engine.tokenizer.encode(PROMPTS[request_id])


def test_an_exception_in_the_engine_loop_fails_its_requests_and_the_next_is_served(engine, monkeypatch, drain):
    expected = _alone(engine, drain, "first")
    execute = engine.runner.execute
    calls = {"n": 0}

    def broken(scheduled):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected step fault")
        return execute(scheduled)

    monkeypatch.setattr(engine.runner, "execute", broken)

    async def scenario(front):
        results = await asyncio.gather(_tokens(front, "bad"), _tokens(front, "last"), return_exceptions=True)
        return results, await _tokens(front, "first"), front.is_running

    results, after, running = _serve(engine, scenario)
    assert all(isinstance(r, EngineStepError) for r in results)
    assert after == expected and running
    _assert_pool_empty(engine)


def test_a_stuck_step_fails_its_requests_then_the_engine_recovers(engine, monkeypatch, drain):
    expected = _alone(engine, drain, "first")
    release, stuck = threading.Event(), threading.Event()
    step = engine.step

    def blocking_step():
        if engine.requests.get("bad") and engine.requests["bad"].seqs[0].num_output_tokens >= 2:
            stuck.set()
            release.wait(30)
        return step()

    monkeypatch.setattr(engine, "step", blocking_step)

    async def scenario(front):
        task = asyncio.ensure_future(_tokens(front, "bad"))
        with pytest.raises(EngineStalledError, match="watchdog limit"):
            await asyncio.wait_for(task, 30)
        reason = front.stalled
        with pytest.raises(EngineStalledError):
            await front.add_request("first", engine_prompt(front, "first"), GREEDY, 0.0)
        release.set()
        while front.stalled is not None:
            await asyncio.sleep(0.01)
        return reason, await _tokens(front, "first")

    reason, after = _serve(engine, scenario, watchdog_timeout=2.0)
    assert stuck.is_set() and "engine step" in reason
    assert after == expected
    _assert_pool_empty(engine)


def test_a_failed_step_fails_the_requests_it_ran_not_those_still_waiting(make_engine, monkeypatch, drain):
    engine = make_engine(max_num_batched_tokens=64, max_num_seqs=1)  # "last" waits while "bad" runs
    expected = _alone(engine, drain, "last")
    execute = engine.runner.execute

    def broken(scheduled):
        if any(seq.request_id == "bad" and seq.num_output_tokens >= 2 for seq, _ in scheduled):
            raise RuntimeError("injected step fault")
        return execute(scheduled)

    monkeypatch.setattr(engine.runner, "execute", broken)

    async def scenario(front):
        return await asyncio.gather(_tokens(front, "bad"), _tokens(front, "last"), return_exceptions=True)

    bad, last = _serve(engine, scenario)
    assert isinstance(bad, EngineStepError) and last == expected
    _assert_pool_empty(engine)


def test_an_engine_whose_every_step_fails_says_so_until_one_succeeds(engine, monkeypatch):
    execute, broken = engine.runner.execute, {"on": True}

    def failing(scheduled):
        if broken["on"]:
            raise RuntimeError("injected device fault")
        return execute(scheduled)

    monkeypatch.setattr(engine.runner, "execute", failing)

    async def scenario(front):
        seen = [front.failing]
        for request_id in ("bad", "last", "first"):  # each fails in its first step
            with pytest.raises(EngineStepError):
                await _tokens(front, request_id)
            seen.append(front.failing)
        broken["on"] = False
        await _tokens(front, "first")
        return seen + [front.failing]

    assert _serve(engine, scenario) == [None, None, None, "its last 3 steps failed", None]
    _assert_pool_empty(engine)


@pytest.mark.parametrize("where", ["execute", "update"])
def test_a_failed_steps_time_is_billed_as_busy_and_to_its_request(engine, monkeypatch, where):
    def failing(*args):
        time.sleep(0.2)
        raise RuntimeError("injected fault")

    if where == "execute":
        monkeypatch.setattr(engine.runner, "execute", failing)
    else:  # before any sequence's count moved: the step as a whole fails
        monkeypatch.setattr(engine.scheduler, "update", failing)
    busy = engine.cost.busy_seconds
    engine.add_request("bad", PROMPTS["bad"], GREEDY)
    with pytest.raises(RuntimeError, match="injected"):
        engine.step()
    final = engine.abort("bad")
    # The requests' costs add up to the machine's: the failed step's seconds are the request's too.
    assert engine.cost.busy_seconds - busy == pytest.approx(final.metrics.compute_seconds) and \
        final.metrics.compute_seconds >= 0.2
    _assert_pool_empty(engine)


def test_a_request_failing_in_one_sample_still_gets_the_tokens_its_other_sample_made_that_step(engine, drain):
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, n=2)
    engine.add_request("bad", PROMPTS["bad"], params)
    first, second = engine.requests["bad"].seqs
    _break_detokenizer(second)
    final = drain(engine)["bad"]
    assert list(engine.take_failures()) == ["bad"]
    # The failing step's output was taken, then dropped for the abort's, which carried only what came after.
    assert final.outputs[0].token_ids == first.output_token_ids and len(first.output_token_ids) == 4
    _assert_pool_empty(engine)
