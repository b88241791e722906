"""One /metrics for all replicas: each replica's series, labelled with its replica id, in one exposition."""

import time
from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

# Counted where requests are routed (the ingress's process), which renders it on /metrics beside the replicas'
# series: `prefix` went to its prefix's replica, `least_loaded` did not (busy, or gone), `no_prefix` had no full block.
ROUTING_REGISTRY = CollectorRegistry()
ROUTING_DECISIONS = Counter("tokenmill:routing_decisions", "Requests routed, by how their replica was chosen.",
                            ["reason"], registry=ROUTING_REGISTRY)
# A replica that has not reported for this long is gone (killed, or scaled down); its series leave /metrics.
STALE_AFTER_S = 15.0


class MetricsBoard:
    """The latest exposition each replica pushed; a Ray actor in `serve --replicas`, read by the ingress."""

    def __init__(self) -> None:
        self._latest: dict[str, tuple[float, str]] = {}

    def put(self, replica: str, text: str) -> None:
        """Keep a replica's latest /metrics text."""
        self._latest[replica] = (time.monotonic(), text)

    def texts(self) -> dict[str, str]:
        """Each live replica's latest text, by replica id."""
        now = time.monotonic()
        self._latest = {r: (t, text) for r, (t, text) in self._latest.items() if now - t < STALE_AFTER_S}
        return {r: text for r, (_, text) in self._latest.items()}


class _Merged(Collector):
    """Families parsed from several expositions, each sample given a `replica` label."""

    def __init__(self, texts: Mapping[str, str]) -> None:
        self.texts = texts

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for replica, text in self.texts.items():
            for family in text_string_to_metric_families(text):
                merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                                 family.unit))
                for sample in family.samples:
                    merged.samples.append(sample._replace(labels={**sample.labels, "replica": replica}))
        yield from families.values()


def merge(texts: Mapping[str, str], local: CollectorRegistry | None = None) -> bytes:
    """One Prometheus exposition of every replica's text (labelled `replica`), then the local registry's series."""
    registry = CollectorRegistry()
    registry.register(_Merged(texts))
    merged = generate_latest(registry)
    return merged + generate_latest(local) if local is not None else merged
