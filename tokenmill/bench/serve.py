"""`tokenmill bench serve`: a streaming load generator for any OpenAI-compatible server."""

import argparse
import asyncio
import json
import math
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

from tokenmill.bench.datasets import BenchRequest, file_requests, prompt_requests, random_requests
from tokenmill.bench.metrics import SLO, RequestResult, summarize
from tokenmill.config import EngineConfig
from tokenmill.errors import InvalidRequestError
from tokenmill.flags import output_path, workload_seed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `bench serve` flags."""
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root, without /v1")
    parser.add_argument("--model", default=EngineConfig.model, help="model name to request")
    parser.add_argument("--tokenizer", help="model whose tokenizer builds prompts (default: --model)")
    parser.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    parser.add_argument("--dataset", default="random", help="random | prompts | FILE.jsonl")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128, help="mean prompt tokens (random dataset)")
    parser.add_argument("--output-len", type=int, default=64, help="mean tokens to generate")
    parser.add_argument("--range-ratio", type=float, default=0.0, help="lengths uniform in mean * (1 +- r)")
    parser.add_argument("--send-text", action="store_true",
                        help="send random prompts as decoded text, for servers that take no token ids")
    pacing = parser.add_mutually_exclusive_group()
    pacing.add_argument("--request-rate", type=float, default=float("inf"), help="mean arrivals per second")
    pacing.add_argument("--max-concurrency", type=int, help="requests in flight at once, sent back to back")
    parser.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of gaps; 1 = Poisson")
    parser.add_argument("--seed", type=workload_seed, default=0)
    parser.add_argument("--warmup", type=int, default=1, help="requests of their own, sent first and not counted")
    parser.add_argument("--goodput", nargs="*", metavar="NAME:MS",
                        help="report goodput: requests per second that met their deadline (--deadline-mix) and "
                             "these SLOs, if given: ttft, tpot, e2el")
    parser.add_argument("--deadline-mix", nargs=2, type=float, metavar=("TIGHT_MS", "LOOSE_MS"),
                        help="every third request carries x-tokenmill-deadline-ms TIGHT_MS, the others LOOSE_MS "
                             "(0: none)")
    parser.add_argument("--policies", nargs="+", choices=["fcfs", "deadline"],
                        help="instead of --base-url, start `tokenmill serve --model MODEL --scheduling-policy P` "
                             "on loopback for each policy in turn and run the same workload on each")
    parser.add_argument("--serve-args", default="", help="more `tokenmill serve` flags for --policies, one string")
    parser.add_argument("--cost-per-hour", type=float, help="hardware price in USD per hour")
    parser.add_argument("--api-key", help="sent as a bearer token")
    parser.add_argument("--out", type=output_path, help="write the JSON report here")
    parser.add_argument("--plot", type=output_path, help="write a PNG of latencies and throughput here")


def main(args: argparse.Namespace) -> int:
    """Build the workload, run it, print the table, write JSON and the plot."""
    from tokenmill.loader.source import open_model

    if (args.num_prompts < 1 or args.warmup < 0 or args.burstiness <= 0 or not 0 <= args.range_ratio < 1
            or not args.request_rate > 0 or args.max_concurrency is not None and args.max_concurrency < 1):
        raise InvalidRequestError("need --num-prompts >= 1, --warmup >= 0, --burstiness > 0, 0 <= --range-ratio < 1, "
                                  "--request-rate > 0 and --max-concurrency >= 1")
    if args.cost_per_hour is not None and not 0 <= args.cost_per_hour < math.inf:  # NaN too: the report is JSON
        raise InvalidRequestError("--cost-per-hour must be a USD amount >= 0")
    slo = SLO.parse(args.goodput) if args.goodput is not None else None
    tokenizer = open_model(args.tokenizer or args.model).tokenizer
    requests = workload(args, tokenizer)
    if args.endpoint == "chat" or args.send_text:  # random token ids go as their decoded text
        requests = [BenchRequest(r.prompt if isinstance(r.prompt, str) else tokenizer.decode(r.prompt),
                                 r.prompt_tokens, r.output_tokens) for r in requests]
    deadlines = deadline_mix(args.num_prompts, args.deadline_mix)
    if args.policies:
        report = {"policies": {}}
        for policy in args.policies:
            with serve_process(args.model, ["--scheduling-policy", policy, *shlex.split(args.serve_args)]) as url:
                print(f"--- scheduling policy {policy} ({url})")
                plot = args.plot and args.plot.with_stem(f"{args.plot.stem}-{policy}")
                report["policies"][policy] = _measure(
                    argparse.Namespace(**{**vars(args), "base_url": url, "plot": plot}), requests, deadlines, slo)
        if {"fcfs", "deadline"} <= set(args.policies) and slo is not None:
            fcfs, edf = (report["policies"][p]["goodput"] for p in ("fcfs", "deadline"))
            report["goodput_ratio"] = edf / fcfs if fcfs else None
            print(f"goodput deadline / fcfs: {edf:.3f} / {fcfs:.3f} req/s = "
                  + (f"{edf / fcfs:.2f}x" if fcfs else "inf (fcfs met no deadline)"))
    else:
        report = _measure(args, requests, deadlines, slo)
    report["config"] = {k: _plain(v) for k, v in vars(args).items() if k != "func"}
    if args.out:
        # Standard JSON: jq, browsers and strict parsers refuse Infinity and NaN.
        args.out.write_text(json.dumps(report, indent=2, default=str, allow_nan=False))
    runs = list(report["policies"].values()) if args.policies else [report]
    if not any(run["completed"] for run in runs):  # a table of zeros is no measurement: the report says why
        raise InvalidRequestError(f"all {runs[0]['failed']} requests failed, the first with: {runs[0]['errors'][0]}")
    return 0


def _measure(args: argparse.Namespace, requests: list[BenchRequest], deadlines: list[float | None],
             slo: SLO | None) -> dict:
    """Run the workload against args.base_url; print and return its report, and plot it if asked."""
    results, duration, busy = asyncio.run(run(args, requests, deadlines))
    report = summarize(results, duration, slo, args.cost_per_hour, busy)
    if any(d is not None for d in deadlines):
        report["deadlines"] = deadline_counts(results)
        if slo is not None:
            # Goodput with deadlines: an answer counts only if it came in time (by the client's clock and the server's).
            report["goodput"] = sum(r.on_time and slo.met_by(r) for r in results if r.success) / duration
    print(format_report(report))
    if args.plot:
        from tokenmill.bench.plot import plot_run

        plot_run(results, duration, args.plot)
    return report


@dataclass
class DeadlineResult(RequestResult):
    """A request's result, with the deadline it carried and the server's mark on its answer (met or missed)."""

    deadline_ms: float | None = None
    deadline_status: str | None = None

    @property
    def on_time(self) -> bool:
        """Answered within its deadline (or carrying none)."""
        return self.success and self.deadline_status != "missed" and (
            self.deadline_ms is None or self.e2e * 1000 <= self.deadline_ms)


def deadline_mix(count: int, mix: list[float] | None) -> list[float | None]:
    """Each request's deadline in ms: every third TIGHT_MS, the rest LOOSE_MS (None where 0, or without a mix)."""
    if mix is None:
        return [None] * count
    tight, loose = mix
    return [(tight if i % 3 == 0 else loose) or None for i in range(count)]


