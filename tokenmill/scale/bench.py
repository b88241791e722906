"""Ray Serve benchmarks too slow for the test suite (`tokenmill bench scale`, tokenmill/bench/scale.py, runs them):
prefix-aware against default routing, and autoscaling."""

import argparse
import asyncio
import json
import random
import statistics
import threading
import time
from dataclasses import replace

import httpx
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from tokenmill.config import EngineConfig, ServerConfig
from tokenmill.scale.config import ScaleConfig
from tokenmill.scale.deployment import deploy, start_ray

_WORDS = ("harbor lantern granite tide ledger copper meadow signal orchard quarry beacon timber canal spindle "
          "furnace glacier parchment compass thistle anvil").split()


def shared_prefix_workload(groups: int, per_group: int, prefix_words: int, seed: int = 0) -> list[str]:
    """groups x per_group prompts: each group's share a long document, then differ in the question; interleaved."""
    rng = random.Random(seed)
    documents = [" ".join(rng.choice(_WORDS) for _ in range(prefix_words)) for _ in range(groups)]
    return [f"Document {g}: {documents[g]}\nQuestion {q}: which word comes up most, and why?"
            for q in range(per_group) for g in range(groups)]


def _grown(before: str, after: str, name: str) -> float:
    """How much a counter grew over the replicas live at the end."""
    # A replaced replica's last push, still on the board at the start, is gone at the end: no part of the growth.
    start = _by_replica(before, name)
    return sum(value - start.get(replica, 0.0) for replica, value in _by_replica(after, name).items())


