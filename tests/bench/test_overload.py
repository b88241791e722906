"""`bench overload` sends its overload phase prompts the server has not seen, so no prefill is skipped there."""

import argparse
import asyncio

from tokenmill.bench import overload
from tokenmill.bench.datasets import BenchRequest
from tokenmill.bench.metrics import RequestResult


def test_the_overload_phase_sends_prompts_no_earlier_phase_sent(monkeypatch):
    sent: list[tuple[int, ...]] = []

    async def fake_send(client, args, request, t0, deadline_ms=None):
        sent.append(tuple(request.prompt))
        await asyncio.sleep(0.01)
        return RequestResult(prompt_tokens=request.prompt_tokens, start=0.0, success=True, output_tokens=1,
                             first_token=0.01, end=0.01)

    monkeypatch.setattr(overload, "send", fake_send)
    requests = [BenchRequest([i, i], 2, 1) for i in range(7)]
    args = argparse.Namespace(base_url="http://127.0.0.1:9", model="m", unloaded_requests=2, concurrency=1,
                              factor=1.0, duration=0.05, seed=0)
    report = asyncio.run(overload.measure(args, requests, lambda n: [BenchRequest([100 + i], 1, 1) for i in range(n)]))
    earlier = 3 + 2 + 4  # warm-up, unloaded, sustainable-rate
    assert report["sent"] == len(sent) - earlier >= 1
    assert not set(sent[earlier:]) & set(sent[:earlier])