def deadline_counts(results: list[RequestResult]) -> dict[str, int]:
    """Requests with a deadline by outcome: on time, late (and whether the server marked them), refused or failed."""
    with_deadline = [r for r in results if isinstance(r, DeadlineResult) and r.deadline_ms is not None]
    late = [r for r in with_deadline if r.success and not r.on_time]
    return {
        "with_deadline": len(with_deadline),
        "on_time": sum(r.on_time for r in with_deadline),
        "late": len(late),
        # The contract: a late answer is marked "missed" (the client's clock may differ by the network's delay).
        "late_unmarked": sum(r.deadline_status != "missed" for r in late),
        "refused_429": sum(_failure(r) == "refused" for r in with_deadline),
        # A stream's headers go out before a request is dropped: its 429 comes as the stream's error event.
        "dropped": sum(_failure(r) == "dropped" for r in with_deadline),
        "failed_other": sum(_failure(r) == "other" for r in with_deadline),
    }


def _failure(result: RequestResult) -> str | None:
    """Why a request failed: refused (429 on arrival), dropped (infeasible while waiting), other; None if it did not."""
    if result.success:
        return None
    error = result.error or ""
    return "refused" if error.startswith("HTTP 429") else "dropped" if "dropped while waiting" in error else "other"


@contextmanager
def serve_process(model: str, flags: list[str]) -> Iterator[str]:
    """A `tokenmill serve` on a free loopback port for the length of the block; yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.NamedTemporaryFile("w+", suffix=".log") as log:
        process = subprocess.Popen([sys.executable, "-m", "tokenmill.cli", "serve", "--port", str(port), "--model",
                                    model, *flags], stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(1200):
                if process.poll() is not None:
                    raise InvalidRequestError(f"`tokenmill serve` exited: {Path(log.name).read_text()[-2000:]}")
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.25)
            else:
                raise InvalidRequestError(f"`tokenmill serve` did not come up in 5 minutes; log: {log.name}")
            yield url
        finally:
            process.terminate()
            process.wait(60)


def _plain(value: object) -> object:
    """A flag's value as JSON holds it: paths as text, the default unbounded request rate as null."""
    if isinstance(value, Path):
        return str(value)
    return None if isinstance(value, float) and not math.isfinite(value) else value


