"""What the engine hands back: per-step output deltas, their logprobs and timestamps, and load stats."""

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Logprob:
    """One token's log-probability at a position, its rank there (1: the likeliest) and its text, as vLLM's."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class TokenLogprob(Mapping[int, Logprob]):
    """The chosen token's logprob and rank and the top alternatives; as a mapping, vLLM's token id -> Logprob."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
    rank: int | None = None
    # The tokens' texts, for the mapping's decoded_token: the offline LLM fills them (the engine decodes no token
    # alone).
    texts: dict[int, str] = field(default_factory=dict, repr=False, compare=False)

    def __getitem__(self, token_id: int) -> Logprob:
        if token_id == self.token_id:
            return Logprob(self.logprob, self.rank, self.texts.get(token_id))
        for i, (alternative, logprob) in enumerate(self.top):
            if alternative == token_id:
                return Logprob(logprob, i + 1, self.texts.get(token_id))
        raise KeyError(token_id)

    def __iter__(self) -> Iterator[int]:
        """The chosen token first, then the alternatives by rank, as vLLM orders them."""
        return iter(dict.fromkeys([self.token_id, *(token_id for token_id, _ in self.top)]))

    def __len__(self) -> int:
        return len({self.token_id, *(token_id for token_id, _ in self.top)})


@dataclass
class RequestMetrics:
    """Timestamps (time.perf_counter) from which latency metrics are derived off the hot path."""

    arrival_time: float
    first_scheduled_time: float | None = None
    # When the engine took the request: after the server compiled its grammar and tokenized it, since arrival.
    queued_time: float | None = None
    first_token_time: float | None = None
    # One entry per generated token of every sample, so its length is the request's output tokens; and the sample
    # (CompletionOutput.index) each entry's token belongs to.
    token_times: list[float] = field(default_factory=list)
    token_samples: list[int] = field(default_factory=list)
    finished_time: float | None = None
    # The request's share of the busy seconds of the steps it ran in (tokenmill/cost/accounting.py): for its
    # prompt (whose last step also yields each sample's first token), and for its decodes.
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    # USD per hour of the machine those seconds are billed at.
    price_per_hour: float = 0.0
    # A predicted output's tokens that appear in the answer (in order), and the rest, over all samples, as
    # OpenAI counts them; set when the request finishes.
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0
    # With a deadline (SamplingParams.deadline_ms / ttft_deadline_ms), set when the request ends: "met",
    # "missed" (served, but late: the response says so), or "dropped" (it became infeasible while waiting;
    # deadline_error says why, and the client gets that error instead of an answer).
    deadline_status: str | None = None
    deadline_error: str | None = None

    def sample_token_times(self) -> list[list[float]]:
        """token_times split by sample, each in order."""
        samples: dict[int, list[float]] = {}
        for t, sample in zip(self.token_times, self.token_samples, strict=True):
            samples.setdefault(sample, []).append(t)
        return list(samples.values())

    @property
    def compute_seconds(self) -> float:
        """The request's share of the engine's busy time."""
        return self.prefill_seconds + self.decode_seconds

    @property
    def cost_usd(self) -> float:
        """What the request's compute seconds cost at the machine's price."""
        return self.compute_seconds * self.price_per_hour / 3600


@dataclass
class CompletionOutput:
    """One sample of a request: from the engine, what is new since its last output; after add(), all of it."""

    index: int
    # Stop-safe: text that might begin a stop string (or half a UTF-8 character) waits for a later output.
    text: str
    # Tokens whose text is out (held-back text holds its tokens back too, so a delta never carries logprobs
    # of text it lacks).
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None
    cumulative_logprob: float | None = None

    def finished(self) -> bool:
        """Whether the sample has ended, as vLLM's method of this name."""
        return self.finish_reason is not None

    def add(self, delta: "CompletionOutput") -> None:
        """Append a later delta of the same sample."""
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(delta.logprobs)
        self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason
        self.cumulative_logprob = delta.cumulative_logprob


@dataclass
class RequestOutput:
    """One request's news after a step: only the samples that have something new, each as a delta."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int
    metrics: RequestMetrics
    # With SamplingParams.prompt_logprobs, in the request's first output: entry i scores prompt token i (None for
    # the first, which nothing predicts), as vLLM lines them up.
    prompt_logprobs: list[TokenLogprob | None] | None = None

    def add(self, delta: "RequestOutput") -> None:
        """Fold a later output of the same request into this one, so this one holds everything so far."""
        samples = {sample.index: sample for sample in self.outputs}
        for sample in delta.outputs:
            if sample.index in samples:
                samples[sample.index].add(sample)
            else:
                samples[sample.index] = CompletionOutput(sample.index, "", [], None)
                samples[sample.index].add(sample)
        self.outputs = sorted(samples.values(), key=lambda s: s.index)
        self.finished = delta.finished
        self.num_cached_tokens = delta.num_cached_tokens
        self.metrics = delta.metrics
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs


def accumulate(whole: RequestOutput | None, delta: RequestOutput) -> RequestOutput:
    """The request's output so far: the first delta becomes the whole (and is changed in place) as later ones are added."""
    if whole is None:
        return delta
    whole.add(delta)
    return whole


@dataclass
class DraftCounters:
    """Speculative decoding's cumulative counts, named as vLLM's spec_decode metrics."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    # Entry i: drafts whose token i was accepted.
    accepted_per_pos: list[int] = field(default_factory=list)

    def copy(self) -> "DraftCounters":
        """A snapshot that later counting leaves alone."""
        return DraftCounters(self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens,
                             list(self.accepted_per_pos))


@dataclass
class EngineStats:
    """A snapshot of the engine's load and cumulative counters, for gauges and back-pressure."""

    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_blocks: int
    prefix_queries: int
    prefix_hits: int
    num_preemptions: int
    # The engine's steps' measured seconds so far, the seconds since it started (billed whether busy or idle),
    # and the machine's USD per hour.
    busy_seconds: float = 0.0
    uptime_seconds: float = 0.0
    price_per_hour: float = 0.0
    # Speculative decoding's cumulative counts (tokenmill/spec_decode/drafter.py).
    drafts: DraftCounters = field(default_factory=DraftCounters)
    # Prompt tokens not yet computed of the waiting sequences: the work queued, bounded by --max-waiting-tokens.
    num_waiting_tokens: int = 0

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of KV blocks held by sequences, in the fullest pool (cached but unheld blocks count as free)."""
        return 1 - self.num_free_blocks / self.num_blocks
