"""The planner: its simulation schedules as the engine does, matches hand-computed timings, and plans sensibly."""

import argparse
import json

import numpy as np
import pytest

from tokenmill.bench.serve import workload
from tokenmill.cli import main
from tokenmill.cost.planner import Targets, capacity, max_rate, predict
from tokenmill.cost.simulator import Workload, simulate
from tokenmill.cost.step_times import StepTimes, load_profile
from tokenmill.engine.scheduler import Scheduler
from tokenmill.sampling import SamplingParams

PREFILLS, DECODES = [0, 16, 64, 128, 256, 512], [0, 1, 2, 4, 8, 16, 32, 64]


def _write_profile(path, step_ms, context_sweep=(), **settings):
    """A profile whose cell (P, D) took step_ms(P, D) milliseconds."""
    grid = [{"prefill_tokens": p, "decode_seqs": d, "decode_context": 128, "ms": step_ms(p, d), "runs_ms": []}
            for d in DECODES for p in PREFILLS if p or d]
    settings = {"dtype": "float32", "quantization": "int4", "max_num_seqs": 64, "max_num_batched_tokens": 512,
                "block_size": 16, "num_blocks": 4096, "max_model_len": 8192, "enable_prefix_caching": True,
                **settings}
    path.write_text(json.dumps({
        "version": 1, "machine": {}, "model": "test-model", "settings": settings,
        "price": {"usd_per_hour": 1.0, "basis": "test"}, "context": 128, "repeats": 1,
        "grid": grid, "context_sweep": list(context_sweep),
    }))
    return load_profile(path)


def _flat(p, d):
    """200 ms for a step with a prompt in it, 10 ms for a decode-only step."""
    return 200.0 if p else 10.0


def _linear(p, d):
    """A fixed cost, plus each prompt token and each decode: batching pays, as on a real machine."""
    return 5 + 0.4 * p + 0.8 * d


def test_request_alone_waits_one_prefill_step_then_one_decode_step_per_token(tmp_path):
    profile = _write_profile(tmp_path / "p.json", _flat)
    [alone] = simulate(profile.times, profile.settings, [(1.0, 100, 5)])
    assert alone.ttft == pytest.approx(0.200)
    assert alone.tpot == pytest.approx(0.010)
    assert alone.token_times[-1] == pytest.approx(1.0 + 0.2 + 4 * 0.01)


def test_request_arriving_during_a_prefill_waits_for_that_step_then_shares_the_next(tmp_path):
    profile = _write_profile(tmp_path / "p.json", _flat)
    # B arrives 50 ms into A's prefill: it is taken after that step and prefilled beside A's first decode.
    a, b = simulate(profile.times, profile.settings, [(0.0, 100, 3), (0.05, 100, 3)])
    assert a.token_times == pytest.approx([0.2, 0.4, 0.41])
    assert b.ttft == pytest.approx(0.4 - 0.05)
    assert b.token_times == pytest.approx([0.4, 0.41, 0.42])


def test_prompt_longer_than_the_step_budget_is_prefilled_in_chunks(tmp_path):
    profile = _write_profile(tmp_path / "p.json", _flat)
    [long] = simulate(profile.times, profile.settings, [(0.0, 600, 2)])
    assert long.ttft == pytest.approx(0.4)  # 512 tokens, then 88: two prompt steps


def test_a_profile_of_a_model_whose_layers_all_slide_plans_prompts_longer_than_its_pool(tmp_path):
    # Mistral-style: every layer slides over 64 tokens, so a sequence holds its window's blocks, not its context.
    profile = _write_profile(tmp_path / "p.json", _flat, num_blocks=64, max_model_len=8192, sliding_window=64)
    [t] = simulate(profile.times, profile.settings, [(0.0, 2000, 4)])  # 2,000 tokens > the pool's 1,024
    assert len(t.token_times) == 4


def test_step_times_interpolate_between_and_beyond_profiled_cells(tmp_path):
    profile = _write_profile(tmp_path / "p.json", _linear)
    times = profile.times
    assert times.seconds(100, 3, decode_context=3 * 128) == pytest.approx(_linear(100, 3) / 1000)
    assert times.seconds(1024, 128, decode_context=128 * 128) == pytest.approx(_linear(1024, 128) / 1000)
    assert times.seconds(8, 0) == pytest.approx(_linear(8, 0) / 1000)  # below the smallest prompt timed


def test_a_step_holding_the_keys_a_cell_held_takes_that_cells_time():
    # bench profile records each cell's mean context, above --context (128 here): its decodes kept decoding while
    # the cell's prompts ran. Priced from --context, a step just like the cell came out 1.2 ms dearer.
    grid = [{"prefill_tokens": p, "decode_seqs": d, "decode_context": 140.0 if d else 0, "ms": 5 + 0.4 * p + 0.8 * d}
            for d in (0, 1, 64) for p in (0, 64, 512) if p or d]
    sweep = [{"prefill_tokens": 0, "decode_seqs": 16, "decode_context": c, "ms": 20 + 0.0016 * 16 * c}
             for c in (131.0, 515.0, 1030.0)]
    assert StepTimes(grid, sweep).seconds(0, 64, decode_context=64 * 140) == pytest.approx(0.0562)


