"""`bench scale`'s figures from the merged /metrics (no Ray started)."""

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

from tokenmill.scale.metrics import merge

pytestmark = pytest.mark.ray  # imports ray, which only `make test-ray` installs


def _replica(hits: int, queries: int) -> str:
    registry = CollectorRegistry()
    Counter("tokenmill:prefix_cache_hits", "", registry=registry).inc(hits)
    Counter("tokenmill:prefix_cache_queries", "", registry=registry).inc(queries)
    return generate_latest(registry).decode()


def test_counters_grow_over_the_live_replicas_only():
    from tokenmill.scale.bench import _grown

    # The policy before's replicas, replaced, still on the board at the start and expired by the end.
    before = merge({"old": _replica(900, 1000), "kept": _replica(10, 20)}).decode()
    after = merge({"kept": _replica(30, 60), "new": _replica(50, 100)}).decode()
    assert _grown(before, after, "tokenmill:prefix_cache_hits_total") == 20 + 50
    assert _grown(before, after, "tokenmill:prefix_cache_queries_total") == 40 + 100
