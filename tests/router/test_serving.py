"""`auto` in the server: which model a request is routed to, on stand-in models (no engines run)."""

import asyncio
from types import SimpleNamespace

import pytest

from tokenmill.config import ServerConfig
from tokenmill.engine.async_engine import EngineStepError
from tokenmill.errors import InvalidRequestError
from tokenmill.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprob
from tokenmill.router import serving
from tokenmill.router.serving import route
from tokenmill.sampling import SamplingParams
from tokenmill.server.errors import APIError
from tokenmill.server.metrics import Metrics
from tokenmill.server.serving import ServedModel, ServerState, submit


def _state(*chat_models: bool, router: str = "cheapest", fingerprints: tuple[str, ...] | None = None) -> ServerState:
    """Models "m0", "m1", ... in that order, each with a chat template or without one (one tokenizer unless said)."""
    fingerprints = fingerprints or ("same",) * len(chat_models)
    models = {f"m{i}": ServedModel(f"m{i}", None, SimpleNamespace(chat_template="..." if chat else None,
                                                                  fingerprint=fingerprint), 2048)
              for i, (chat, fingerprint) in enumerate(zip(chat_models, fingerprints))}
    return ServerState(models, ServerConfig(router=router), Metrics("m0"))


def _chat(model) -> list[list[int]]:
    """Renders as Tokenizer.encode_chat does: a model without a chat template refuses."""
    if model.tokenizer.chat_template is None:
        raise InvalidRequestError("this model has no chat template; use a plain completion prompt instead")
    return [[1, 2, 3]]


@pytest.mark.parametrize("router", ["cheapest", "cascade"])
def test_a_chat_skips_a_model_without_a_chat_template(router):
    routed = asyncio.run(route(_state(False, True, router=router), "auto", _chat, SamplingParams(max_tokens=4), False))
    assert routed.model.name == "m1" and routed.prompts == [[1, 2, 3]]
    assert routed.fitting in (None, [1])  # the cascade never escalates to a model that cannot take the chat


def test_a_chat_no_model_can_take_gets_that_models_error():
    with pytest.raises(InvalidRequestError, match="no chat template"):
        asyncio.run(route(_state(False, False), "auto", _chat, SamplingParams(max_tokens=4), False))


def test_a_cascade_whose_stronger_model_refuses_keeps_the_answer_in_hand(monkeypatch):
    state = _state(True, True, router="cascade")
    unsure = RequestOutput("r", None, [1, 2, 3], [CompletionOutput(0, "Paris", [7], "length", None,
                                                                   [TokenLogprob(7, -9.0)])],
                           True, 0, RequestMetrics(0.0, price_per_hour=3.6, decode_seconds=1.0))

    async def collect(request, streams):
        return [unsure]

    async def busy(*args):
        raise APIError(429, "4 requests are already waiting", type="rate_limit_error")

    monkeypatch.setattr(serving, "collect", collect)
    monkeypatch.setattr(serving, "submit", busy)

    async def run():
        routed = await route(state, "auto", _chat, SamplingParams(max_tokens=4), False)
        return routed, await routed.finish(state, None, [], "cmpl-1")

    routed, (outputs, block) = asyncio.run(run())
    assert outputs == [unsure] and routed.model.name == "m0" and routed.route.kind == "escalation_refused"
    assert "4 requests are already waiting" in routed.route.reason
    assert outputs[0].outputs[0].logprobs is None  # the router's, not asked for by the client
    assert block["completion_tokens"] == 1 and block["cost"] == pytest.approx(0.001)


def test_token_ids_under_auto_need_models_that_share_a_tokenizer():
    def ids(model):
        return [[5, 6, 7]]

    routed = asyncio.run(route(_state(True, True), "auto", ids, SamplingParams(max_tokens=4), False, token_ids=True))
    assert routed.model.name == "m0"
    differ = _state(True, True, fingerprints=("smollm2", "gemma3"))
    with pytest.raises(InvalidRequestError, match="tokenizers differ"):
        asyncio.run(route(differ, "auto", ids, SamplingParams(max_tokens=4), False, token_ids=True))
    assert asyncio.run(route(differ, "auto", _chat, SamplingParams(max_tokens=4), False)).model.name == "m0"  # text
    with pytest.raises(InvalidRequestError, match="stop_token_ids token ids mean different tokens"):
        asyncio.run(route(differ, "auto", _chat, SamplingParams(max_tokens=4, stop_token_ids=[2]), False))
    # A bias keyed by one tokenizer's ids banned or forced another token on the other model, silently.
    with pytest.raises(InvalidRequestError, match="logit_bias token ids mean different tokens"):
        asyncio.run(route(differ, "auto", _chat, SamplingParams(max_tokens=4, logit_bias={2: -100.0}), False))