def test_longer_decode_contexts_cost_what_the_context_sweep_measured(tmp_path):
    # 16 decodes: 20 ms at 128 tokens of context, 44 ms at 1,152: 24 ms per 16 * 1,024 context tokens.
    sweep = [{"prefill_tokens": 0, "decode_seqs": 16, "decode_context": c, "ms": ms, "runs_ms": []}
             for c, ms in ((128, 20.0), (640, 32.0), (1152, 44.0))]
    times = _write_profile(tmp_path / "p.json", _linear, sweep).times
    assert times.per_context_token == pytest.approx(0.024 / (16 * 1024))
    base = times.seconds(0, 8, decode_context=8 * 128)
    assert times.seconds(0, 8, decode_context=8 * 1152) - base == pytest.approx(8 * 1024 * times.per_context_token)


def test_max_sustainable_rate_falls_as_the_targets_tighten(tmp_path):
    profile = _write_profile(tmp_path / "p.json", _linear)
    workload = Workload(prompt_len=128, output_len=64, spread=0.5, num_requests=150)
    ceiling = capacity(profile, workload)
    rates = [max_rate(profile, workload, Targets(ttft, tpot), ceiling)
             for ttft, tpot in ((1000, None), (300, None), (150, None), (120, 10), (120, 8))]
    assert all(0 < r <= ceiling for r in rates)
    assert rates == sorted(rates, reverse=True) and len(set(rates)) == len(rates)
    # Below what one request alone takes (a 128-token prefill step is 56.2 ms), no rate meets the target.
    assert max_rate(profile, workload, Targets(50, None), ceiling) == 0


def test_predictions_at_the_found_rate_meet_the_targets(tmp_path):
    profile = _write_profile(tmp_path / "p.json", _linear)
    workload = Workload(prompt_len=128, output_len=64, num_requests=300)
    targets = Targets(ttft_ms=400, tpot_ms=30, percentile=90)
    best = max_rate(profile, workload, targets, capacity(profile, workload))
    assert targets.met_by(predict(profile, workload, best, 90))
    assert not targets.met_by(predict(profile, workload, best * 1.05, 90))


def test_simulated_schedule_agrees_with_the_engine_scheduler(smollm2_path, tmp_path, monkeypatch, one_thread):
    from tokenmill.llm import LLM

    # A small budget, few sequences and a small KV pool: chunked prefill, a full batch and preemption all happen.
    llm = LLM(str(smollm2_path), max_num_seqs=3, max_num_batched_tokens=40, kv_cache_memory=0.004,
              num_threads=one_thread)
    engine = llm.engine
    rng = np.random.default_rng(0)
    requests = [(0.0, 50, 30), (0.0, 20, 40), (2.5, 70, 20), (2.5, 12, 50), (6.5, 33, 30)]  # arrival in steps
    schedules = []
    real_schedule = Scheduler.schedule

    def recording(self):
        out = real_schedule(self)
        schedules.append([(int(seq.request_id), n) for seq, n in out.scheduled])
        return out

    monkeypatch.setattr(Scheduler, "schedule", recording)
    steps = 0
    for i, (arrival, prompt, out) in enumerate(requests + [(np.inf, 0, 0)]):
        while steps < arrival and engine.has_unfinished():
            engine.step()
            steps += 1
        if arrival < np.inf:
            engine.add_request(str(i), rng.integers(100, 20000, prompt).tolist(),
                               SamplingParams(temperature=0, max_tokens=out, ignore_eos=True))
    real = schedules[:]
    assert engine.scheduler.num_preemptions > 0  # the case covers preemption

    schedules.clear()
    profile = _write_profile(tmp_path / "p.json", lambda p, d: 1000.0, max_num_seqs=3, max_num_batched_tokens=40,
                             num_blocks=engine.block_manager.num_blocks)  # one second a step: arrivals in steps
    simulate(profile.times, profile.settings, requests)
    assert schedules == real


