"""Prometheus metrics, derived off the hot path from the engine's per-request timestamps and stats."""

import math
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase as Metric

from tokenmill.cost.accounting import usd, usd_per_million_tokens
from tokenmill.outputs import DraftCounters, EngineStats, RequestOutput

# Bucket edges in seconds, spanning a fast GPU (milliseconds) to a busy 2-core CPU (minutes).
_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80, 160)
_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 10, 20, 40)
_REQUEST_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 60, 120, 240, 480, 960, 1920)


class Metrics:
    """One model's series of the server's metrics, named under `tokenmill:` and labelled with its model_name."""

    def __init__(self, model_name: str, shared: "Metrics | None" = None) -> None:
        # A prometheus registry takes each metric name once, so every model's series hang off the same families.
        self.registry = shared.registry if shared else CollectorRegistry()
        self._families: dict[str, Metric] = shared._families if shared else {}
        # Every model's Metrics in the registry: models served together share one machine's bill.
        self._models: dict[str, Metrics] = shared._models if shared else {}
        self._models[model_name] = self
        # Busy seconds of the machine's other work that takes turns with the engines (embedding passes), by its name.
        self._other_busy: dict[str, float] = shared._other_busy if shared else {}
        labels = ["model_name"]

        def family(kind: type[Metric], name: str, doc: str, extra_labels: tuple[str, ...] = (), **kw: Any) -> Metric:
            if name not in self._families:
                self._families[name] = kind(f"tokenmill:{name}", doc, [*labels, *extra_labels],
                                            registry=self.registry, **kw)
            return self._families[name]

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return family(Histogram, name, doc, buckets=buckets).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return family(Counter, name, doc).labels(model_name)

        def gauge(name: str, doc: str) -> Gauge:
            return family(Gauge, name, doc).labels(model_name)

        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first output token.", _TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between consecutive output tokens.", _TOKEN_BUCKETS)
        self.tpot = histogram(
            "time_per_output_token_seconds", "Mean time per output token after the first, per request (per sample for "
        "n > 1).", _TOKEN_BUCKETS
        )
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish.", _REQUEST_BUCKETS)
        self.queue = histogram("request_queue_time_seconds", "Engine queue entry to first scheduled step, as vLLM's.",
                               _REQUEST_BUCKETS)
        self.running = gauge("num_requests_running", "Requests with sequences in the running batch.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV cache blocks held by sequences (0 to 1).")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("generation_tokens", "Output tokens of finished requests.")
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.preemptions = counter("num_preemptions", "Sequences preempted to free KV blocks.")
        self._finished = family(Counter, "request_finished", "Finished requests by the reason their last sample ended.",
                                ("finished_reason",))
        for reason in ("stop", "length", "abort"):  # export zeros, so rates work from the first request
            self._finished.labels(model_name, reason)
        self.busy = counter("busy_seconds", "Seconds the engine spent running steps (its measured busy time).")
        self.cost = counter("cost_usd", "Busy seconds priced at the machine's price per hour, in USD; the requests' "
                                        "costs add up to it.")
        utilization = ("utilization",)
        self._prompt_cost = family(Gauge, "cost_per_1m_prompt_tokens_usd", "USD per 1M prompt tokens of finished "
                                   "requests (their prefill steps), at full utilization (busy time only) or at the "
                                   "current one (the whole bill since start, idle included).", utilization)
        self._completion_cost = family(Gauge, "cost_per_1m_completion_tokens_usd", "USD per 1M completion tokens of "
                                       "finished requests (their decode steps), at full or current utilization.",
                                       utilization)
        self._routed = family(Counter, "routed_requests", "Requests for model `auto`, by the model that answered, the "
                              "--router policy and the kind of reason it chose that model.", ("policy", "reason"))
        self._deadlines = family(Counter, "deadline_requests", "Requests with a deadline by outcome: met, missed "
                                 "(answered late, and marked so), refused (on arrival, as infeasible) or dropped "
                                 "(infeasible while waiting).", ("outcome",))
        for outcome in ("met", "missed", "refused", "dropped"):
            self._deadlines.labels(model_name, outcome)
        self.idle_fraction = gauge("idle_cost_fraction", "Share of the bill since start that paid for idle time.")
        # Speculative decoding, under vLLM's names.
        self.drafts = counter("spec_decode_num_drafts", "Verification steps of sequences that had drafted.")
        self.draft_tokens = counter("spec_decode_num_draft_tokens", "Draft tokens verified.")
        self.accepted_tokens = counter("spec_decode_num_accepted_tokens", "Draft tokens accepted.")
        self._accepted_per_pos = family(Counter, "spec_decode_num_accepted_tokens_per_pos",
                                        "Draft tokens accepted, by their position in the draft (0: first).",
                                        ("position",))
        # Finished requests' compute seconds and tokens, prompt side and completion side, for the cost gauges.
        self._prompt_seconds = self._completion_seconds = 0.0
        self._prompt_token_count = self._completion_token_count = 0
        self.model_name = model_name
        self._last: EngineStats | None = None

    def for_model(self, model_name: str) -> "Metrics":
        """Another model's series in this registry, so that one /metrics shows every model."""
        return Metrics(model_name, shared=self)

    def observe_route(self, model_name: str, policy: str, reason: str) -> None:
        """Count one `auto` request answered by model_name (any served model: the family is shared)."""
        self._routed.labels(model_name, policy, reason).inc()

    def observe_deadline(self, model_name: str, outcome: str, count: int = 1) -> None:
        """Count engine requests (one per prompt) with a deadline of model_name by their outcome (met, missed,
        refused, dropped)."""
        self._deadlines.labels(model_name, outcome).inc(count)

    def observe_stats(self, stats: EngineStats) -> None:
        """Set the load gauges and advance the cumulative counters by what changed since last time."""
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        last = self._last
        self.prefix_queries.inc(stats.prefix_queries - (last.prefix_queries if last else 0))
        self.prefix_hits.inc(stats.prefix_hits - (last.prefix_hits if last else 0))
        self.preemptions.inc(stats.num_preemptions - (last.num_preemptions if last else 0))
        self._observe_drafts(stats.drafts, last.drafts if last else DraftCounters())
        busy = stats.busy_seconds - (last.busy_seconds if last else 0)
        self.busy.inc(busy)
        self.cost.inc(usd(busy, stats.price_per_hour))
        self._last = stats
        self._refresh_costs()

    def _refresh_costs(self) -> None:
        """Every model's cost gauges from its latest stats and the requests finished so far."""
        # Models served together take turns on one machine (their steps never overlap), so its bill since start,
        # idle time included, is shared by their busy seconds together.
        latest = [m._last for m in self._models.values() if m._last is not None]
        if not latest:
            return
        uptime = max(s.uptime_seconds for s in latest)
        busy_together = sum(s.busy_seconds for s in latest) + sum(self._other_busy.values())
        for model in self._models.values():
            if model._last is not None:
                model._set_cost_gauges(model._last.price_per_hour, uptime, busy_together)

    def observe_other_busy(self, name: str, seconds: float) -> None:
        """Count seconds of other work on the machine (a pass of embedding model `name`) in the bill shared."""
        # NOTE: from each embedding engine's own thread: one writer per name.
        self._other_busy[name] = self._other_busy.get(name, 0.0) + seconds

    def _observe_drafts(self, now: DraftCounters, last: DraftCounters) -> None:
        self.drafts.inc(now.num_drafts - last.num_drafts)
        self.draft_tokens.inc(now.num_draft_tokens - last.num_draft_tokens)
        self.accepted_tokens.inc(now.num_accepted_tokens - last.num_accepted_tokens)
        for position, accepted in enumerate(now.accepted_per_pos):
            before = last.accepted_per_pos[position] if position < len(last.accepted_per_pos) else 0
            self._accepted_per_pos.labels(self.model_name, str(position)).inc(accepted - before)

    def _set_cost_gauges(self, price_per_hour: float, uptime: float, busy: float) -> None:
        """The cost gauges, for a machine up `uptime` seconds of which its models were busy `busy`."""
        # At the current utilization every busy second also carries its part of the idle time billed.
        bill_per_busy_second = uptime / busy if busy else math.nan
        for family, seconds, tokens in ((self._prompt_cost, self._prompt_seconds, self._prompt_token_count),
                                        (self._completion_cost, self._completion_seconds,
                                         self._completion_token_count)):
            full = usd_per_million_tokens(seconds, tokens, price_per_hour)
            family.labels(self.model_name, "full").set(full)
            family.labels(self.model_name, "current").set(full * bill_per_busy_second)
        self.idle_fraction.set(1 - busy / uptime if uptime else 0.0)

    def observe_finished(self, output: RequestOutput) -> None:
        """Record one finished (or aborted) request's latencies and token counts from its last output."""
        m = output.metrics
        # A request aborted before it was scheduled read no prompt: not counted (as vLLM counts prompt tokens as
        # they are prefilled), and its tokens would price prompts at nothing.
        prompt_tokens = 0 if m.first_scheduled_time is None else len(output.prompt_token_ids)
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(len(m.token_times))  # the output is the last delta; the timestamps are whole
        self._prompt_seconds += m.prefill_seconds
        self._completion_seconds += m.decode_seconds
        self._prompt_token_count += prompt_tokens
        self._completion_token_count += len(m.token_times)
        self._refresh_costs()  # the stats of its last step came out before it finished
        reason = output.outputs[0].finish_reason or "abort"
        self._finished.labels(self.model_name, reason).inc()
        if m.deadline_status is not None:
            self.observe_deadline(self.model_name, m.deadline_status)
        if m.finished_time is not None:
            self.e2e.observe(m.finished_time - m.arrival_time)
        if m.first_scheduled_time is not None:
            # From the engine's queue, as vLLM's: the time before it (compiling, tokenizing) is in TTFT and e2e.
            self.queue.observe(m.first_scheduled_time - (m.arrival_time if m.queued_time is None else m.queued_time))
        if m.first_token_time is None:
            return
        self.ttft.observe(m.first_token_time - m.arrival_time)
        # Each sample as a stream of its own (as vLLM counts n > 1). A step can give a sample several tokens (its
        # accepted drafts): TPOT divides by tokens, and the gaps between tokens are those between its steps.
        for times in m.sample_token_times():
            steps = sorted(set(times))
            for earlier, later in zip(steps, steps[1:]):
                self.itl.observe(later - earlier)
            if len(times) > 1:
                self.tpot.observe((times[-1] - times[0]) / (len(times) - 1))

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric, for every model sharing this registry."""
        return generate_latest(self.registry)
