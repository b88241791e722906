"""`tokenmill bench soak`: mixed traffic with cancels, disconnects and timeouts; then checks nothing was lost or leaked."""

import argparse
import asyncio
import itertools
import json
import math
import random
import statistics
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import psutil

from tokenmill.bench.local_server import start_server
from tokenmill.config import EngineConfig
from tokenmill.flags import output_path, workload_seed

WORDS = "the river mountain quietly seven engine cloud paper market orange history sings under bright".split()
# Stops that the default model's answers often contain, so stop strings really end requests early.
STOPS = [[" the"], ["."], [",", "\n"], ["e"]]
# A request that neither finishes nor fails by then counts as lost: the server hung on it. Generous, as a shared
# 2-core machine has been measured taking 120 s over a 32-token answer under others' load.
SAFETY_TIMEOUT_S = 300.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `bench soak` flags."""
    parser.add_argument("--base-url", help="a running server's root, without /v1 (default: start one on loopback)")
    parser.add_argument("--model", default=EngineConfig.model, help="model to serve and request")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of traffic")
    parser.add_argument("--warmup", type=float, help="seconds of traffic before the RSS baseline "
                        "(default: a quarter of --duration, at most 60)")
    parser.add_argument("--concurrency", type=int, default=8, help="clients sending back to back")
    parser.add_argument("--cancel-fraction", type=float, default=0.3,
                        help="share of requests cancelled mid-stream or cut off by a short client timeout")
    parser.add_argument("--max-tokens", type=int, default=32, help="the most tokens one request asks for")
    parser.add_argument("--seed", type=workload_seed, default=0)
    # NOTE: a fresh KV pool's pages are mapped on first write, so a 1 GiB default pool would read as RSS growth for
    # as long as traffic reaches new blocks; a small pool is all written during warm-up, and preemption gets exercised.
    parser.add_argument("--kv-cache-memory", type=float, default=0.02,
                        help="GiB of KV pool for the started server (default 0.02: about 900 tokens of the default model)")
    parser.add_argument("--serve-flag", action="append", default=[], metavar="FLAG",
                        help="extra flag for the started server, e.g. --serve-flag=--max-num-seqs=16")
    parser.add_argument("--out", type=output_path, help="write the JSON report here")


@dataclass
class Traffic:
    """What the clients saw, by outcome, and the server's RSS samples as (seconds since start, bytes)."""

    outcomes: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)
    slowest_s: float = 0.0  # the longest a request took to end, whatever its outcome
    rss: list[tuple[float, int]] = field(default_factory=list)


