"""Benchmark arithmetic: per-request timings in, latency percentiles, throughput, goodput and cost out."""

import math
from dataclasses import dataclass, field

import numpy as np

from tokenmill.errors import InvalidRequestError

PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    """What the client saw of one request; times in seconds from the run's start."""

    prompt_tokens: int
    start: float
    success: bool = False
    output_tokens: int = 0
    first_token: float | None = None  # arrival of the first chunk that carried text
    chunk_times: list[float] = field(default_factory=list)  # arrival of every chunk that carried text
    end: float | None = None
    error: str | None = None
    # What the server said the request cost (usage.cost) and the compute seconds behind it, where it says.
    cost: float | None = None
    compute_seconds: float | None = None

    @property
    def ttft(self) -> float:
        """Time to first token."""
        assert self.first_token is not None
        return self.first_token - self.start

    @property
    def e2e(self) -> float:
        """End-to-end latency."""
        assert self.end is not None
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (e2e - ttft) / (tokens - 1); None for one-token replies."""
        if self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        """Gaps between consecutive text chunks (a chunk may carry several tokens)."""
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]


@dataclass
class SLO:
    """Service-level objectives in milliseconds; a request meeting every given one counts toward goodput."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    @classmethod
    def parse(cls, specs: list[str]) -> "SLO":
        """From ["ttft:500", "tpot:50", "e2el:3000"]."""
        names = {"ttft": "ttft_ms", "tpot": "tpot_ms", "e2el": "e2el_ms"}
        slo = cls()
        for spec in specs:
            name, _, value = spec.partition(":")
            try:
                ms = float(value)
            except ValueError:
                ms = math.nan
            if name not in names or not 0 <= ms < math.inf:
                raise InvalidRequestError(f"goodput SLO {spec!r} must be NAME:MS with NAME one of {', '.join(names)} "
                                          "and MS a number of milliseconds >= 0")
            setattr(slo, names[name], ms)
        return slo

    def met_by(self, r: RequestResult) -> bool:
        """True when the request meets every objective that is set."""
        tpot = r.tpot or 0.0
        return (
            (self.ttft_ms is None or r.ttft * 1000 <= self.ttft_ms)
            and (self.tpot_ms is None or tpot * 1000 <= self.tpot_ms)
            and (self.e2el_ms is None or r.e2e * 1000 <= self.e2el_ms)
        )


def distribution(values: list[float], scale: float = 1000.0) -> dict[str, float | None]:
    """Mean, median, p90 and p99 (default unit: milliseconds from seconds); None without samples."""
    if not values:
        return {"mean": None, "median": None, "p90": None, "p99": None}
    a = np.asarray(values, dtype=float) * scale
    p50, p90, p99 = np.percentile(a, PERCENTILES)
    return {"mean": float(a.mean()), "median": float(p50), "p90": float(p90), "p99": float(p99)}


def peak_concurrency(results: list[RequestResult]) -> int:
    """Most requests in flight at once."""
    events = sorted([(r.start, 1) for r in results] + [(r.end, -1) for r in results if r.end is not None],
                    key=lambda e: (e[0], e[1]))  # at equal times an end comes before a start
    peak = current = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def summarize(results: list[RequestResult], duration: float, slo: SLO | None = None,
              cost_per_hour: float | None = None, server_busy_seconds: float | None = None) -> dict:
    """The run's report: counts, throughput, latency distributions (ms), goodput, concurrency and cost."""
    ok = [r for r in results if r.success]
    input_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    report = {
        "duration_s": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration,
        "input_throughput": input_tokens / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        "ttft_ms": distribution([r.ttft for r in ok]),
        "tpot_ms": distribution([t for r in ok if (t := r.tpot) is not None]),
        "itl_ms": distribution([gap for r in ok for gap in r.itls]),
        "e2el_ms": distribution([r.e2e for r in ok]),
        "peak_concurrency": peak_concurrency(results),
        "goodput": None,
        "cost_per_hour": cost_per_hour,
        "cost_per_1m_output_tokens": None,
        "cost_per_request": None,
        # tokenmill servers: the sum of the responses' usage.cost and compute seconds, and the busy seconds
        # its /metrics counted over the run; the compute seconds should add up to the busy ones.
        "server_cost_usd": _sum_reported([r.cost for r in ok]),
        "server_compute_seconds": _sum_reported([r.compute_seconds for r in ok]),
        "server_busy_seconds": server_busy_seconds,
        "errors": sorted({r.error for r in results if r.error}),
    }
    if slo is not None:
        report["goodput"] = sum(slo.met_by(r) for r in ok) / duration
    if cost_per_hour is not None:
        run_cost = cost_per_hour * duration / 3600
        report["cost_per_1m_output_tokens"] = run_cost / output_tokens * 1e6 if output_tokens else None
        report["cost_per_request"] = run_cost / len(ok) if ok else None
    return report


def _sum_reported(values: list[float | None]) -> float | None:
    """The sum of what every response reported, or None where any did not (a server without cost)."""
    return None if not values or any(v is None for v in values) else sum(values)
