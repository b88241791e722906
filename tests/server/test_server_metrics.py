"""Latency metrics come out right from hand-built engine timestamps."""

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tokenmill.embeddings.engine import BatchStats
from tokenmill.outputs import CompletionOutput, EngineStats, RequestMetrics, RequestOutput
from tokenmill.server.embedding_metrics import EmbeddingMetrics
from tokenmill.server.metrics import Metrics


def _samples(metrics: Metrics) -> dict[str, float]:
    """Sample values by name, with `[reason]` for finished_reason and `<le` for histogram buckets."""
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            key = sample.name
            if "finished_reason" in sample.labels:
                key += f"[{sample.labels['finished_reason']}]"
            if "le" in sample.labels:
                key += f"<{sample.labels['le']}"
            out[key] = sample.value
    return out


def test_finished_request_gives_ttft_tpot_itl_queue_and_e2e():
    timing = RequestMetrics(arrival_time=10.0, first_scheduled_time=10.5, first_token_time=11.0,
                            token_times=[11.0, 11.1, 11.3, 11.6], token_samples=[0] * 4, finished_time=11.7)
    output = RequestOutput("r", "p", [1, 2, 3], [CompletionOutput(0, "abcd", [4, 5, 6, 7], "length")],
                           finished=True, num_cached_tokens=0, metrics=timing)
    metrics = Metrics("m")
    metrics.observe_finished(output)
    s = _samples(metrics)
    assert s["tokenmill:time_to_first_token_seconds_sum"] == 1.0
    assert s["tokenmill:request_queue_time_seconds_sum"] == 0.5
    assert abs(s["tokenmill:e2e_request_latency_seconds_sum"] - 1.7) < 1e-9
    # TPOT = (last token - first token) / (tokens - 1) = 0.6 / 3
    assert abs(s["tokenmill:time_per_output_token_seconds_sum"] - 0.2) < 1e-9
    # ITL: three gaps, 0.1 + 0.2 + 0.3
    assert s["tokenmill:inter_token_latency_seconds_count"] == 3
    assert abs(s["tokenmill:inter_token_latency_seconds_sum"] - 0.6) < 1e-9
    assert s["tokenmill:inter_token_latency_seconds_bucket<0.1"] == 1
    assert s["tokenmill:prompt_tokens_total"] == 3 and s["tokenmill:generation_tokens_total"] == 4
    assert s["tokenmill:request_finished_total[length]"] == 1 and s["tokenmill:request_finished_total[abort]"] == 0


def test_queue_time_counts_from_the_engines_queue_and_ttft_from_arrival():
    # Arrival is the handler's start now: compiling and tokenizing (here 0.3 s) went into queue time as well.
    timing = RequestMetrics(arrival_time=10.0, queued_time=10.3, first_scheduled_time=10.5, first_token_time=11.0,
                            token_times=[11.0], token_samples=[0], finished_time=11.0)
    output = RequestOutput("r", "p", [1, 2, 3], [CompletionOutput(0, "a", [4], "length")], finished=True,
                           num_cached_tokens=0, metrics=timing)
    metrics = Metrics("m")
    metrics.observe_finished(output)
    s = _samples(metrics)
    assert abs(s["tokenmill:request_queue_time_seconds_sum"] - 0.2) < 1e-9
    assert s["tokenmill:time_to_first_token_seconds_sum"] == 1.0


def test_request_aborted_before_its_first_token_counts_as_abort_without_ttft():
    timing = RequestMetrics(arrival_time=1.0, finished_time=3.0)
    output = RequestOutput("r", None, [1], [CompletionOutput(0, "", [], "abort")], True, 0, timing)
    metrics = Metrics("m")
    metrics.observe_finished(output)
    s = _samples(metrics)
    assert s["tokenmill:request_finished_total[abort]"] == 1
    assert s["tokenmill:time_to_first_token_seconds_count"] == 0
    assert s["tokenmill:e2e_request_latency_seconds_sum"] == 2.0


