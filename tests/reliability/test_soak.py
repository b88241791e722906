"""A 20-second `tokenmill bench soak`: mixed traffic with 30% cancelled or cut off loses no request and leaks no
KV block, and the server's memory stays flat after warm-up (the 10-minute run is in docs/benchmarks.md)."""

import json

from tokenmill.bench import soak
from tokenmill.cli import main


def test_soak_loses_nothing_leaks_nothing_and_memory_stays_flat(smollm2_path, tmp_path):
    report_path = tmp_path / "soak.json"
    code = main(["bench", "soak", "--duration", "20", "--warmup", "8", "--out", str(report_path)])
    report = json.loads(report_path.read_text())
    assert code == 0, report
    assert report["lost"] == 0 and report["server_unfinished_after"] == 0
    assert report["kv_usage_after"] == 0.0  # every block back in the pool
    assert report["server_errors"] == 0
    # The faults really happened: streams cancelled mid-way and requests cut off by a client timeout.
    assert report["outcomes"].get("cancelled", 0) > 0 and report["outcomes"].get("timed out", 0) > 0
    assert report["outcomes"].get("complete", 0) > 0
    # Looser than the 10-minute run's 2% (0.14% in one 30-second run of this test): 12 seconds after the warm-up leave
    # little time to average out the allocator's noise.
    assert report["rss_growth_pct"] < 5.0, report


def test_a_soak_in_which_every_request_was_refused_does_not_pass(monkeypatch):
    # A misspelt --model against --base-url: every answer a 404, and /metrics, filtered by that name, shows nothing
    # unfinished and no KV in use. It passed, having served nothing.
    async def refused(url, model, duration, concurrency, cancel_fraction, max_tokens, seed, traffic):
        traffic.outcomes["error"] += 50
        traffic.statuses[404] += 50

    monkeypatch.setattr(soak, "_traffic", refused)
    monkeypatch.setattr(soak, "settle", lambda url, model: {"unfinished": 0, "kv_usage": 0.0})
    report = soak.soak("http://127.0.0.1:9", "misspelt", None, 1.0, 0.0, 4, 0.3, 8, 0)
    assert report["lost"] == 0 and not report["passed"]
