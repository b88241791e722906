"""Prometheus series of the embedding engines, in the server's registry: batch sizes, padding, queue wait."""

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram

from tokenmill.embeddings.engine import BatchStats

_BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
# Seconds, from a wait limit of 0 (sub-millisecond) to a queue backed up behind long passes.
_QUEUE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class EmbeddingMetrics:
    """The embedding families, labelled by model_name; `observer` gives one model's BatchStats callback."""

    def __init__(self, registry: CollectorRegistry, on_busy: Callable[[str, float], None]) -> None:
        # Each pass's seconds also go to on_busy: the machine's bill is shared with the generative models.
        self.on_busy = on_busy
        labels = ["model_name"]
        self.batch_size = Histogram("tokenmill:embedding_batch_size", "Inputs per embedding forward pass.", labels,
                                    buckets=_BATCH_SIZE_BUCKETS, registry=registry)
        self.queue = Histogram("tokenmill:embedding_queue_time_seconds", "Arrival of an input to the start of the "
                               "forward pass that embeds it.", labels, buckets=_QUEUE_BUCKETS, registry=registry)
        self.tokens = Counter("tokenmill:embedding_prompt_tokens", "Input tokens embedded.", labels,
                              registry=registry)
        self.padded = Counter("tokenmill:embedding_padded_tokens", "Tokens computed, padding included: over "
                              "embedding_prompt_tokens, the cost of padding.", labels, registry=registry)
        self.busy = Counter("tokenmill:embedding_busy_seconds", "Seconds spent in embedding forward passes.",
                            labels, registry=registry)

    def observer(self, model_name: str) -> Callable[[BatchStats], None]:
        """Record one model's batches (called on its engine thread; prometheus_client is thread-safe)."""
        batch_size, queue = self.batch_size.labels(model_name), self.queue.labels(model_name)
        tokens, padded, busy = (c.labels(model_name) for c in (self.tokens, self.padded, self.busy))

        def observe(stats: BatchStats) -> None:
            batch_size.observe(stats.num_inputs)
            for seconds in stats.queue_seconds:
                queue.observe(seconds)
            tokens.inc(stats.num_tokens)
            padded.inc(stats.padded_tokens)
            busy.inc(stats.run_seconds)
            self.on_busy(model_name, stats.run_seconds)

        return observe