def main(args: argparse.Namespace) -> int:
    """Run the soak and print its report; exit 1 if a request was lost, a block leaked or the server answered 5xx."""
    warmup = args.warmup if args.warmup is not None else min(60.0, args.duration / 4)
    if not 0 <= warmup < args.duration:
        print(f"--warmup={warmup} must be in [0, --duration={args.duration})", file=sys.stderr)
        return 2
    if args.concurrency < 1 or not 0 <= args.cancel_fraction <= 1:
        print("--concurrency must be at least 1 and --cancel-fraction in [0, 1]", file=sys.stderr)
        return 2
    server = None if args.base_url else start_server(["--model", args.model, "--kv-cache-memory",
                                                      str(args.kv_cache_memory), *args.serve_flag])
    url = args.base_url or server.url
    try:
        pid = server.process.pid if server else _listening_pid(url)
        report = soak(url, args.model, pid, args.duration, warmup, args.concurrency, args.cancel_fraction,
                      args.max_tokens, args.seed)
    finally:
        if server:
            server.stop()
    print(format_report(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1


def soak(url: str, model: str, pid: int | None, duration: float, warmup: float, concurrency: int,
         cancel_fraction: float, max_tokens: int, seed: int) -> dict:
    """Send the traffic, let the server settle, and return the report as a dict."""
    traffic = Traffic()
    stop_sampling = threading.Event()
    sampler = threading.Thread(target=_sample_rss, args=(pid, traffic.rss, stop_sampling), daemon=True)
    sampler.start()
    started = time.perf_counter()
    asyncio.run(_traffic(url, model, duration, concurrency, cancel_fraction, max_tokens, seed, traffic))
    traffic_s = time.perf_counter() - started
    stop_sampling.set()
    sampler.join()
    settled = settle(url, model)
    ended = sum(traffic.outcomes.values())
    lost = traffic.outcomes["lost"] + settled["unfinished"]
    growth = _rss_growth(traffic.rss, warmup, traffic_s)
    return {
        "url": url, "model": model, "duration_s": round(traffic_s, 1), "warmup_s": warmup,
        "concurrency": concurrency, "cancel_fraction": cancel_fraction,
        "requests": ended, "outcomes": dict(traffic.outcomes), "http_statuses": {str(k): v for k, v in
                                                                                 sorted(traffic.statuses.items())},
        "lost": lost, "lost_examples": traffic.lost[:5], "slowest_request_s": round(traffic.slowest_s, 1),
        "server_unfinished_after": settled["unfinished"], "kv_usage_after": settled["kv_usage"],
        "server_errors": sum(v for k, v in traffic.statuses.items() if k >= 500),
        **growth,
        # Something must have been served: a misspelt --model has every request refused, and then /metrics,
        # filtered by that name, shows nothing unfinished and no KV in use.
        "passed": lost == 0 and settled["kv_usage"] == 0 and traffic.outcomes["complete"] > 0
        and not any(k >= 500 for k in traffic.statuses),
    }


async def _traffic(url: str, model: str, duration: float, concurrency: int, cancel_fraction: float,
                   max_tokens: int, seed: int, traffic: Traffic) -> None:
    end = time.perf_counter() + duration
    limits = httpx.Limits(max_connections=concurrency * 2)
    sent = itertools.count()
    async with httpx.AsyncClient(base_url=url, timeout=SAFETY_TIMEOUT_S, limits=limits) as client:
        async def worker(rng: random.Random) -> None:
            while time.perf_counter() < end:
                await _one(client, model, rng, _fate(next(sent), cancel_fraction), max_tokens, traffic)

        await asyncio.gather(*(worker(random.Random(seed * 1000 + i)) for i in range(concurrency)))


def _fate(k: int, cancel_fraction: float) -> str:
    """Whether request k runs to its end, is cancelled mid-stream, or is cut off by a short client timeout."""
    # NOTE: spread evenly rather than drawn, so even a short run on a slow machine has both kinds of fault.
    unlucky = math.floor((k + 1) * cancel_fraction) > math.floor(k * cancel_fraction)
    if not unlucky:
        return "run"
    return "cancel" if math.floor(k * cancel_fraction) % 2 == 0 else "timeout"


async def _one(client: httpx.AsyncClient, model: str, rng: random.Random, fate: str, max_tokens: int,
               traffic: Traffic) -> None:
    """Send one random request and record how it ended."""
    chat = rng.random() < 0.5
    stream = fate == "cancel" or rng.random() < 0.6
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 40)))
    body: dict = {"model": model, "max_tokens": rng.randint(1, max_tokens), "stream": stream,
                  "temperature": rng.choice([0.0, 0.7, 1.0]), "seed": rng.randrange(1000)}
    if rng.random() < 0.3:
        body["stop"] = rng.choice(STOPS)
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    # A cancelled stream is closed after a few chunks; a timeout cuts a request off, streamed or not.
    cancel_after = rng.randint(1, 4) if fate == "cancel" else None
    timeout = rng.uniform(0.05, 1.0) if fate == "timeout" else None
    path = "/v1/chat/completions" if chat else "/v1/completions"
    started = time.perf_counter()
    try:
        outcome = await asyncio.wait_for(_send(client, path, body, cancel_after, traffic), timeout)
    except asyncio.TimeoutError:
        outcome = "timed out" if timeout is not None else "lost"
    except (httpx.HTTPError, ValueError) as exc:  # a transport failure, or a body that is not the JSON promised
        outcome = "lost"
        traffic.lost.append(f"{path} {type(exc).__name__} after {time.perf_counter() - started:.0f} s: {exc}")
    traffic.outcomes[outcome] += 1
    traffic.slowest_s = max(traffic.slowest_s, time.perf_counter() - started)


