"""Ray Serve benchmarks too slow for the test suite: prefix-aware vs default routing, and autoscaling.

    python -m tokenmill.scale.bench routing     # same run, same workload: prefix routing, then Ray's default
    python -m tokenmill.scale.bench autoscale   # a load step up and down, then scale to zero and a cold start
"""

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


def _sum_metric(text: str, name: str) -> float:
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


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
    delta = {name: _sum_metric(after, name) - _sum_metric(before, name)
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


def _replicas() -> int:
    """Running engine replicas right now."""
    deployments = serve.status().applications["tokenmill"].deployments["engine"]
    return deployments.replica_states.get("RUNNING", 0)


def _wait_replicas(target: int, timeout: float) -> float | None:
    """Seconds until exactly `target` engine replicas run, or None after timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if _replicas() == target:
            return time.monotonic() - start
        time.sleep(0.5)
    return None


def autoscale(args: argparse.Namespace) -> None:
    """A load step on 1..2 replicas (when the second starts, when it stops), then scale to zero and a cold start."""
    engine = EngineConfig(model=args.model, num_threads=1)
    server = ServerConfig(port=args.port)
    url = f"http://127.0.0.1:{args.port}"
    step = ScaleConfig(1, min_replicas=1, max_replicas=2, target_ongoing_requests=2,
                       upscale_delay=args.upscale_delay, downscale_delay=args.downscale_delay)
    start_ray(server, step)
    deploy(engine, server, [args.model], step)
    prompts = shared_prefix_workload(64, 1, 40)

    async def load(seconds: float) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            deadline = time.monotonic() + seconds

            async def worker(i: int) -> None:
                while time.monotonic() < deadline:
                    await _ttft(client, prompts[i % len(prompts)], 32)
                    i += 8
            await asyncio.gather(*(worker(i) for i in range(8)))

    print(json.dumps({"phase": "load step", "concurrency": 8, **step.deployment_options()}), flush=True)
    loaded = time.monotonic()
    thread = threading.Thread(target=asyncio.run, args=(load(args.load_seconds),))
    thread.start()
    up = _wait_replicas(2, args.load_seconds)
    print(json.dumps({"second_replica_running_after_s": up and round(up, 1),
                      "upscale_delay_s": args.upscale_delay}), flush=True)
    thread.join()
    stopped = time.monotonic()
    down = _wait_replicas(1, args.downscale_delay + 120)
    print(json.dumps({"load_s": round(stopped - loaded, 1), "back_to_one_after_s": down and round(down, 1),
                      "downscale_delay_s": args.downscale_delay}), flush=True)

    to_zero = replace(step, replicas=1, min_replicas=0, max_replicas=1)
    redeployed = time.monotonic()  # the idle spell starts as the new bounds reach the controller, not once deployed
    deploy(engine, server, [args.model], to_zero)
    idle = _wait_replicas(0, args.downscale_delay + 120) and time.monotonic() - redeployed
    start = time.perf_counter()
    first = httpx.post(f"{url}/v1/completions", json={"prompt": "Hello", "max_tokens": 8}, timeout=600)
    cold = time.perf_counter() - start
    print(json.dumps({"zero_replicas_after_idle_s": idle and round(idle, 1), "first_request_status":
                      first.status_code, "first_request_after_zero_s": round(cold, 1)}), flush=True)
    serve.shutdown()


def main() -> None:
    """Run one benchmark; each prints JSON lines."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=("routing", "autoscale"))
    parser.add_argument("--model", default=EngineConfig.model)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--groups", type=int, default=8, help="prompt groups, each sharing a document")
    parser.add_argument("--per-group", type=int, default=4)
    parser.add_argument("--prefix-words", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--upscale-delay", type=float, default=5)
    parser.add_argument("--downscale-delay", type=float, default=15)
    parser.add_argument("--load-seconds", type=float, default=150)
    args = parser.parse_args()
    {"routing": routing, "autoscale": autoscale}[args.benchmark](args)


if __name__ == "__main__":
    main()
