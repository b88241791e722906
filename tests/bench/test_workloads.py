"""Benchmark workloads: lengths in range, no special tokens, paced arrivals, clear errors for bad files."""

import argparse
import importlib

import numpy as np
import pytest

from tokenmill.bench.datasets import file_requests, random_requests
from tokenmill.bench.serve import arrival_gaps
from tokenmill.errors import InvalidRequestError


def test_random_requests_have_exact_lengths_in_range_and_no_special_tokens(smollm2_source):
    tokenizer = smollm2_source.tokenizer
    requests = random_requests(tokenizer, 50, input_len=100, output_len=20, range_ratio=0.5, seed=3)
    special = set(tokenizer.special_token_ids())
    assert special  # SmolLM2 has control tokens, so the check below means something
    for r in requests:
        assert len(r.prompt) == r.prompt_tokens and 50 <= r.prompt_tokens <= 150
        assert 10 <= r.output_tokens <= 30
        assert not special & set(r.prompt)
    assert len({r.prompt_tokens for r in requests}) > 10  # lengths really vary
    again = random_requests(tokenizer, 50, input_len=100, output_len=20, range_ratio=0.5, seed=3)
    assert [r.prompt for r in again] == [r.prompt for r in requests]  # a seed fixes the workload


def test_arrival_gaps_have_the_requested_rate_and_burstiness():
    assert arrival_gaps(5, float("inf"), 1.0, 0) == [0.0] * 5
    poisson = np.array(arrival_gaps(20000, 4.0, 1.0, 0))
    bursty = np.array(arrival_gaps(20000, 4.0, 0.25, 0))
    assert poisson.mean() == pytest.approx(0.25, rel=0.03) and bursty.mean() == pytest.approx(0.25, rel=0.05)
    # Gamma with shape k has coefficient of variation 1 / sqrt(k): 1 for Poisson, 2 at burstiness 0.25.
    assert poisson.std() / poisson.mean() == pytest.approx(1.0, rel=0.05)
    assert bursty.std() / bursty.mean() == pytest.approx(2.0, rel=0.1)