def test_a_request_aborted_before_it_was_scheduled_prices_no_prompt_tokens():
    ran = RequestOutput("r", None, [1, 2, 3, 4], [CompletionOutput(0, "a", [5], "length")], True, 0,
                        RequestMetrics(0.0, first_scheduled_time=0.1, token_times=[0.5], token_samples=[0],
                                       finished_time=0.5, prefill_seconds=0.4, price_per_hour=3.6))
    queued = RequestOutput("q", None, [1] * 100, [CompletionOutput(0, "", [], "abort")], True, 0,
                           RequestMetrics(0.0, finished_time=0.5, price_per_hour=3.6))
    metrics = Metrics("m")
    for output in (ran, queued):
        metrics.observe_finished(output)
    metrics.observe_stats(EngineStats(0, 0, 10, 10, 0, 0, 0, busy_seconds=0.4, uptime_seconds=1.0,
                                      price_per_hour=3.6))
    s = {sample.name + str(sample.labels.get("utilization", "")): sample.value
         for family in text_string_to_metric_families(metrics.render().decode()) for sample in family.samples}
    assert s["tokenmill:prompt_tokens_total"] == 4
    assert abs(s["tokenmill:cost_per_1m_prompt_tokens_usdfull"] - 0.4 * 0.001 / 4 * 1e6) < 1e-6


def test_stats_set_gauges_and_advance_counters_by_their_change():
    metrics = Metrics("m")
    metrics.observe_stats(EngineStats(2, 3, num_free_blocks=75, num_blocks=100, prefix_queries=64, prefix_hits=32,
                                      num_preemptions=1))
    metrics.observe_stats(EngineStats(1, 0, num_free_blocks=90, num_blocks=100, prefix_queries=96, prefix_hits=48,
                                      num_preemptions=1))
    s = _samples(metrics)
    assert s["tokenmill:num_requests_running"] == 1 and s["tokenmill:num_requests_waiting"] == 0
    assert abs(s["tokenmill:kv_cache_usage_perc"] - 0.1) < 1e-9
    assert s["tokenmill:prefix_cache_queries_total"] == 96 and s["tokenmill:prefix_cache_hits_total"] == 48
    assert s["tokenmill:num_preemptions_total"] == 1


def test_tpot_divides_by_each_samples_tokens_when_a_step_gives_several():
    # Sample 0 gets its first token, then 3 tokens in one step (2 accepted drafts), then 1; sample 1 one a step.
    timing = RequestMetrics(arrival_time=10.0, first_token_time=11.0,
                            token_times=[11.0, 11.0, 11.2, 11.2, 11.2, 11.2, 11.4, 11.4],
                            token_samples=[0, 1, 0, 0, 0, 1, 0, 1], finished_time=11.4)
    output = RequestOutput("r", "p", [1], [CompletionOutput(0, "", [], "length")], finished=True,
                           num_cached_tokens=0, metrics=timing)
    metrics = Metrics("m")
    metrics.observe_finished(output)
    s = _samples(metrics)
    # Sample 0: 0.4 s over 4 gaps; sample 1: 0.4 s over 2.
    assert s["tokenmill:time_per_output_token_seconds_count"] == 2
    assert abs(s["tokenmill:time_per_output_token_seconds_sum"] - (0.1 + 0.2)) < 1e-9
    # Each sample's steps 0.2 s apart: two gaps each.
    assert s["tokenmill:inter_token_latency_seconds_count"] == 4
    assert abs(s["tokenmill:inter_token_latency_seconds_sum"] - 0.8) < 1e-9
    assert s["tokenmill:generation_tokens_total"] == 8


