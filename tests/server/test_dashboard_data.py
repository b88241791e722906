"""The dashboard's JSON snapshot: per-model counters, gauges, costs and percentiles, from a metrics registry."""

import json
import shutil

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from tokenmill.config import ServerConfig
from tokenmill.embeddings.engine import BatchStats
from tokenmill.scale.metrics import merge
from tokenmill.outputs import CompletionOutput, DraftCounters, EngineStats, RequestMetrics, RequestOutput
from tokenmill.server.dashboard import dashboard_router, quantile, snapshot
from tokenmill.server.embedding_metrics import EmbeddingMetrics
from tokenmill.server.errors import install_handlers
from tokenmill.server.metrics import Metrics
from tokenmill.server.serving import ServerState


def _finished(ttft: float, tokens: int, reason: str = "stop") -> RequestOutput:
    token_times = [10.0 + ttft + 0.09 * i for i in range(tokens)]
    timing = RequestMetrics(arrival_time=10.0, first_scheduled_time=10.0, first_token_time=10.0 + ttft,
                            token_times=token_times, token_samples=[0] * tokens, finished_time=token_times[-1],
                            prefill_seconds=0.2, decode_seconds=0.4, price_per_hour=3.6)
    return RequestOutput("r", "p", [1, 2, 3], [CompletionOutput(0, "x", list(range(tokens)), reason)], True, 0,
                         timing)


def test_quantile_interpolates_within_its_bucket_like_prometheus():
    buckets = [(1.0, 2.0), (2.0, 6.0), (4.0, 10.0), (float("inf"), 10.0)]
    assert quantile(0.5, buckets) == pytest.approx(1.75)  # rank 5: three quarters of the way through (1, 2]
    assert quantile(0.1, buckets) == pytest.approx(0.5)
    assert quantile(1.0, buckets) == pytest.approx(4.0)
    assert quantile(0.99, [(1.0, 0.0), (float("inf"), 3.0)]) == 1.0  # in +Inf: the highest finite bound
    assert quantile(0.5, [(1.0, 0.0), (float("inf"), 0.0)]) is None


def test_snapshot_gives_each_model_its_counters_gauges_costs_and_percentiles():
    metrics = Metrics("a")
    metrics.for_model("b")
    for ttft in (0.03, 0.03, 0.03, 3.0):
        metrics.observe_finished(_finished(ttft, tokens=5))
    metrics.observe_finished(_finished(0.03, tokens=2, reason="length"))
    metrics.observe_stats(EngineStats(1, 2, num_free_blocks=30, num_blocks=40, prefix_queries=64, prefix_hits=16,
                                      num_preemptions=0, busy_seconds=2.0, uptime_seconds=8.0, price_per_hour=3.6,
                                      drafts=DraftCounters(4, 12, 9, [4, 3, 2])))
    metrics.observe_route("b", "rules", "long prompt")
    data = snapshot(metrics.registry.collect())
    json.dumps(data, allow_nan=False)  # what the page gets must be strict JSON
    a, b = data["models"]["a"], data["models"]["b"]
    assert a["requests"] == 5 and b["requests"] == 0  # finished requests summed over their reasons
    assert a["prompt_tokens"] == 15 and a["generation_tokens"] == 22
    assert (a["running"], a["waiting"], a["kv_cache_usage"]) == (1, 2, pytest.approx(0.25))
    assert (a["prefix_queries"], a["prefix_hits"]) == (64, 16)
    assert (a["draft_tokens"], a["accepted_tokens"]) == (12, 9)
    assert a["cost_usd"] == pytest.approx(0.002)  # 2 busy seconds at 0.001 USD per second
    # 1.0 s of prefill for 15 prompt tokens at 0.001 USD/s, then 4x for the idle time billed with it.
    assert a["cost_per_1m_tokens_usd"]["prompt_full"] == pytest.approx(1e6 * 0.001 / 15)
    assert a["cost_per_1m_tokens_usd"]["prompt_current"] == pytest.approx(4e6 * 0.001 / 15)
    assert b["cost_per_1m_tokens_usd"] == {}  # b never reported stats
    # Four of five TTFTs sit in (0.02, 0.04]: the median lies there, the p99 in the bucket holding 3 s.
    assert 0.02 < a["ttft"]["p50"] <= 0.04 and 2.5 < a["ttft"]["p99"] <= 5 and a["ttft"]["count"] == 5
    assert 0.075 < a["tpot"]["p50"] <= 0.1  # every TPOT is 0.09 s
    assert b["ttft"] == {"p50": None, "p90": None, "p99": None, "count": 0}
    assert b["routed"] == {"rules: long prompt": 1} and a["routed"] == {}