def test_file_dataset_cycles_rows_and_rejects_bad_files(smollm2_source, tmp_path):
    tokenizer = smollm2_source.tokenizer
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "Hello there", "output_len": 7}\n{"prompt": "Bye"}\n')
    requests = file_requests(tokenizer, good, 3, output_len=5)
    assert [(r.prompt, r.output_tokens) for r in requests] == [("Hello there", 7), ("Bye", 5), ("Hello there", 7)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt field"}\n')
    with pytest.raises(InvalidRequestError, match="string 'prompt'"):
        file_requests(tokenizer, bad, 1, 5)
    with pytest.raises(InvalidRequestError, match="cannot read"):
        file_requests(tokenizer, tmp_path / "missing.jsonl", 1, 5)
    bad.write_bytes(b"\xff\xfe not UTF-8")  # was a UnicodeDecodeError's traceback
    with pytest.raises(InvalidRequestError, match="cannot read"):
        file_requests(tokenizer, bad, 1, 5)
    for length in ('"many"', "null", "0", "-5"):  # tracebacks, or requests the server refused one by one
        bad.write_text('{"prompt": "Hi", "output_len": %s}\n' % length)
        with pytest.raises(InvalidRequestError, match="'output_len' .* must be an integer >= 1"):
            file_requests(tokenizer, bad, 1, 5)
    bad.write_text('{"prompt": "Hi", "output_len": 3.0}\n')  # as pandas writes a column with gaps
    assert file_requests(tokenizer, bad, 1, 5)[0].output_tokens == 3


def test_early_exit_windows_are_all_full_length_even_on_a_short_text():
    from tokenmill.bench.early_exit import windows

    # 66 tokens, 4 windows of 64: a stride of 1 ran the last past the end (63 long).
    assert [w[0] for w in windows(list(range(66)), 64, 4)] == [0, 1, 2, 2]
    assert all(len(w) == 64 for w in windows(list(range(66)), 64, 4))
    # A longer text keeps the stride it had, so the windows measured in docs/benchmarks.md stay the same.
    assert [w[0] for w in windows(list(range(358)), 64, 4)] == [0, 73, 146, 219]


@pytest.mark.parametrize("command, flags", [
    ("offline", {"num_seqs": 0}), ("offline", {"min_len": 600, "max_len": 100}), ("offline", {"min_len": 0}),
    ("offline", {"decode_len": 1}), ("serve", {"request_rate": 0.0}), ("serve", {"num_prompts": 0}),
    ("serve", {"warmup": -1}),
    ("compare", {"output_len": 1}), ("compare", {"concurrency": [16, 0]}), ("compare", {"rounds": 0}),
    ("early_exit", {"max_tokens": 1}), ("early_exit", {"prompts": 0}),
    # A division by zero or an empty table once the models had loaded (or a whole run had gone by).
    ("structured", {"repeats": 0}), ("structured", {"concurrency": [1, 0]}), ("structured", {"max_tokens": 1}),
    ("speculative", {"repeats": 0}), ("speculative", {"max_tokens": 1}), ("speculative", {"concurrency": 0}),
    ("embed", {"rounds": 0}), ("embed", {"clients": 0}), ("embed", {"batch_size": 0}), ("embed", {"num_sentences": 0}),
])
def test_bench_flags_that_make_no_workload_are_refused_before_any_work(command, flags):
    defaults = {"offline": dict(num_seqs=256, min_len=100, max_len=1024, decode_len=128, prefill_len=512),
                "serve": dict(num_prompts=10, warmup=1, burstiness=1.0, range_ratio=0.0, request_rate=float("inf")),
                "compare": dict(output_len=128, prefill_len=512, rounds=2, context_len=2000, concurrency=[1, 16]),
                "early_exit": dict(prompts=4, prompt_len=64, max_tokens=48, num_speculative_tokens=3),
                "structured": dict(repeats=3, max_tokens=64, concurrency=[1, 16]),
                "speculative": dict(repeats=3, max_tokens=96, concurrency=16),
                "embed": dict(num_sentences=1000, clients=16, requests=1000, batch_size=32, rounds=1),
                }[command]
    module = importlib.import_module(f"tokenmill.bench.{command}")
    with pytest.raises(InvalidRequestError, match="need"):
        module.main(argparse.Namespace(**{**defaults, **flags}))


def test_bench_serve_warms_up_on_requests_it_does_not_measure(monkeypatch):
    from tokenmill.bench import serve
    from tokenmill.bench.datasets import BenchRequest
    from tokenmill.bench.metrics import RequestResult

    sent: list[int] = []

    async def fake_send(client, args, request, t0, deadline_ms=None):
        sent.append(request.prompt[0])
        return RequestResult(prompt_tokens=1, start=0.0, success=True, output_tokens=1, first_token=0.0, end=0.0)

    monkeypatch.setattr(serve, "send", fake_send)
    monkeypatch.setattr(serve, "build_requests", lambda args, tokenizer: [
        BenchRequest([i], 1, 1) for i in range(args.num_prompts)])
    monkeypatch.setattr(serve, "summarize",
                        lambda results, *rest: {"measured": len(results), "completed": len(results)})
    monkeypatch.setattr(serve, "format_report", str)
    args = argparse.Namespace(num_prompts=3, warmup=2, burstiness=1.0, range_ratio=0.0, request_rate=float("inf"),
                              goodput=None, tokenizer=None, model="smollm2-135m", endpoint="completions",
                              send_text=False, deadline_mix=None, policies=None, base_url="http://127.0.0.1:9",
                              api_key=None, max_concurrency=None, seed=0, cost_per_hour=None, plot=None, out=None)
    assert serve.main(args) == 0
    assert sent == [3, 4, 0, 1, 2]  # two warm-ups drawn past the measured three, then those three, each once


class _Stop(Exception):
    """Raised by the stub engine once it holds the workload: nothing is run."""


@pytest.mark.parametrize("low, high", [(3, 4), (10, 11), (101, 1024)])
def test_bench_offline_lengths_cover_min_to_max_and_no_further(monkeypatch, low, high):
    from tokenmill.bench import offline, peers

    drawn: list[int] = []

    class LLM:
        tokenizer = argparse.Namespace(vocab_size=100, special_token_ids=lambda: [0])

        def generate(self, prompts, params, use_tqdm=False):
            drawn.extend([len(p["prompt_token_ids"]) for p in prompts] + [p.max_tokens for p in params])
            raise _Stop

    class Runner:
        def __init__(self, **options):
            self.llm = LLM()

        def generate(self, prompts, max_tokens):
            """The warm-up."""

    monkeypatch.setattr(peers, "TokenmillRunner", Runner)
    monkeypatch.setattr(peers, "decode_speed", lambda *args: 1.0)
    monkeypatch.setattr(peers, "prefill_speed", lambda *args: 1.0)
    parser = argparse.ArgumentParser()
    offline.add_arguments(parser)
    with pytest.raises(_Stop):
        offline.main(parser.parse_args(["--num-seqs", "2000", "--min-len", str(low), "--max-len", str(high)]))
    assert (min(drawn), max(drawn)) == (low, high)


def _sent(events: list[str]):
    """bench serve's result for one streamed request whose server answers with these SSE lines."""
    import asyncio

    import httpx

    from tokenmill.bench.datasets import BenchRequest
    from tokenmill.bench.serve import send

    def respond(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content="".join(f"{e}\n\n" for e in events).encode())

    async def one():
        async with httpx.AsyncClient(base_url="http://x", transport=httpx.MockTransport(respond)) as client:
            return await send(client, argparse.Namespace(model="m", endpoint="completions"),
                              BenchRequest([1, 2, 3], 3, 4), 0.0)

    return asyncio.run(one())


@pytest.mark.parametrize("error", [{"message": "overloaded"}, "overloaded"])
def test_bench_serve_counts_an_error_event_as_one_failed_request(error):
    import json

    result = _sent([f"data: {json.dumps(e)}" for e in ({"choices": [{"text": "a"}]}, {"error": error})])
    assert not result.success and result.error == "overloaded"  # some servers send the message alone


def test_bench_serve_counts_a_stream_cut_before_done_as_failed():
    text = 'data: {"choices": [{"text": "a"}]}'
    assert _sent([text, "data: [DONE]"]).success
    result = _sent([text])  # the server died, or a proxy cut the stream, partway through
    assert not result.success and "[DONE]" in result.error
