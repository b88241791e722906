"""One engine replica simulated: the real Scheduler and BlockManager over stand-in sequences, in profiled time."""

from dataclasses import dataclass, field

import numpy as np

from tokenmill.bench.datasets import lengths
from tokenmill.bench.serve import arrival_gaps
from tokenmill.config import EngineConfig
from tokenmill.cost.step_times import StepTimes
from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.scheduler import Scheduler, SchedulerOutput
from tokenmill.engine.sequence import Sequence
from tokenmill.errors import InvalidRequestError
from tokenmill.sampling import SamplingParams


@dataclass(frozen=True)
class Workload:
    """Requests of given mean lengths, uniform in mean * (1 +- spread), arriving as a Poisson process."""

    prompt_len: int
    output_len: int
    spread: float = 0.0
    num_requests: int = 500
    seed: int = 0

    def requests(self, rate: float) -> list[tuple[float, int, int]]:
        """(arrival second, prompt tokens, output tokens) of each request at this mean rate."""
        # The same draws as `bench serve --dataset random --range-ratio spread --seed seed`: lengths first,
        # then gaps from their own generator, so a prediction can be checked against that very run.
        rng = np.random.default_rng(self.seed)
        prompts = lengths(rng, self.num_requests, self.prompt_len, self.spread)
        outputs = lengths(rng, self.num_requests, self.output_len, self.spread)
        arrivals = np.cumsum(arrival_gaps(self.num_requests, rate, 1.0, self.seed)).tolist()
        return list(zip(arrivals, prompts, outputs))


@dataclass
class RequestTiming:
    """When one simulated request arrived, got each token and finished; seconds from the run's start."""

    arrival: float
    prompt_tokens: int
    token_times: list[float] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        """Time to first token."""
        return self.token_times[0] - self.arrival

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first, as `bench serve` computes it; None for one-token replies."""
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)


class _NoText:
    """Stands in for IncrementalDetokenizer: simulated tokens have no text, so no stop string can match."""

    def add(self, token_id: int, check_stop: bool) -> None:
        return None

    def finish(self, decode_rest: bool = True, check_stop: bool = True) -> None:
        return None


def simulate(times: StepTimes, settings: dict, requests: list[tuple[float, int, int]]) -> list[RequestTiming]:
    """Run the requests through the engine's scheduler, each step taking its profiled time; one timing per request."""
    config = EngineConfig(max_num_seqs=settings["max_num_seqs"], block_size=settings["block_size"],
                          max_num_batched_tokens=settings["max_num_batched_tokens"])
    # Profiles written before the sliding-window keys were recorded hold every block, as those engines did.
    scheduler = Scheduler(config, BlockManager(settings["num_blocks"], settings["block_size"],
                                               settings["enable_prefix_caching"], settings.get("sliding_window"),
                                               settings.get("num_sliding_blocks")))
    params = [SamplingParams(max_tokens=out, ignore_eos=True) for _, _, out in requests]
    timings = [RequestTiming(arrival, prompt) for arrival, prompt, _ in requests]
    now, next_request = 0.0, 0
    while next_request < len(requests) or scheduler.has_unfinished():
        # As the engine thread does, take every request that arrived during the last step before the next one.
        while next_request < len(requests) and requests[next_request][0] <= now:
            arrival, prompt, out = requests[next_request]
            # A prompt of its own, as `bench serve`'s random ones: it hits no other request's cached prefix,
            # yet after a preemption it finds its own blocks again, as in the engine.
            seq = Sequence(next_request, str(next_request), 0, [next_request] * prompt, params[next_request], out, [],
                           _NoText(), arrival)
            scheduler.add(seq)
            next_request += 1
        if not scheduler.has_unfinished():
            now = requests[next_request][0]  # idle until the next arrival
            continue
        plan = scheduler.schedule()
        if not plan.scheduled:
            pool = settings["num_blocks"] * settings["block_size"]
            raise InvalidRequestError(f"a request of {scheduler.waiting[0].num_tokens} tokens does not fit this "
                                      f"profile's KV pool of {pool} tokens; profile with a larger --kv-cache-memory")
        now += step_seconds(times, plan)
        sampled = [seq for seq, n in plan.scheduled if seq.num_computed_tokens + n == seq.num_tokens]
        scheduler.update(plan, sampled, [[0]] * len(sampled), [None] * len(sampled))
        for seq in sampled:
            timings[seq.seq_id].token_times.append(now)  # seq_id is the request's index
    return timings


def step_seconds(times: StepTimes, plan: SchedulerOutput) -> float:
    """The profiled time of a scheduled step; call it before update() records the step's progress."""
    decodes = [seq for seq, n in plan.scheduled if n == 1]
    chunks = [(seq, n) for seq, n in plan.scheduled if n > 1]
    return times.seconds(
        prefill_tokens=sum(n for _, n in chunks),
        decode_seqs=len(decodes),
        decode_context=sum(seq.num_computed_tokens for seq in decodes),
        prefill_context=sum(n * seq.num_computed_tokens for seq, n in chunks),
    )


def summarize(timings: list[RequestTiming], percentile: float) -> dict:
    """Median and percentile TTFT and TPOT (ms), request and token throughput over the run."""
    ttfts = np.array([t.ttft for t in timings]) * 1000
    tpots = np.array([t.tpot for t in timings if t.tpot is not None]) * 1000
    duration = max(t.token_times[-1] for t in timings)  # `bench serve` times from before the first arrival
    output_tokens = sum(len(t.token_times) for t in timings)
    return {
        "ttft_ms": {"median": float(np.median(ttfts)), f"p{percentile:g}": float(np.percentile(ttfts, percentile))},
        "tpot_ms": ({"median": float(np.median(tpots)), f"p{percentile:g}": float(np.percentile(tpots, percentile))}
                    if len(tpots) else {"median": None, f"p{percentile:g}": None}),
        "request_throughput": len(timings) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (output_tokens + sum(t.prompt_tokens for t in timings)) / duration,
        "duration_s": duration,
    }
