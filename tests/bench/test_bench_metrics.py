"""Benchmark arithmetic on hand-built timings whose answers are known."""

import pytest

from tokenmill.bench.metrics import SLO, RequestResult, distribution, peak_concurrency, summarize
from tokenmill.errors import InvalidRequestError


def _result(start, first, chunks, end, tokens, prompt=10, success=True) -> RequestResult:
    return RequestResult(prompt_tokens=prompt, start=start, success=success, output_tokens=tokens,
                         first_token=first, chunk_times=chunks, end=end)


# A: starts 0, first token 0.5, 5 tokens in 5 chunks, ends 1.3 -> TPOT (1.3 - 0.5) / 4 = 0.2
A = _result(0.0, 0.5, [0.5, 0.7, 0.9, 1.1, 1.3], 1.3, 5)
# B: starts 1.0, first token 1.2, 4 tokens in 2 chunks (0.4 apart), ends 1.6 -> TPOT 0.4 / 3
B = _result(1.0, 1.2, [1.2, 1.6], 1.6, 4, prompt=20)
FAILED = RequestResult(prompt_tokens=30, start=0.2, end=0.3, error="HTTP 500")


def test_ttft_tpot_and_itl_per_request():
    assert A.ttft == 0.5 and A.e2e == 1.3
    assert A.tpot == pytest.approx(0.2)
    assert B.tpot == pytest.approx(0.4 / 3)
    assert B.itls == pytest.approx([0.4])
    assert _result(0, 0.1, [0.1], 0.1, 1).tpot is None  # one token: no TPOT


def test_distribution_uses_linear_percentiles_in_ms():
    d = distribution([0.001 * v for v in range(1, 101)])  # 1..100 ms
    assert d["mean"] == pytest.approx(50.5)
    assert d["median"] == pytest.approx(50.5)
    assert d["p90"] == pytest.approx(90.1)
    assert d["p99"] == pytest.approx(99.01)
    assert distribution([])["p99"] is None


def test_summary_counts_throughput_and_pooled_itl():
    s = summarize([A, B, FAILED], duration=2.0)
    assert (s["completed"], s["failed"]) == (2, 1)
    assert s["total_input_tokens"] == 30 and s["total_output_tokens"] == 9  # failed requests do not count
    assert s["request_throughput"] == 1.0
    assert s["output_throughput"] == 4.5 and s["total_token_throughput"] == 19.5
    assert s["ttft_ms"]["mean"] == pytest.approx(350.0)  # (500 + 200) / 2
    # ITL pools every gap of every request: four of 200 ms and one of 400 ms.
    assert s["itl_ms"]["mean"] == pytest.approx(240.0)
    assert s["itl_ms"]["median"] == pytest.approx(200.0)
    assert s["e2el_ms"]["median"] == pytest.approx(950.0)  # (1300 + 600) / 2
    assert s["errors"] == ["HTTP 500"]
    assert s["goodput"] is None and s["cost_per_request"] is None


def test_goodput_counts_requests_meeting_every_slo():
    assert summarize([A, B], 2.0, SLO.parse(["ttft:400"]))["goodput"] == 0.5  # only B
    assert summarize([A, B], 2.0, SLO.parse(["ttft:600", "tpot:150"]))["goodput"] == 0.5  # only B
    assert summarize([A, B], 2.0, SLO.parse(["e2el:2000"]))["goodput"] == 1.0
    with pytest.raises(InvalidRequestError, match="NAME:MS"):
        SLO.parse(["latency:5"])


@pytest.mark.parametrize("spec", ["ttft:abc", "ttft:-5", "tpot:nan", "e2el:inf"])
def test_a_goodput_slo_that_is_no_number_of_milliseconds_is_refused(spec):
    # "abc" was a ValueError's traceback; -5 and nan counted no request as meeting it.
    with pytest.raises(InvalidRequestError, match="MS a number of milliseconds"):
        SLO.parse([spec])


def test_peak_concurrency_and_cost():
    assert peak_concurrency([A, B, FAILED]) == 2  # A overlaps FAILED (0.2-0.3) and B (1.0-1.3)
    assert peak_concurrency([_result(0, 0.1, [0.1], 1.0, 1), _result(1.0, 1.1, [1.1], 2.0, 1)]) == 1
    s = summarize([A, B], duration=3600.0, cost_per_hour=2.0)
    assert s["cost_per_1m_output_tokens"] == pytest.approx(2.0 / 9 * 1e6)
    assert s["cost_per_request"] == pytest.approx(1.0)
