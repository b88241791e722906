"""Two engine replicas on a real Ray Serve: both serve, and killing one loses only what was in flight on it."""

import asyncio
import os
import signal
import time
from collections import Counter

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.ray

_MODEL = "smollm2-135m"
# Long enough that every stream is still running when a replica is killed, two seconds into the load.
_MAX_TOKENS = 200


def _client(server) -> openai.AsyncOpenAI:
    # No retries: a request lost with its replica must surface as an error here, not be retried elsewhere.
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)


async def _start_stream(client: openai.AsyncOpenAI, i: int) -> tuple[int, object]:
    raw = await client.completions.with_raw_response.create(
        model=_MODEL, prompt=f"Request {i}: write a long story about a lighthouse.", max_tokens=_MAX_TOKENS,
        stream=True, extra_body={"ignore_eos": True})
    return int(raw.headers["x-tokenmill-pid"]), raw.parse()


async def _finish(stream) -> str:
    """'ok' when the stream ends with a finish reason, else the error's class name."""
    try:
        finish = None
        async for chunk in stream:
            finish = chunk.choices[0].finish_reason or finish
        return "ok" if finish == "length" else f"no finish ({finish})"
    except openai.APIError as exc:
        return type(exc).__name__


def test_both_replicas_serve_and_metrics_label_each(ray_server):
    async def run() -> list[int]:
        client = _client(ray_server)
        raws = await asyncio.gather(*(client.completions.with_raw_response.create(
            model=_MODEL, prompt=f"Count to {i}:", max_tokens=16) for i in range(8)))
        assert all(raw.parse().choices[0].finish_reason in ("length", "stop") for raw in raws)
        return [int(raw.headers["x-tokenmill-pid"]) for raw in raws]

    # One burst, right after start-up: the replica whose queue length the router has not cached yet (the
    # readiness probes went to one) must still get its share (test_routing.py pins the rule).
    per_replica = Counter(asyncio.run(run()))
    # Prompts under one block: least loaded first, equal loads in turn (4 and 4 unless some finish early).
    assert len(per_replica) == 2 and min(per_replica.values()) >= 2, per_replica
    time.sleep(2.5)  # the replicas push their series every second
    text = httpx.get(f"{ray_server.url}/metrics", timeout=30).text
    finished = {s.labels["replica"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "tokenmill:e2e_request_latency_seconds_count"}
    assert len(finished) == 2 and sum(finished.values()) >= 8
    decisions = {s.labels["reason"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
                 if s.name == "tokenmill:routing_decisions_total"}
    assert decisions.get("no_prefix", 0) >= 4 and not decisions.get("prefix")  # no prompt fills a 16-token block
    data = httpx.get(f"{ray_server.url}/dashboard/data", timeout=30).json()  # the dashboard sees both replicas
    assert data["models"][_MODEL]["ttft"]["count"] == sum(finished.values())
    assert data["routing"] == decisions


def test_killing_a_replica_fails_only_its_requests_and_ray_restarts_it(ray_server):
    async def load() -> tuple[int, dict[int, list[str]], float]:
        client = _client(ray_server)
        started = await asyncio.gather(*(_start_stream(client, i) for i in range(8)))
        by_pid: dict[int, list] = {}
        for pid, stream in started:
            by_pid.setdefault(pid, []).append(stream)
        assert len(by_pid) == 2, "both replicas should hold streams before the kill"
        victim = min(by_pid)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        # No hang: every stream ends, with an error or with its tokens, well within the client's timeout.
        outcomes = await asyncio.wait_for(asyncio.gather(*(_finish(s) for s in sum(by_pid.values(), []))), 90)
        it = iter(outcomes)
        return victim, {pid: [next(it) for _ in streams] for pid, streams in by_pid.items()}, killed_at

    victim, outcomes, killed_at = asyncio.run(load())
    survivor = next(pid for pid in outcomes if pid != victim)
    assert all(o != "ok" for o in outcomes[victim]), outcomes  # lost with their replica, as errors
    assert outcomes[survivor] == ["ok"] * len(outcomes[survivor]), outcomes

    # Meanwhile the survivor serves, and Ray Serve replaces the killed replica with a new process.
    seen: set[int] = set()
    with httpx.Client(base_url=ray_server.url, timeout=60) as http:
        while time.monotonic() - killed_at < 240 and not seen - {victim, survivor}:
            answers = [http.post("/v1/completions", json={"model": _MODEL, "prompt": f"Hi {i}", "max_tokens": 2})
                       for i in range(2)]
            assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
            seen |= {int(a.headers["x-tokenmill-pid"]) for a in answers}
            time.sleep(2)
    assert victim not in seen and survivor in seen
    assert seen - {victim, survivor}, "Ray Serve did not restart the killed replica within 240 s"