class _Engine:
    """Enough of AsyncEngine for submit(): records each add's arrival time."""

    is_running, stalled, num_waiting = True, None, 0
    stats = SimpleNamespace(num_waiting_tokens=0)

    def __init__(self, arrivals: list[tuple[float, SamplingParams]]) -> None:
        self.arrivals = arrivals

    async def add_requests(self, requests, params, arrival_time):
        self.arrivals.append((arrival_time, params))
        return [object() for _ in requests]


def _unsure_then(monkeypatch, escalated, delay: float = 0.0) -> tuple[ServerState, list[tuple[float, SamplingParams]]]:
    """A cascade of two engines whose first answer, `delay` seconds after the client asked, is unsure; collecting the
    escalation awaits `escalated`."""
    arrivals: list[float] = []
    state = _state(True, True, router="cascade")
    for model in state.models.values():
        model.engine = _Engine(arrivals)
    calls = []

    async def collect(request, streams):
        calls.append(request)
        if len(calls) > 1:
            return await escalated()
        await asyncio.sleep(delay)
        return [_answer(-9.0, arrivals[0][0])]

    monkeypatch.setattr(serving, "collect", collect)
    return state, arrivals


def _answer(logprob: float, arrival: float = 0.0) -> RequestOutput:
    return RequestOutput("r", None, [1, 2, 3], [CompletionOutput(0, "Paris", [7], "stop", None,
                                                                 [TokenLogprob(7, logprob)])],
                         True, 0, RequestMetrics(arrival, price_per_hour=3.6, decode_seconds=1.0))


def _cascade(state: ServerState, params: SamplingParams):
    async def run():
        routed = await route(state, "auto", _chat, params, False)
        streams = await submit(state, routed.model, routed.prompts, routed.params, "r")
        return routed, await routed.finish(state, None, streams, "r")

    return asyncio.run(run())


def test_an_escalation_is_due_when_the_clients_request_was(monkeypatch):
    async def sure():
        return [_answer(-0.1)]

    state, arrivals = _unsure_then(monkeypatch, sure, delay=0.2)
    routed, _ = _cascade(state, SamplingParams(max_tokens=4, deadline_ms=300))
    # The stronger engine times its own run (its queue time, TTFT) from its own arrival, with what is left.
    (first, _), (second, escalated) = arrivals
    assert routed.model.name == "m1" and second - first >= 0.2 and 0 < escalated.deadline_ms <= 100
    state, arrivals = _unsure_then(monkeypatch, sure, delay=0.35)
    routed, (outputs, _) = _cascade(state, SamplingParams(max_tokens=4, deadline_ms=300))
    assert routed.model.name == "m0" and routed.route.kind == "escalation_refused" and len(arrivals) == 1
    assert "deadline passed" in routed.route.reason and outputs[0].outputs[0].text == "Paris"


@pytest.mark.parametrize("error", [APIError(429, "dropped: its deadline became infeasible while it waited",
                                            type="rate_limit_error", code="deadline_infeasible"),
                                   EngineStepError("engine step failed")])
def test_an_escalation_that_fails_once_accepted_keeps_the_answer_in_hand(monkeypatch, error):
    async def failing():
        raise error

    state, _ = _unsure_then(monkeypatch, failing)
    routed, (outputs, block) = _cascade(state, SamplingParams(max_tokens=4))
    assert routed.model.name == "m0" and routed.route.kind == "escalation_refused"
    assert outputs[0].outputs[0].text == "Paris" and str(error) in routed.route.reason


def test_an_escalation_whose_client_left_answers_nobody(monkeypatch):
    async def gone():
        raise APIError(499, "client closed the request", code="client_closed_request")

    state, _ = _unsure_then(monkeypatch, gone)
    with pytest.raises(APIError, match="client closed"):
        _cascade(state, SamplingParams(max_tokens=4))


def test_routing_headers_hold_any_models_name_as_a_valid_header_value():
    from starlette.datastructures import MutableHeaders

    state = _state(True, True)
    state.models["m0"].name = "模型\n"  # served names are --model NAME=...'s, any text
    routed = asyncio.run(route(state, "auto", _chat, SamplingParams(max_tokens=4), False))
    headers = routed.headers()
    MutableHeaders().update(headers)  # as the response sets them: a name outside Latin-1 raised, after queueing
    assert headers[serving.ROUTED_MODEL_HEADER] == "\\u6a21\\u578b "