def build_requests(args: argparse.Namespace, tokenizer) -> list[BenchRequest]:
    """The workload the flags describe."""
    if args.dataset == "random":
        return random_requests(tokenizer, args.num_prompts, args.input_len, args.output_len, args.range_ratio,
                               args.seed)
    if args.dataset == "prompts":
        return prompt_requests(tokenizer, args.num_prompts, args.output_len, args.range_ratio, args.seed)
    return file_requests(tokenizer, Path(args.dataset), args.num_prompts, args.output_len)


def workload(args: argparse.Namespace, tokenizer) -> list[BenchRequest]:
    """The warm-up's requests, then the measured ones: these drawn as `plan` draws them, from --seed alone."""
    measured = build_requests(args, tokenizer)
    if not args.warmup:
        return measured
    # Past the measured ones' positions and from another seed: a warm-up prompt equal to a measured one would
    # put it in the server's prefix cache.
    more = argparse.Namespace(**{**vars(args), "num_prompts": args.num_prompts + args.warmup, "seed": args.seed + 1})
    return build_requests(more, tokenizer)[args.num_prompts :] + measured


async def run(
    args: argparse.Namespace, requests: list[BenchRequest], deadlines: list[float | None] | None = None,
) -> tuple[list[RequestResult], float, float | None]:
    """Send the first args.warmup requests one by one, then the rest on their schedule; return the measured
    results, the run's duration and the busy seconds the server's /metrics counted meanwhile (None for servers
    without tokenmill's metrics)."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, timeout=None, limits=limits) as client:
        for request in requests[: args.warmup]:
            await send(client, args, request, time.perf_counter())
        requests = requests[args.warmup :]
        busy_before = await _settled_busy_seconds(client)
        gate = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency is not None else None
        gaps = arrival_gaps(len(requests), args.request_rate, args.burstiness, args.seed)
        bar = tqdm(total=len(requests), desc="requests", unit="req")
        t0 = time.perf_counter()

        async def one(request: BenchRequest, deadline_ms: float | None) -> RequestResult:
            if gate is None:
                result = await send(client, args, request, t0, deadline_ms)
            else:
                async with gate:
                    result = await send(client, args, request, t0, deadline_ms)
            bar.update(1)
            return result

        tasks = []
        for request, gap, deadline_ms in zip(requests, gaps, deadlines or [None] * len(requests)):
            await asyncio.sleep(gap)
            tasks.append(asyncio.ensure_future(one(request, deadline_ms)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        bar.close()
        busy_after = await _settled_busy_seconds(client)
    busy = None if busy_before is None or busy_after is None else busy_after - busy_before
    return list(results), duration, busy


async def _settled_busy_seconds(client: httpx.AsyncClient) -> float | None:
    """tokenmill:busy_seconds_total summed over models, once two reads 0.1 s apart agree (the engine publishes
    a step's time just after the step's outputs go out); None where the server has no such metric."""
    last = None
    for _ in range(50):
        try:
            response = await client.get("/metrics")
        except httpx.HTTPError:
            return None
        values = [float(line.rsplit(" ", 1)[1]) for line in response.text.splitlines()
                  if response.status_code == 200 and line.startswith("tokenmill:busy_seconds_total")]
        if not values:
            return None
        if last is not None and sum(values) == last:
            return last
        last = sum(values)
        await asyncio.sleep(0.1)
    return last


def arrival_gaps(count: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds to wait before each request: gamma gaps with mean 1/rate (Poisson at burstiness 1), or none."""
    if rate == float("inf"):
        return [0.0] * count
    rng = np.random.default_rng(seed)
    return rng.gamma(burstiness, 1 / (rate * burstiness), count).tolist()


