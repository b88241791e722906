"""`tokenmill bench overload`: at a multiple of the sustainable rate, admitted requests' TTFT and how fast the rest are
refused."""

import argparse
import asyncio
import json
import shlex
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import httpx
import numpy as np

from tokenmill.bench.datasets import BenchRequest, random_requests
from tokenmill.bench.serve import arrival_gaps, send, serve_process
from tokenmill.config import EngineConfig
from tokenmill.errors import InvalidRequestError
from tokenmill.flags import output_path, workload_seed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `bench overload` flags."""
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root, without /v1")
    parser.add_argument("--serve-args", help="instead of --base-url, start `tokenmill serve --model MODEL` with these "
                                             "flags (one string, e.g. \"--max-waiting-tokens 256\") on loopback")
    parser.add_argument("--model", default=EngineConfig.model, help="model name to request")
    parser.add_argument("--input-len", type=int, default=64, help="prompt tokens")
    parser.add_argument("--output-len", type=int, default=16, help="tokens to generate")
    parser.add_argument("--unloaded-requests", type=int, default=20, help="requests sent one at a time for the "
                                                                          "unloaded TTFT")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight when finding the "
                                                                   "sustainable rate")
    parser.add_argument("--factor", type=float, default=10.0, help="offered load, in multiples of that rate")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of overload")
    parser.add_argument("--seed", type=workload_seed, default=0)
    parser.add_argument("--out", type=output_path, help="write the JSON report here")


def main(args: argparse.Namespace) -> int:
    """Measure unloaded, then sustainable, then overloaded; print the table and write JSON."""
    from tokenmill.loader.source import open_model

    if args.unloaded_requests < 2 or args.concurrency < 1 or args.factor <= 0 or args.duration <= 0:
        raise InvalidRequestError("need --unloaded-requests >= 2, --concurrency >= 1, --factor > 0, --duration > 0")
    tokenizer = open_model(args.model).tokenizer
    count = args.unloaded_requests + 4 * args.concurrency + 1
    requests = random_requests(tokenizer, count, args.input_len, args.output_len, 0.0, args.seed)

    def fresh(n: int) -> list[BenchRequest]:
        return random_requests(tokenizer, n, args.input_len, args.output_len, 0.0, args.seed + 1)

    server = serve_process(args.model, shlex.split(args.serve_args)) if args.serve_args else nullcontext(args.base_url)
    with server as url:
        report = asyncio.run(measure(argparse.Namespace(**{**vars(args), "base_url": url}), requests, fresh))
    report["config"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"}
    print(format_report(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2, allow_nan=False))
    return 0


async def measure(args: argparse.Namespace, requests: list[BenchRequest],
                  fresh: Callable[[int], list[BenchRequest]]) -> dict:
    """The three phases against args.base_url; fresh(n) makes the overload phase's n prompts."""
    # send() reads these of a `bench serve` namespace.
    args.endpoint, args.send_text = "completions", False
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=args.base_url, timeout=None, limits=limits) as client:
        t0 = time.perf_counter()
        for _ in range(3):  # warm-up (the first steps are slow), and steps for the engine's step-time fit
            await send(client, args, requests[0], t0)
        unloaded = [await send(client, args, r, t0) for r in requests[1 : 1 + args.unloaded_requests]]
        _check(unloaded, "unloaded")
        # Sustainable: what the server completes per second with `concurrency` requests always in flight.
        batch = requests[1 + args.unloaded_requests :]
        gate = asyncio.Semaphore(args.concurrency)

        async def gated(request: BenchRequest):
            async with gate:
                # A closed loop at the door of a bounded queue: a 429 here is retried, not counted.
                while (result := await send(client, args, request, t0)).error and result.error.startswith("HTTP 429"):
                    await asyncio.sleep(0.05)
                return result

        started = time.perf_counter()
        sustained = await asyncio.gather(*(gated(r) for r in batch))
        _check(sustained, "sustainable-rate")
        rate = len(batch) / (time.perf_counter() - started)
        offered = rate * args.factor
        n = max(1, round(offered * args.duration))
        gaps = arrival_gaps(n, offered, 1.0, args.seed)
        # Prompts not sent before: a server's prefix cache would otherwise skip the prefills of the admitted
        # requests that the unloaded ones paid in full.
        overload = fresh(n)
        t0 = time.perf_counter()
        tasks = []
        for request, gap in zip(overload, gaps):
            await asyncio.sleep(gap)
            tasks.append(asyncio.ensure_future(send(client, args, request, t0)))
        overloaded = await asyncio.gather(*tasks)
    admitted = [r for r in overloaded if r.success]
    refused = [r for r in overloaded if not r.success and (r.error or "").startswith("HTTP 429")]
    unloaded_p99 = _p99([r.ttft for r in unloaded])
    admitted_p99 = _p99([r.ttft for r in admitted])
    refusal_p99 = _p99([r.e2e for r in refused])
    return {
        "unloaded_ttft_p99_ms": unloaded_p99,
        "unloaded_ttft_median_ms": _median([r.ttft for r in unloaded]),
        "sustainable_rate": rate,
        "offered_rate": offered,
        "sent": len(overloaded),
        "admitted": len(admitted),
        "refused_429": len(refused),
        "failed_other": len(overloaded) - len(admitted) - len(refused),
        "admitted_ttft_p99_ms": admitted_p99,
        "admitted_ttft_median_ms": _median([r.ttft for r in admitted]),
        "admitted_ttft_p99_over_unloaded": admitted_p99 / unloaded_p99 if admitted else None,
        "refusal_latency_p99_ms": refusal_p99,
        "errors": sorted({r.error for r in overloaded if r.error and not r.error.startswith("HTTP 429")})[:5],
    }


def _check(results: list, phase: str) -> None:
    failed = [r.error for r in results if not r.success]
    if failed:
        raise InvalidRequestError(f"{len(failed)} requests failed in the {phase} phase, e.g. {failed[0]}; the server "
                                  "must answer them all (raise --max-waiting / --max-waiting-tokens, or lower "
                                  "--concurrency)")


def _median(seconds: list[float]) -> float | None:
    return float(np.median(seconds) * 1000) if seconds else None


def _p99(seconds: list[float]) -> float | None:
    return float(np.percentile(np.asarray(seconds) * 1000, 99)) if seconds else None


def format_report(report: dict) -> str:
    """The human-readable table."""

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    ratio = report["admitted_ttft_p99_over_unloaded"]
    rows = [
        ("unloaded TTFT median / p99 (ms)", f"{ms(report['unloaded_ttft_median_ms'])} / "
                                            f"{ms(report['unloaded_ttft_p99_ms'])}"),
        ("sustainable rate (req/s)", f"{report['sustainable_rate']:.2f}"),
        ("offered rate (req/s)", f"{report['offered_rate']:.2f}"),
        ("sent / admitted / refused 429 / other", f"{report['sent']} / {report['admitted']} / "
                                                  f"{report['refused_429']} / {report['failed_other']}"),
        ("admitted TTFT median / p99 (ms)", f"{ms(report['admitted_ttft_median_ms'])} / "
                                            f"{ms(report['admitted_ttft_p99_ms'])}"),
        ("admitted p99 / unloaded p99", "-" if ratio is None else f"{ratio:.2f}x (target <= 2x)"),
        ("429 latency p99 (ms)", f"{ms(report['refusal_latency_p99_ms'])} (target <= 50)"),
    ]
    rows += [("error", error) for error in report["errors"]]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