def test_snapshot_reads_parsed_metrics_text_as_it_reads_a_registry():
    # So that a snapshot can cover replicas whose /metrics come back as text.
    metrics = Metrics("a")
    metrics.observe_finished(_finished(0.5, tokens=3))
    from_text = snapshot(text_string_to_metric_families(metrics.render().decode()))
    from_registry = snapshot(metrics.registry.collect())
    assert from_text["models"] == from_registry["models"]


def test_snapshot_of_two_replicas_adds_counts_merges_histograms_and_averages_kv_use():
    replicas = [Metrics("a"), Metrics("a")]  # one registry each, as separate processes have
    replicas[0].observe_finished(_finished(0.03, tokens=4))
    for _ in range(3):
        replicas[1].observe_finished(_finished(3.0, tokens=2))
    for replica, free in zip(replicas, (90, 70)):
        replica.observe_stats(EngineStats(1, 0, num_free_blocks=free, num_blocks=100, prefix_queries=0,
                                          prefix_hits=0, num_preemptions=0, busy_seconds=1.0, uptime_seconds=2.0,
                                          price_per_hour=3.6))
    # A replica that also serves an embedding model: its series name a model that has no generative charts.
    embedding = EmbeddingMetrics(replicas[0].registry, replicas[0].observe_other_busy)
    embedding.observer("emb")(BatchStats(2, 8, 8, [0.0, 0.0], 0.01))
    routing = CollectorRegistry()
    Counter("tokenmill:routing_decisions", "", ["reason"], registry=routing).labels("prefix").inc(3)
    # As the deployment's ingress merges them: each replica's /metrics text, its samples labelled by replica.
    texts = {f"r{i}": replica.render().decode() for i, replica in enumerate(replicas)}
    data = snapshot(text_string_to_metric_families(merge(texts, routing).decode()))
    assert list(data["models"]) == ["a"]
    a = data["models"]["a"]
    assert a["requests"] == 4 and a["generation_tokens"] == 10 and a["ttft"]["count"] == 4
    assert a["running"] == 2 and a["kv_cache_usage"] == pytest.approx(0.2)  # (10% + 30%) / 2
    assert data["routing"] == {"prefix": 3}
    # Decode: 0.4 s for 4 tokens on one replica, 1.2 s for 6 on the other, at 0.001 USD/s: 1.6 ms over 10 tokens.
    assert a["cost_per_1m_tokens_usd"]["completion_full"] == pytest.approx(1e6 * 0.0016 / 10)
    # One fast TTFT of four: rank 2 is the first of the three slow ones in the (2.5, 5] bucket.
    assert a["ttft"]["p50"] == pytest.approx(2.5 + 2.5 * (2 - 1) / (4 - 1))