async def send(client: httpx.AsyncClient, args: argparse.Namespace, request: BenchRequest,
               t0: float, deadline_ms: float | None = None) -> RequestResult:
    """Stream one request (with its deadline header, if any) and time every chunk that carries text."""
    body: dict = {"model": args.model, "max_tokens": request.output_tokens, "stream": True, "temperature": 0,
                  "stream_options": {"include_usage": True}, "ignore_eos": True}
    if args.endpoint == "chat":
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": request.prompt}]
    else:
        path, body["prompt"] = "/v1/completions", request.prompt
    result = DeadlineResult(prompt_tokens=request.prompt_tokens, start=time.perf_counter() - t0,
                            deadline_ms=deadline_ms)
    headers = {} if deadline_ms is None else {"x-tokenmill-deadline-ms": str(deadline_ms)}
    try:
        async with client.stream("POST", path, json=body, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                result.error = f"HTTP {response.status_code}: {response.text[:200]}"
                return result
            chunks, done = 0, False
            async for line in response.aiter_lines():
                done = done or line == "data: [DONE]"
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:  # OpenAI's shape is an object; some servers send the message alone
                    error = chunk["error"]
                    result.error = str(error.get("message", error) if isinstance(error, dict) else error)
                    return result
                now = time.perf_counter() - t0
                result.deadline_status = chunk.get("deadline_status", result.deadline_status)
                if _chunk_text(chunk):
                    result.first_token = result.first_token if result.first_token is not None else now
                    result.chunk_times.append(now)
                    chunks += 1
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    result.cost = chunk["usage"].get("cost")
                    result.compute_seconds = (chunk["usage"].get("cost_details") or {}).get("compute_seconds")
            result.output_tokens = result.output_tokens or chunks  # servers that send no usage
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    finally:
        result.end = time.perf_counter() - t0
    result.success = result.first_token is not None and done
    if not result.success:
        result.error = "the stream carried no text" if result.first_token is None else "the stream ended without [DONE]"
    return result


def _chunk_text(chunk: dict) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    return choices[0].get("text") or (choices[0].get("delta") or {}).get("content") or ""


def format_report(report: dict) -> str:
    """The human-readable table."""
    rows = [
        ("completed / failed requests", f"{report['completed']} / {report['failed']}"),
        ("duration (s)", f"{report['duration_s']:.2f}"),
        ("peak concurrency", report["peak_concurrency"]),
        ("request throughput (req/s)", f"{report['request_throughput']:.3f}"),
        ("input tokens/s", f"{report['input_throughput']:.1f}"),
        ("output tokens/s", f"{report['output_throughput']:.1f}"),
        ("total tokens/s", f"{report['total_token_throughput']:.1f}"),
    ]
    if report["goodput"] is not None:
        rows.append(("goodput (req/s)", f"{report['goodput']:.3f}"))
    for name in ("ttft", "tpot", "itl", "e2el"):
        d = report[f"{name}_ms"]
        if d["mean"] is not None:
            rows.append((f"{name.upper()} ms mean / median / p90 / p99",
                         " / ".join(f"{d[k]:.1f}" for k in ("mean", "median", "p90", "p99"))))
    if report["cost_per_1m_output_tokens"] is not None:
        rows.append(("cost per 1M output tokens (USD)", f"{report['cost_per_1m_output_tokens']:.4f}"))
        rows.append(("cost per request (USD)", f"{report['cost_per_request']:.6f}"))
    if report["server_cost_usd"] is not None:
        rows.append(("server-reported cost, all requests (USD)", f"{report['server_cost_usd']:.6f}"))
    if report["server_compute_seconds"] is not None and report["server_busy_seconds"]:
        rows.append(("requests' compute s / server busy s", f"{report['server_compute_seconds']:.3f} / "
                     f"{report['server_busy_seconds']:.3f}"))
    counts = report.get("deadlines") or {}
    if counts.get("with_deadline"):
        rows.append(("deadlines: on time / late (unmarked) / refused / dropped / other failures",
                     f"{counts['on_time']} / {counts['late']} ({counts['late_unmarked']}) / {counts['refused_429']} / "
                     f"{counts['dropped']} / {counts['failed_other']}"))
    for error in report["errors"][:3]:
        rows.append(("error", error))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