def test_plan_prints_a_column_per_profile_with_replicas_and_bill(tmp_path, capsys):
    _write_profile(tmp_path / "fast.json", _linear)
    _write_profile(tmp_path / "slow.json", lambda p, d: 2 * _linear(p, d))
    assert main(["plan", "--profile", str(tmp_path / "fast.json"), str(tmp_path / "slow.json"), "--rate", "20",
                 "--ttft-ms", "1000", "--num-requests", "200", "--price-per-hour", "2", "--out",
                 str(tmp_path / "plan.json")]) == 0
    fast, slow = json.loads((tmp_path / "plan.json").read_text())
    assert fast["max_rate_rps"] > slow["max_rate_rps"] > 0
    assert slow["replicas"] > fast["replicas"] >= 1
    assert fast["monthly_usd"] == pytest.approx(fast["replicas"] * 2 * 730)
    assert "monthly bill (USD)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rate", "5"], "give a target"),
        (["--rate", "-1", "--ttft-ms", "100"], "--rate, --ttft-ms and --tpot-ms must be positive"),
        (["--rate", "5", "--ttft-ms", "100", "--spread", "1.5"], "0 <= --spread < 1"),
    ],
)
def test_bad_plan_flags_fail_in_one_line(tmp_path, capsys, args, message):
    _write_profile(tmp_path / "p.json", _linear)
    assert main(["plan", "--profile", str(tmp_path / "p.json"), *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tokenmill: error: ") and message in err[0]


@pytest.mark.parametrize("damage", [lambda r: r["settings"].pop("max_model_len"), lambda r: r["price"].clear(),
                                    lambda r: r.update(grid=7), lambda r: r["grid"][0].pop("ms")])
def test_a_hand_edited_profile_missing_a_field_is_one_line(tmp_path, capsys, damage):
    err = _plan_damaged(tmp_path, capsys, _flat, damage)
    assert len(err) == 1 and "is a malformed tokenmill profile" in err[0]


@pytest.mark.parametrize("damage, message", [
    (lambda r: [c.update(ms=0.0) for c in r["grid"]], "took no time"),  # a run of no duration: a ZeroDivisionError
    (lambda r: r["grid"][3].update(ms=-3.0), "took no time"),
    (lambda r: r["grid"][3].update(ms=float("nan")), "took no time"),  # the rate search never ended
    (lambda r: r["price"].update(usd_per_hour=None), "price.usd_per_hour None"),
    (lambda r: r["settings"].update(block_size=0), "block_size=0 must be at least 1"),
    (lambda r: r["settings"].update(max_model_len="x"), "settings.max_model_len 'x' is not a count"),  # TypeError
    (lambda r: r["settings"].update(num_blocks=0), "settings.num_blocks 0 is not a count"),
])
def test_a_hand_edited_profile_out_of_range_is_one_line(tmp_path, capsys, damage, message):
    err = _plan_damaged(tmp_path, capsys, _linear, damage)
    assert len(err) == 1 and message in err[0]


def _plan_damaged(tmp_path, capsys, step_ms, damage) -> list[str]:
    """`plan` on a profile edited by damage: it must exit 1; its stderr lines."""
    _write_profile(tmp_path / "p.json", step_ms)
    report = json.loads((tmp_path / "p.json").read_text())
    damage(report)
    (tmp_path / "p.json").write_text(json.dumps(report))
    assert main(["plan", "--profile", str(tmp_path / "p.json"), "--rate", "1", "--ttft-ms", "100"]) == 1
    return capsys.readouterr().err.strip().splitlines()


def test_a_file_that_is_not_a_profile_is_refused_with_what_to_do(tmp_path, capsys):
    (tmp_path / "bad.json").write_text('{"grid": []}')
    assert main(["plan", "--profile", str(tmp_path / "bad.json"), "--rate", "1", "--ttft-ms", "100"]) == 1
    err = capsys.readouterr().err
    assert "is not a tokenmill profile" in err and "tokenmill bench profile --out" in err
    (tmp_path / "bad.json").write_bytes(b'{"model": "caf\xe9"}')  # not UTF-8: a UnicodeDecodeError traceback
    assert main(["plan", "--profile", str(tmp_path / "bad.json"), "--rate", "1", "--ttft-ms", "100"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read profile" in err[0]
    (tmp_path / "bad.json").write_text("[" * 100_000 + "]" * 100_000)  # a RecursionError traceback
    assert main(["plan", "--profile", str(tmp_path / "bad.json"), "--rate", "1", "--ttft-ms", "100"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read profile" in err[0]


def test_a_profile_that_timed_one_prompt_size_is_refused(tmp_path, capsys):
    # Its prompt-only steps would all cost the one size's time: 512 tokens priced as 256.
    _write_profile(tmp_path / "p.json", _linear)
    report = json.loads((tmp_path / "p.json").read_text())
    report["grid"] = [c for c in report["grid"] if c["prefill_tokens"] in (0, 256)]
    (tmp_path / "p.json").write_text(json.dumps(report))
    assert main(["plan", "--profile", str(tmp_path / "p.json"), "--rate", "1", "--ttft-ms", "100"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs prompt-only steps of two sizes" in err[0]


class _Vocabulary:
    """As much of a tokenizer as random prompts read."""

    vocab_size = 1000

    def special_token_ids(self) -> list[int]:
        return [0, 1, 2]


def test_bench_serve_measures_the_requests_plan_simulates_and_warms_up_on_others():
    args = argparse.Namespace(dataset="random", num_prompts=200, warmup=2, input_len=128, output_len=64,
                              range_ratio=0.25, seed=0)
    requests = workload(args, _Vocabulary())
    warmup, measured = requests[:2], requests[2:]
    planned = Workload(128, 64, 0.25, 200, 0).requests(rate=1.0)
    assert [(r.prompt_tokens, r.output_tokens) for r in measured] == [(p, o) for _, p, o in planned]
    assert not {tuple(r.prompt[:8]) for r in warmup} & {tuple(r.prompt[:8]) for r in measured}
