"""`tokenmill bench serve` against a real tokenmill server: every report field, and counts that add up."""

import json
import subprocess
import sys

FIELDS = {
    "duration_s", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
    "input_throughput", "output_throughput", "total_token_throughput", "ttft_ms", "tpot_ms", "itl_ms", "e2el_ms",
    "peak_concurrency", "goodput", "cost_per_hour", "cost_per_1m_output_tokens", "cost_per_request", "errors",
    "config", "server_cost_usd", "server_compute_seconds", "server_busy_seconds",
}


def _bench(server, tmp_path, *flags: str, exit_code: int = 0) -> tuple[dict, subprocess.CompletedProcess]:
    out = tmp_path / "result.json"
    result = subprocess.run(
        [sys.executable, "-m", "tokenmill.cli", "bench", "serve", "--base-url", server.url, "--out", str(out),
         "--plot", str(tmp_path / "result.png"), *flags],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == exit_code, result.stderr
    return json.loads(out.read_text(), parse_constant=_not_standard_json), result


def _not_standard_json(constant: str) -> None:
    raise AssertionError(f"the report holds {constant}, which strict JSON parsers refuse")


def test_bench_serve_reports_every_field_and_counts_add_up(server, tmp_path):
    report, result = _bench(server, tmp_path, "--num-prompts", "6", "--input-len", "40", "--output-len", "8",
                            "--max-concurrency", "3", "--goodput", "ttft:60000", "tpot:60000",
                            "--cost-per-hour", "2.0")
    assert set(report) == FIELDS
    assert report["completed"] == 6 and report["failed"] == 0 and report["errors"] == []
    assert report["total_input_tokens"] == 6 * 40  # random prompts go as exact token ids
    assert report["total_output_tokens"] == 6 * 8  # ignore_eos: every request runs to max_tokens
    assert 1 <= report["peak_concurrency"] <= 3
    assert abs(report["output_throughput"] * report["duration_s"] - report["total_output_tokens"]) < 1e-6
    assert report["goodput"] == report["request_throughput"]  # generous SLOs: every request meets them
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        d = report[name]
        assert 0 < d["median"] <= d["p90"] <= d["p99"]
    assert report["ttft_ms"]["mean"] < report["e2el_ms"]["mean"]
    run_cost = 2.0 * report["duration_s"] / 3600
    assert abs(report["cost_per_request"] - run_cost / 6) < 1e-12
    assert "output tokens/s" in result.stdout and "TTFT ms" in result.stdout
    # The responses' costs account for all of the server's busy time over the run, and no more.
    assert report["server_cost_usd"] > 0
    assert abs(report["server_compute_seconds"] / report["server_busy_seconds"] - 1) < 0.01
    assert (tmp_path / "result.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_serve_chat_with_poisson_arrivals(server, tmp_path):
    report, _ = _bench(server, tmp_path, "--endpoint", "chat", "--dataset", "prompts", "--num-prompts", "4",
                       "--output-len", "6", "--request-rate", "20", "--burstiness", "0.5")
    assert report["completed"] == 4 and report["total_output_tokens"] == 24
    assert report["total_input_tokens"] > 4 * 14  # the chat template wraps each prompt


def test_bench_serve_counts_rejected_requests_as_failures(server, tmp_path):
    # 9000-token prompts do not fit the 8192-token context: the server answers 400 to each.
    report, result = _bench(server, tmp_path, "--num-prompts", "2", "--output-len", "4", "--warmup", "0",
                            "--input-len", "9000", exit_code=1)  # a table of zeros is no measurement
    assert report["completed"] == 0 and report["failed"] == 2
    assert "HTTP 400" in report["errors"][0]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("tokenmill: error: all 2 requests failed, the first with: HTTP 400")