def test_cost_counters_and_per_token_gauges_follow_busy_time_and_finished_requests():
    # 3.6 USD per hour is 0.001 USD per second.
    timing = RequestMetrics(arrival_time=0.0, first_scheduled_time=0.1, token_times=[1.0, 1.1, 1.2, 1.3],
                            token_samples=[0] * 4, finished_time=1.3, prefill_seconds=0.3, decode_seconds=0.9,
                            price_per_hour=3.6)
    output = RequestOutput("r", "p", [1, 2, 3], [CompletionOutput(0, "abcd", [4, 5, 6, 7], "length")],
                           finished=True, num_cached_tokens=0, metrics=timing)
    metrics = Metrics("m")
    metrics.observe_finished(output)
    for busy, uptime in ((0.5, 2.0), (2.0, 8.0)):
        metrics.observe_stats(EngineStats(0, 0, 10, 10, 0, 0, 0, busy_seconds=busy, uptime_seconds=uptime,
                                          price_per_hour=3.6))
    s = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            s[sample.name + (f"[{sample.labels['utilization']}]" if "utilization" in sample.labels else "")] = (
                sample.value)
    assert s["tokenmill:busy_seconds_total"] == 2.0
    assert abs(s["tokenmill:cost_usd_total"] - 0.002) < 1e-12
    # Busy 2 s of 8 billed: a quarter of the bill paid for work, so the current cost is four times the full one.
    assert s["tokenmill:idle_cost_fraction"] == 0.75
    assert abs(s["tokenmill:cost_per_1m_prompt_tokens_usd[full]"] - 0.3 * 0.001 / 3 * 1e6) < 1e-6
    assert abs(s["tokenmill:cost_per_1m_prompt_tokens_usd[current]"] - 4 * 0.3 * 0.001 / 3 * 1e6) < 1e-6
    assert abs(s["tokenmill:cost_per_1m_completion_tokens_usd[full]"] - 0.9 * 0.001 / 4 * 1e6) < 1e-6
    assert abs(s["tokenmill:cost_per_1m_completion_tokens_usd[current]"] - 4 * 0.9 * 0.001 / 4 * 1e6) < 1e-6


def test_the_per_token_cost_counts_a_request_as_soon_as_it_finishes():
    # Its last step's stats come out before it finishes; the gauges waited for the next stats (NaN after the first).
    metrics = Metrics("m")
    metrics.observe_stats(EngineStats(0, 0, 10, 10, 0, 0, 0, busy_seconds=0.4, uptime_seconds=1.0, price_per_hour=3.6))
    timing = RequestMetrics(arrival_time=0.0, first_scheduled_time=0.1, first_token_time=0.5, token_times=[0.5],
                            token_samples=[0], finished_time=0.5, prefill_seconds=0.4, price_per_hour=3.6)
    metrics.observe_finished(RequestOutput("r", "p", [1, 2, 3, 4], [CompletionOutput(0, "a", [5], "length")],
                                           finished=True, num_cached_tokens=0, metrics=timing))
    full = [s.value for family in text_string_to_metric_families(metrics.render().decode()) for s in family.samples
            if s.name == "tokenmill:cost_per_1m_prompt_tokens_usd" and s.labels["utilization"] == "full"]
    assert full == [pytest.approx(0.4 * 0.001 / 4 * 1e6)]


def test_models_served_together_share_the_machines_bill():
    small = Metrics("small")
    other = small.for_model("other")
    # One machine up 8 s: each model busy 2 s of it, in turns. Half the bill paid for idle time, not three quarters.
    for metrics in (small, other):
        metrics.observe_stats(EngineStats(0, 0, 10, 10, 0, 0, 0, busy_seconds=2.0, uptime_seconds=8.0,
                                          price_per_hour=3.6))
    idle = {s.labels["model_name"]: s.value for family in text_string_to_metric_families(small.render().decode())
            for s in family.samples if s.name == "tokenmill:idle_cost_fraction"}
    assert idle == {"small": 0.5, "other": 0.5}


def test_embedding_passes_share_the_machines_bill_with_the_generative_models():
    metrics = Metrics("chat")
    embedding = EmbeddingMetrics(metrics.registry, metrics.observe_other_busy)
    # One machine up 8 s: the chat model busy 2 s of it, embedding passes 4 s more, taking turns with it.
    embedding.observer("minilm")(BatchStats(num_inputs=4, num_tokens=40, padded_tokens=48, queue_seconds=[0.0] * 4,
                                            run_seconds=4.0))
    metrics.observe_stats(EngineStats(0, 0, 10, 10, 0, 0, 0, busy_seconds=2.0, uptime_seconds=8.0, price_per_hour=3.6))
    idle = [s.value for family in text_string_to_metric_families(metrics.render().decode()) for s in family.samples
            if s.name == "tokenmill:idle_cost_fraction"]
    assert idle == [0.25]  # 6 s of 8 busy, not 2 s
