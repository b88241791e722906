"""The live dashboard: GET /dashboard (a page shipped in the package) and the JSON snapshot it polls."""

import math
import time
from collections.abc import Iterable
from importlib.resources import files

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import Metric

from tokenmill.server.auth import require_api_key
from tokenmill.server.serving import state_of

QUANTILES = (0.5, 0.9, 0.99)
_PREFIX = "tokenmill:"
# Counters and gauges the page charts, by their sample name (without the prefix) and their key in a snapshot.
_VALUES = {
    "request_finished_total": "requests",
    "prompt_tokens_total": "prompt_tokens",
    "generation_tokens_total": "generation_tokens",
    "prefix_cache_queries_total": "prefix_queries",
    "prefix_cache_hits_total": "prefix_hits",
    "num_requests_running": "running",
    "num_requests_waiting": "waiting",
    "cost_usd_total": "cost_usd",
    "spec_decode_num_draft_tokens_total": "draft_tokens",
    "spec_decode_num_accepted_tokens_total": "accepted_tokens",
}
_HISTOGRAMS = {"time_to_first_token_seconds": "ttft", "time_per_output_token_seconds": "tpot"}
_COSTS = {"cost_per_1m_prompt_tokens_usd": "prompt", "cost_per_1m_completion_tokens_usd": "completion"}
_TOKENS = {"prompt_tokens_total": "prompt", "generation_tokens_total": "completion"}  # what each cost is per
_STATIC = files("tokenmill.server") / "static"  # the page and its script, package data


def snapshot(families: Iterable[Metric]) -> dict:
    """Each model's cumulative counters, gauges, cost and TTFT/TPOT percentiles, from Prometheus metric families.

    A function of the families (a registry's `collect()`, or parsed /metrics text), so that one snapshot can
    cover several replicas' series: their counts add up, their histograms merge, their KV cache use averages.
    Counters stay cumulative: the page turns them into rates between polls. `routing` holds the replica
    routing decisions (`tokenmill:routing_decisions`, by reason) where a router counts them.
    """
    models: dict[str, dict] = {}
    buckets: dict[tuple[str, str], dict[float, float]] = {}  # (model, histogram) -> upper bound -> count
    kv_usage: dict[str, list[float]] = {}  # one fraction per replica
    costs: dict[tuple[str, str], list[tuple[str, float]]] = {}  # (model, "prompt_full"...) -> (replica, USD per 1M)
    tokens: dict[tuple[str, str, str], float] = {}  # (model, replica, "prompt" or "completion") -> tokens priced
    routing: dict[str, float] = {}
    for family in families:
        for sample in family.samples:
            name, labels = sample.name.removeprefix(_PREFIX), sample.labels
            if name == "routing_decisions_total":
                routing[labels["reason"]] = routing.get(labels["reason"], 0.0) + sample.value
            # Embedding models' series carry model_name too, but they have no generative charts to be a line in.
            if name == sample.name or "model_name" not in labels or name.startswith("embedding_"):
                continue
            model = models.setdefault(labels["model_name"], _empty())
            # Samples of one model under other labels (finished_reason, replica) add up.
            replica = labels.get("replica", "")
            if name in _VALUES:
                model[_VALUES[name]] += sample.value
                if name in _TOKENS:
                    key = (labels["model_name"], replica, _TOKENS[name])
                    tokens[key] = tokens.get(key, 0.0) + sample.value
            elif name == "kv_cache_usage_perc":
                kv_usage.setdefault(labels["model_name"], []).append(sample.value)
            elif name.endswith("_bucket") and name.removesuffix("_bucket") in _HISTOGRAMS:
                counts = buckets.setdefault((labels["model_name"], _HISTOGRAMS[name.removesuffix("_bucket")]), {})
                bound = float(labels["le"])
                counts[bound] = counts.get(bound, 0.0) + sample.value
            elif name in _COSTS:
                costs.setdefault((labels["model_name"], f"{_COSTS[name]}_{labels['utilization']}"), []).append(
                    (replica, sample.value))
            elif name == "routed_requests_total" and sample.value:
                reason = f"{labels['policy']}: {labels['reason']}"
                model["routed"][reason] = model["routed"].get(reason, 0.0) + sample.value
    for (model_name, key), counts in buckets.items():
        cumulative = sorted(counts.items())
        models[model_name][key] = {f"p{round(q * 100)}": quantile(q, cumulative) for q in QUANTILES}
        models[model_name][key]["count"] = cumulative[-1][1]
    for model_name, fractions in kv_usage.items():
        models[model_name]["kv_cache_usage"] = sum(fractions) / len(fractions)
    for (model_name, key), values in costs.items():
        # Replicas' figures weighed by the tokens each priced: their costs together over their tokens together.
        # Before any token is priced the figure is unknown: None, since JSON has no NaN.
        weighed = [(usd, tokens.get((model_name, replica, key.split("_")[0]), 0.0)) for replica, usd in values
                   if math.isfinite(usd)]
        priced = sum(n for _, n in weighed)
        models[model_name]["cost_per_1m_tokens_usd"][key] = sum(u * n for u, n in weighed) / priced if priced else None
    return {"time": time.time(), "models": models, "routing": routing}


def _empty() -> dict:
    model: dict = {key: 0.0 for key in _VALUES.values()} | {"kv_cache_usage": 0.0}
    no_latency = {**{f"p{round(q * 100)}": None for q in QUANTILES}, "count": 0.0}
    model.update(ttft=dict(no_latency), tpot=dict(no_latency), cost_per_1m_tokens_usd={}, routed={})
    return model


def quantile(q: float, cumulative: list[tuple[float, float]]) -> float | None:
    """The q-quantile of a histogram's sorted (upper bound, cumulative count) buckets, as Prometheus estimates it.

    Linear within the bucket that holds it; the highest finite bound when it falls in the +Inf bucket; None
    without observations.
    """
    total = cumulative[-1][1] if cumulative else 0.0
    if not total:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in cumulative:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def dashboard_router(api_key: str | None) -> APIRouter:
    """/dashboard, its script and /dashboard/data; only the data needs the API key, when one is set.

    NOTE: the page and script hold no data, and a browser cannot send a bearer header when it opens a URL, so
    they stay open; the page sends the key from the URL fragment (/dashboard#key=...), which never reaches the
    server's or a proxy's log.
    """
    router = APIRouter(prefix="/dashboard")
    router.add_api_route("", get_page, methods=["GET"], response_model=None)
    router.add_api_route("/dashboard.js", get_script, methods=["GET"], response_model=None)
    router.add_api_route("/data", get_data, methods=["GET"], response_model=None,
                         dependencies=[Depends(require_api_key(api_key))])
    return router


async def get_page() -> Response:
    """The dashboard page."""
    return HTMLResponse((_STATIC / "dashboard.html").read_text())


async def get_script() -> Response:
    """The page's chart and polling code (no CDN: it ships in the package)."""
    return Response((_STATIC / "dashboard.js").read_text(), media_type="text/javascript")


async def get_data(request: Request) -> Response:
    """The snapshot of every served model's series, for the page to poll."""
    state = state_of(request)
    data = snapshot(state.metrics.registry.collect())
    data["served"] = list(state.models)  # in --model order, so charts list models as the server does
    return JSONResponse(data)
