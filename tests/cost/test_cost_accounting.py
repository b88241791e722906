"""Cost accounting: the step-time fit recovers per-token costs, and a step's time is split without loss."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tokenmill.cost import prices
from tokenmill.cost.accounting import CostAccountant, StepTimeModel
from tokenmill.engine import llm_engine
from tokenmill.sampling import SamplingParams


def _synthetic_steps(rng: np.random.Generator, count: int) -> list[tuple[int, int]]:
    """(prefill tokens, decode tokens) of steps as the scheduler makes them: decodes, prompt chunks, or both."""
    steps = []
    for _ in range(count):
        kind = rng.integers(3)
        prefill = 0 if kind == 0 else int(rng.integers(1, 512))
        decode = 0 if kind == 1 else int(rng.integers(1, 64))
        steps.append((prefill, decode))
    return steps


def test_fit_recovers_known_per_token_and_per_step_costs():
    per_prefill, per_decode, per_step = 2e-4, 3e-3, 5e-3
    rng = np.random.default_rng(0)
    model = StepTimeModel()
    for p, d in _synthetic_steps(rng, 200):
        noise = rng.normal(0, 1e-4)
        model.observe(p, d, per_prefill * p + per_decode * d + per_step + noise)
    assert model.per_prefill_token == pytest.approx(per_prefill, rel=0.02)
    assert model.per_decode_token == pytest.approx(per_decode, rel=0.02)
    assert model.per_step == pytest.approx(per_step, rel=0.05)


def test_fit_keeps_every_cost_non_negative():
    # Steps that a negative per-step cost would fit best: the fit must settle for zero instead.
    model = StepTimeModel()
    for p in (10, 20, 40, 80):
        model.observe(p, 0, 1e-3 * p - 5e-3)
    assert model.per_step == 0.0
    assert model.per_prefill_token > 0 and model.per_decode_token >= 0


def test_shares_of_a_step_add_up_to_its_measured_time():
    rng = np.random.default_rng(1)
    accountant = CostAccountant(price_per_hour=1.0)
    busy = []
    for p, d in _synthetic_steps(rng, 50):
        rows = [(0, 1)] * d + ([(p, 0)] if p else [])
        seconds = float(rng.uniform(0.001, 0.2))
        shares = accountant.charge(rows, seconds)
        assert len(shares) == len(rows)
        assert all(part >= 0 for share in shares for part in share)
        assert math.fsum(part for share in shares for part in share) == pytest.approx(seconds, rel=1e-12, abs=0)
        busy.append(seconds)
    assert accountant.busy_seconds == pytest.approx(math.fsum(busy), rel=1e-12)


def test_shares_follow_the_fitted_cost_of_each_row():
    model = StepTimeModel()
    for p, d in [(100, 0), (0, 1), (0, 4), (300, 2), (50, 8)]:
        model.observe(p, d, 1e-4 * p + 2e-3 * d)
    # The fit predicted 0.010 s for the prompt row and 0.002 s for the decode; the step took twice that.
    (prompt_prefill, prompt_decode), (decode_prefill, decode_decode) = model.split([(100, 0), (0, 1)], 0.024)
    assert prompt_prefill == pytest.approx(0.020) and prompt_decode == 0
    assert decode_prefill == 0 and decode_decode == pytest.approx(0.004)


def test_steps_of_no_measured_time_split_into_nothing():
    accountant = CostAccountant(price_per_hour=1.0)
    assert accountant.charge([(5, 0), (0, 1)], 0.0) == [(0.0, 0.0), (0.0, 0.0)]


def test_a_step_of_no_measured_time_splits_into_nothing_when_the_fit_prices_a_row_at_zero():
    model = StepTimeModel()
    for d in (1, 2, 4, 8):
        model.observe(0, d, 1e-3 * d)
    model.observe(100, 1, 0.5e-3)  # prompt tokens made no difference: per prompt token and per step fit 0
    assert model.per_prefill_token == 0.0 and model.per_step == 0.0
    assert model.split([(100, 0), (0, 1)], 0.0) == [(0.0, 0.0), (0.0, 0.0)]


def test_given_price_wins_over_the_table():
    price = prices.machine_price(1.25, "cpu")
    assert price.usd_per_hour == 1.25 and "--price-per-hour" in price.basis


def test_cpu_price_is_per_vcpu_hour_times_torch_threads():
    price = prices.machine_price(None, "cpu")
    assert price.usd_per_hour == pytest.approx(torch.get_num_threads() * prices.USD_PER_VCPU_HOUR)
    assert "pass --price-per-hour USD" in price.basis


@pytest.mark.parametrize("name, usd", [("NVIDIA A100-SXM4-80GB", prices.USD_PER_GPU_HOUR["A100"]),
                                       ("NVIDIA A10G", prices.USD_PER_GPU_HOUR["A10"]),
                                       ("NVIDIA H100 80GB HBM3", prices.USD_PER_GPU_HOUR["H100"]),
                                       ("NVIDIA L4", prices.USD_PER_GPU_HOUR["L4"]),
                                       ("Tesla T4", prices.USD_PER_GPU_HOUR["T4"]),
                                       # Not an L4: a GPU the table lacks is priced as its dearest entry.
                                       ("NVIDIA L40S", max(prices.USD_PER_GPU_HOUR.values())),
                                       ("Some Future GPU", max(prices.USD_PER_GPU_HOUR.values()))])
def test_gpu_price_comes_from_its_model_name(monkeypatch, name, usd):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    price = prices.machine_price(None, "cuda:0")
    assert price.usd_per_hour == usd
    assert name in price.basis and "--price-per-hour" in price.basis


def test_engine_charges_all_of_its_busy_time_to_its_requests(make_engine):
    engine = make_engine(max_num_batched_tokens=64, price_per_hour=3.6)
    engine.add_request("long", list(range(300, 450)), SamplingParams(max_tokens=6, ignore_eos=True))
    engine.add_request("pair", "Hello there", SamplingParams(max_tokens=5, n=2, ignore_eos=True))
    engine.add_request("short", "The capital of France is", SamplingParams(max_tokens=4, ignore_eos=True))
    finals = {}
    while engine.has_unfinished():
        for output in engine.step():
            finals[output.request_id] = output.metrics
    assert math.fsum(m.compute_seconds for m in finals.values()) == pytest.approx(engine.cost.busy_seconds, rel=1e-9)
    for m in finals.values():
        assert m.prefill_seconds > 0 and m.decode_seconds > 0
        assert m.cost_usd == pytest.approx(m.compute_seconds * 3.6 / 3600)
    stats = engine.stats()
    assert stats.busy_seconds == engine.cost.busy_seconds < stats.uptime_seconds and stats.price_per_hour == 3.6


def test_twice_the_output_tokens_costs_twice_as_much(make_engine, monkeypatch):
    """A lone request is billed every step it ran in: here each model step takes 10 ms of a fake clock."""
    engine = make_engine(price_per_hour=3.6)
    # NOTE: a fake clock, because real step times on a shared VM swing 2x between runs (a CI run saw 3.5x).
    clock = [0.0]
    monkeypatch.setattr(llm_engine, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    execute = engine.runner.execute

    def ten_milliseconds(scheduled):
        clock[0] += 0.01
        return execute(scheduled)

    monkeypatch.setattr(engine.runner, "execute", ten_milliseconds)
    finals = {}
    for max_tokens in (16, 32):
        engine.add_request(str(max_tokens), "The capital of France is", SamplingParams(max_tokens=max_tokens,
                                                                                      ignore_eos=True))
        while engine.has_unfinished():
            finals.update((int(o.request_id), o.metrics) for o in engine.step() if o.finished)
    # One prefill step and max_tokens - 1 decode steps each.
    assert finals[16].compute_seconds == pytest.approx(0.16) and finals[32].compute_seconds == pytest.approx(0.32)
    assert finals[32].cost_usd == pytest.approx(2 * finals[16].cost_usd) == pytest.approx(0.32 * 3.6 / 3600)