def test_page_and_script_stay_open_while_the_data_needs_the_api_key():
    app = FastAPI()
    install_handlers(app)
    app.include_router(dashboard_router("s3cret"))
    app.state.tokenmill = ServerState({}, ServerConfig(api_key="s3cret"), Metrics("a"))
    client = TestClient(app)
    page = client.get("/dashboard")
    assert page.status_code == 200 and '<script src="dashboard/dashboard.js">' in page.text
    script = client.get("/dashboard/dashboard.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert "cdn" not in (page.text + script.text).lower() and "https://" not in page.text + script.text
    denied = client.get("/dashboard/data")
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    data = client.get("/dashboard/data", headers={"Authorization": "Bearer s3cret"}).json()
    assert data["served"] == [] and data["models"]["a"]["requests"] == 0


needs_node = pytest.mark.skipif(shutil.which("node") is None,
                                reason="the dashboard's script runs in node, which is not here")
# A stub DOM, timers that wait to be run by hand, and a fetch that records the key each poll sends and answers 401.
STUB = """
const nodes = {};
const node = (id) => (nodes[id] ??= {id, hidden: false, dataset: {}, textContent: "", innerHTML: "",
  appendChild(child) { nodes[child.id] = child; }, querySelector(s) { return (this["_" + s] ??= {innerHTML: ""}); }});
globalThis.document = {getElementById: node, createElement: () => ({dataset: {},
  querySelector(s) { return (this["_" + s] ??= {innerHTML: ""}); }})};
globalThis.location = {hash: HASH};
const timers = [];
globalThis.setTimeout = (fn) => timers.push(fn);
const sent = [];
globalThis.fetch = async (url, init) => { sent.push(init.headers.Authorization ?? null); return {ok: false, status: 401}; };
const m = {requests: 0, prompt_tokens: 0, generation_tokens: 0, prefix_queries: 0, prefix_hits: 0, running: 0,
  waiting: 0, kv_cache_usage: 0, draft_tokens: 0, accepted_tokens: 0, ttft: {}, tpot: {},
  cost_per_1m_tokens_usd: {}, routed: {}};
"""


def _run_page(tmp_path, then: str, hash_at_load: str = "") -> str:
    """The last line the dashboard's script, run in node over the stub DOM and then `then`, prints."""
    import json
    import subprocess
    from pathlib import Path

    import tokenmill.server

    script = (Path(tokenmill.server.__file__).parent / "static" / "dashboard.js").read_text()
    (tmp_path / "page.js").write_text(STUB.replace("HASH", json.dumps(hash_at_load)) + script + then)
    out = subprocess.run(["node", str(tmp_path / "page.js")], capture_output=True, text=True, check=True).stdout
    return out.splitlines()[-1]


@needs_node
def test_the_dashboard_legend_shows_a_model_name_as_text(tmp_path):
    # It went into the legend's innerHTML as it was: markup from a name ran in the page, which holds the API key.
    legend = _run_page(tmp_path, """
const name = "<img src=x onerror=alert(1)>";
record({time: 1, served: [name], models: {[name]: m}, routing: {}});
record({time: 2, served: [name], models: {[name]: {...m, requests: 1}}, routing: {}});
console.log(nodes["chart-requests"]["_.legend"].innerHTML);
""")
    assert "<img" not in legend and "&#60;img src=x onerror=alert(1)&#62;" in legend


@needs_node
def test_the_dashboard_sends_the_key_added_to_an_open_page_and_keeps_its_plus_signs(tmp_path):
    # The key was read once at load: following the 401 message's advice (adding #key=... to the open page's URL,
    # which reloads nothing) changed nothing; and URLSearchParams read a base64 key's '+' as a space.
    sent = _run_page(tmp_path, """
(async () => {
  await new Promise((r) => setImmediate(r));
  location.hash = "#key=ab+cd/ef%3D";
  await timers.shift()();
  location.hash = "#key=ab+cd/ef=";
  await timers.shift()();
  console.log(JSON.stringify(sent));
})();
""")
    import json

    assert json.loads(sent) == [None, "Bearer ab+cd/ef=", "Bearer ab+cd/ef="]


@needs_node
def test_dashboard_routing_counters_that_fell_are_gaps_not_negative_rates(tmp_path):
    # A restarted router or replica resets its counters; the two routing charts drew them as negative rates.
    series = _run_page(tmp_path, """
record({time: 1, served: ["a"], models: {a: {...m, routed: {b: 50}}}, routing: {prefix: 50}});
record({time: 2, served: ["a"], models: {a: {...m, routed: {b: 2}}}, routing: {prefix: 2}});
console.log(JSON.stringify([nodes["chart-routing"].dataset.series, nodes["chart-routed"].dataset.series]));
""")
    import json

    routing, routed = (json.loads(s) for s in json.loads(series))
    assert routing["prefix"][-1] is None and routed["a"][-1] is None