def _by_replica(text: str, name: str) -> dict[str, float]:
    """A counter's value in each replica's series of a merged exposition."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                replica = sample.labels.get("replica", "")
                values[replica] = values.get(replica, 0.0) + sample.value
    return values


async def _ttft(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> float:
    """Seconds from sending to the first streamed token (the server's default model)."""
    start = time.perf_counter()
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        ttft = None
        async for line in response.aiter_lines():
            if ttft is None and line.startswith("data: {"):
                ttft = time.perf_counter() - start
    assert ttft is not None
    return ttft


async def run_workload(url: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    """Send prompts, at most `concurrency` at once, in order; TTFTs and the prefix-cache hit rate over the run."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        before = (await client.get("/metrics")).text
        slots = asyncio.Semaphore(concurrency)

        async def one(prompt: str) -> float:
            async with slots:
                return await _ttft(client, prompt, max_tokens)

        started = time.perf_counter()
        ttfts = await asyncio.gather(*(one(p) for p in prompts))
        elapsed = time.perf_counter() - started
        await asyncio.sleep(2.5)  # the replicas push their counters every second
        after = (await client.get("/metrics")).text
    delta = {name: _grown(before, after, name)
             for name in ("tokenmill:prefix_cache_hits_total", "tokenmill:prefix_cache_queries_total")}
    return {"requests": len(prompts), "seconds": round(elapsed, 1),
            "mean_ttft_s": round(statistics.mean(ttfts), 3), "p50_ttft_s": round(statistics.median(ttfts), 3),
            "prefix_hit_rate": round(delta["tokenmill:prefix_cache_hits_total"]
                                     / max(delta["tokenmill:prefix_cache_queries_total"], 1), 3)}


def routing(args: argparse.Namespace) -> None:
    """The shared-prefix workload under each routing policy, each on freshly started replicas."""
    engine = EngineConfig(model=args.model, num_threads=1)
    server = ServerConfig(port=args.port)
    prompts = shared_prefix_workload(args.groups, args.per_group, args.prefix_words)
    start_ray(server, ScaleConfig(args.replicas))
    results = {}
    for policy in ("prefix", "default"):
        deploy(engine, server, [args.model], ScaleConfig(args.replicas, routing=policy))  # new replicas: cold caches
        results[policy] = asyncio.run(run_workload(f"http://127.0.0.1:{args.port}", prompts, args.concurrency,
                                                   args.max_tokens))
        print(json.dumps({"routing": policy, **results[policy]}), flush=True)
    serve.shutdown()


class ReplicaWatch:
    """Polls Serve's status of the engine deployment on a thread; keeps each change of its replica counts."""

    def __init__(self, period_s: float = 0.2) -> None:
        self.period_s = period_s
        # (monotonic time, replicas not stopping, running, all including stopping), one per change.
        self.samples: list[tuple[float, int, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            app = serve.status().applications.get("tokenmill")
            states = app.deployments["engine"].replica_states if app and "engine" in app.deployments else {}
            total = sum(states.values())
            counts = (total - states.get("STOPPING", 0), states.get("RUNNING", 0), total)
            if not self.samples or self.samples[-1][1:] != counts:
                self.samples.append((time.monotonic(), *counts))
            self._stop.wait(self.period_s)

    def first(self, since: float, live: int | None = None, running: int | None = None, total: int | None = None,
              timeout: float = 300) -> float | None:
        """Seconds after `since` until the counts first matched (None ones match anything), waiting up to timeout."""
        deadline = time.monotonic() + timeout
        while True:
            for t, *counts in self.samples:
                if t >= since and all(want is None or have == want
                                      for want, have in zip((live, running, total), counts)):
                    return round(t - since, 1)
            if time.monotonic() > deadline:
                return None
            time.sleep(self.period_s)

    def stop(self) -> None:
        """End the polling thread."""
        self._stop.set()
        self._thread.join()


def autoscale(args: argparse.Namespace) -> None:
    """A load step on 1..2 replicas (when the second is decided, runs, serves; when it goes), then scale to zero
    and a cold start. Times are seconds from the load's start, its end, the redeploy, the cold request."""
    engine = EngineConfig(model=args.model, num_threads=1)
    server = ServerConfig(port=args.port)
    url = f"http://127.0.0.1:{args.port}"
    step = ScaleConfig(1, min_replicas=1, max_replicas=2, target_ongoing_requests=2,
                       upscale_delay=args.upscale_delay, downscale_delay=args.downscale_delay)
    start_ray(server, step)
    deploy(engine, server, [args.model], step)
    watch = ReplicaWatch()
    prompts = shared_prefix_workload(64, 1, 40)
    first_served: dict[str, float] = {}  # replica id -> when it first answered during the load step

    async def load(seconds: float) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            deadline = time.monotonic() + seconds

            async def worker(i: int) -> None:
                while time.monotonic() < deadline:
                    body = {"prompt": prompts[i % len(prompts)], "max_tokens": 32}
                    response = (await client.post("/v1/completions", json=body)).raise_for_status()
                    first_served.setdefault(response.headers["x-tokenmill-replica"], time.monotonic())
                    i += 8
            await asyncio.gather(*(worker(i) for i in range(8)))

    print(json.dumps({"phase": "load step", "concurrency": 8, **step.deployment_options()}), flush=True)
    loaded = time.monotonic()
    asyncio.run(load(args.load_seconds))
    stopped = time.monotonic()
    served = sorted(first_served.values())
    print(json.dumps({"load_s": round(stopped - loaded, 1), "upscale_delay_s": args.upscale_delay,
                      "up_decided_s": watch.first(loaded, live=2, timeout=5),
                      "second_replica_running_s": watch.first(loaded, running=2, timeout=5),
                      "second_replica_first_answer_s": round(served[1] - loaded, 1) if len(served) > 1 else None}),
          flush=True)
    print(json.dumps({"downscale_delay_s": args.downscale_delay,
                      "down_decided_after_load_s": watch.first(stopped, live=1, timeout=args.downscale_delay + 120),
                      "replica_gone_after_load_s": watch.first(stopped, total=1, timeout=60)}), flush=True)

    to_zero = replace(step, replicas=1, min_replicas=0, max_replicas=1)
    redeployed = time.monotonic()
    deploy(engine, server, [args.model], to_zero)  # Serve replaces the replica: its idle spell starts once deployed
    deployed = time.monotonic()
    idle = watch.first(deployed, live=0, timeout=args.downscale_delay + 120)
    cold = time.monotonic()
    first = httpx.post(f"{url}/v1/completions", json={"prompt": "Hello", "max_tokens": 8}, timeout=600)
    answered = time.monotonic() - cold
    print(json.dumps({"redeploy_s": round(deployed - redeployed, 1), "zero_decided_after_deployed_s": idle,
                      "first_request_status": first.status_code,
                      "cold_up_decided_s": watch.first(cold, live=1, timeout=5),
                      "cold_replica_running_s": watch.first(cold, running=1, timeout=5),
                      "first_request_after_zero_s": round(answered, 1)}), flush=True)
    watch.stop()
    serve.shutdown()