async def _send(client: httpx.AsyncClient, path: str, body: dict, cancel_after: int | None, traffic: Traffic) -> str:
    async with client.stream("POST", path, json=body) as response:
        traffic.statuses[response.status_code] += 1
        if response.status_code != 200:
            error = json.loads(await response.aread()).get("error", {})
            return "error" if isinstance(error, dict) and "message" in error else "lost"
        if not body["stream"]:
            choices = json.loads(await response.aread()).get("choices")
            return "complete" if choices else "lost"
        chunks = 0
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return "complete"
            if "error" in json.loads(line[6:]):
                return "error"
            chunks += 1
            if chunks == cancel_after:
                return "cancelled"  # leaving the block closes the connection mid-stream
        traffic.lost.append(f"{path}: the stream ended without [DONE]")
        return "lost"


def settle(url: str, model: str, wait_s: float = 30.0) -> dict:
    """Wait for the server to drain; return requests still running or waiting, and the KV pool's usage."""
    deadline = time.monotonic() + wait_s
    while True:
        values = _metrics(url, model)
        unfinished = int(values.get("tokenmill:num_requests_running", 0) + values.get("tokenmill:num_requests_waiting", 0))
        usage = values.get("tokenmill:kv_cache_usage_perc", 0.0)
        if (unfinished == 0 and usage == 0) or time.monotonic() > deadline:
            return {"unfinished": unfinished, "kv_usage": usage}
        time.sleep(0.5)


def _metrics(url: str, model: str) -> dict[str, float]:
    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("#") or f'model_name="{model}"' not in line:
            continue
        key, value = line.rsplit(" ", 1)
        values[key.split("{")[0]] = float(value)
    return values


def _sample_rss(pid: int | None, samples: list[tuple[float, int]], stop: threading.Event) -> None:
    if pid is None:
        return
    process, started = psutil.Process(pid), time.perf_counter()
    while not stop.wait(1.0):
        try:
            samples.append((time.perf_counter() - started, process.memory_info().rss))
        except psutil.NoSuchProcess:  # the server died: the requests it held will show as lost
            return


def _rss_growth(samples: list[tuple[float, int]], warmup: float, traffic_s: float) -> dict:
    """RSS at the end of warm-up and at the end of traffic (medians of 10 s windows), and the growth between."""
    if not samples:
        return {"rss_after_warmup_mb": None, "rss_end_mb": None, "rss_peak_mb": None, "rss_growth_pct": None}
    window = min(10.0, max(1.0, (traffic_s - warmup) / 4))

    def median_near(t: float) -> float:
        near = [rss for s, rss in samples if t - window <= s <= t] or [min(samples, key=lambda x: abs(x[0] - t))[1]]
        return statistics.median(near)

    base, end = median_near(warmup + window), median_near(traffic_s)
    return {"rss_after_warmup_mb": round(base / 2**20, 1), "rss_end_mb": round(end / 2**20, 1),
            "rss_peak_mb": round(max(rss for _, rss in samples) / 2**20, 1),
            "rss_growth_pct": round(100 * (end - base) / base, 2)}


def format_report(report: dict) -> str:
    """The report as aligned text rows."""
    outcomes = ", ".join(f"{v} {k}" for k, v in sorted(report["outcomes"].items()))
    statuses = ", ".join(f"{v}x {k}" for k, v in report["http_statuses"].items())
    rows = [
        ("traffic", f"{report['duration_s']} s, {report['concurrency']} clients, "
                    f"{report['cancel_fraction']:.0%} cancelled or cut off"),
        ("requests", f"{report['requests']} ({outcomes})"),
        ("HTTP statuses", statuses),
        ("lost requests", str(report["lost"])),
        ("slowest request", f"{report['slowest_request_s']} s"),
        ("server 5xx", str(report["server_errors"])),
        ("KV pool in use after", f"{report['kv_usage_after']:.2%}" + (" (0 leaked blocks)"
                                                                      if report["kv_usage_after"] == 0 else "")),
    ]
    if report["rss_growth_pct"] is not None:
        rows.append(("server RSS after warm-up / end / peak",
                     f"{report['rss_after_warmup_mb']} / {report['rss_end_mb']} / {report['rss_peak_mb']} MiB"))
        rows.append(("RSS growth after warm-up", f"{report['rss_growth_pct']:+.2f}%"))
    rows += [(f"lost: {i}", example) for i, example in enumerate(report["lost_examples"])]
    rows.append(("result", "PASS" if report["passed"] else "FAIL"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _listening_pid(url: str) -> int | None:
    """The pid of the local process listening on url's port, to sample its RSS; None if it is not ours to see."""
    port = httpx.URL(url).port
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid is not None:
            return conn.pid
    return None
