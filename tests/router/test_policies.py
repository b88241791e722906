"""The routing policies and the `auto` choice, without loading a model."""

import asyncio
from types import SimpleNamespace

import pytest

from tokenmill import cli
from tokenmill.config import ServerConfig
from tokenmill.errors import InvalidRequestError
from tokenmill.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprob
from tokenmill.router import AUTO, cheapest, escalate_to, mean_logprob
from tokenmill.router import serving
from tokenmill.router.serving import ROUTE_REASON_HEADER, ROUTED_MODEL_HEADER, route
from tokenmill.sampling import SamplingParams
from tokenmill.server.errors import APIError
from tokenmill.server.metrics import Metrics
from tokenmill.server.serving import ServedModel, ServerState


def _output(*logprobs: float, seconds: float = 0.0) -> RequestOutput:
    sample = CompletionOutput(0, "", list(range(len(logprobs))), "stop",
                              logprobs=[TokenLogprob(i, lp) for i, lp in enumerate(logprobs)])
    return RequestOutput("r", None, [1], [sample], True, 0, RequestMetrics(0.0, decode_seconds=seconds,
                                                                            price_per_hour=3600.0))


def test_cheapest_picks_the_first_model_whose_context_fits():
    # Prompt of 90 tokens plus 20 new ones: too long for a 100-token context, fits 200 and 400.
    chosen = cheapest([90, 90, 90], 20, [100, 200, 400])
    assert chosen is not None and chosen.index == 1 and chosen.reason == "cheapest fits"
    assert cheapest([10, 10], 20, [100, 400]).index == 0


def test_cheapest_counts_a_missing_max_tokens_as_one_token_as_the_engine_does():
    assert cheapest([99, 99], None, [100, 400]).index == 0
    assert cheapest([100, 100], None, [100, 400]).index == 1


def test_cheapest_finds_nothing_when_no_context_fits():
    assert cheapest([500, 500], 16, [100, 400]) is None


def test_mean_logprob_averages_every_token_of_every_sample():
    assert mean_logprob([_output(-1.0, -3.0), _output(-2.0)]) == pytest.approx(-2.0)
    assert mean_logprob([_output()]) == 0.0


def test_cascade_escalates_to_the_next_fitting_model_below_the_threshold():
    chosen = escalate_to(-2.5, -1.0, 0, [0, 2])
    assert chosen.index == 2 and chosen.kind == "escalated" and chosen.reason.startswith("cascade: escalated")


def test_cascade_keeps_the_answer_at_or_above_the_threshold():
    for confidence in (-1.0, -0.42):
        chosen = escalate_to(confidence, -1.0, 0, [0, 1])
        assert chosen.index == 0 and chosen.kind == "confident"
    assert escalate_to(-0.42, -1.0, 0, [0, 1]).reason == "cascade: confidence -0.42 >= -1"


def test_cascade_keeps_an_unsure_answer_when_no_stronger_model_fits():
    chosen = escalate_to(-5.0, -1.0, 1, [0, 1])
    assert chosen.index == 1 and chosen.kind == "no_stronger"


def _state(router: str = "cheapest", **contexts: int) -> ServerState:
    # Each fake tokenizer says how many tokens the prompt is in its model's vocabulary.
    models = {name: ServedModel(name, None, SimpleNamespace(tokens=n // 2), n) for name, n in contexts.items()}
    return ServerState(models, ServerConfig(router=router), Metrics(next(iter(models))))


def _route(state: ServerState, model: str | None, max_tokens: int, stream: bool = False):
    encode = lambda model: [[0] * model.tokenizer.tokens]  # noqa: E731
    return asyncio.run(route(state, model, encode, SamplingParams(max_tokens=max_tokens), stream))


def test_auto_under_cheapest_picks_the_first_model_that_fits_in_its_own_tokens():
    state = _state(cheap=100, strong=400)  # the prompt is 50 tokens for `cheap`, 200 for `strong`
    routed = _route(state, AUTO, 40)
    assert routed.model.name == "cheap" and routed.prompts == [[0] * 50]
    assert routed.headers() == {ROUTED_MODEL_HEADER: "cheap", ROUTE_REASON_HEADER: "cheapest fits"}
    assert _route(state, AUTO, 60).model.name == "strong"


class _Engine:
    """An engine stand-in that takes every request, or has more waiting than --max-waiting allows."""

    is_running, stalled = True, None
    stats = SimpleNamespace(num_waiting_tokens=0)

    def __init__(self, waiting: int) -> None:
        self.num_waiting = waiting

    async def add_requests(self, requests, params, arrival_time):
        return []


@pytest.mark.parametrize("contexts", [{"strong": 400}, {"cheap": 100, "strong": 400}])
def test_auto_counts_the_request_by_policy_model_and_reason_once_the_model_takes_it(contexts):
    state = _state(**contexts)
    reason = "only_model" if len(contexts) == 1 else "fits"
    counted = f'tokenmill:routed_requests_total{{model_name="strong",policy="cheapest",reason="{reason}"}}'.encode()
    state.models["strong"].engine = _Engine(waiting=10**6)
    with pytest.raises(APIError) as refused:
        asyncio.run(_route(state, AUTO, 60).start(state, "cmpl-1", 0.0))
    assert refused.value.status == 429 and counted not in state.metrics.render()  # answered by no model
    state.models["strong"].engine = _Engine(waiting=0)
    asyncio.run(_route(state, AUTO, 60).start(state, "cmpl-2", 0.0))
    assert counted + b" 1.0" in state.metrics.render()


def test_auto_that_fits_no_model_is_a_400():
    from tokenmill.errors import PromptTooLongError
    from tokenmill.server.errors import from_exception

    with pytest.raises(PromptTooLongError) as caught:
        _route(_state(cheap=100, strong=400), AUTO, 300)
    error = from_exception(caught.value)
    assert error.status == 400 and error.body["error"]["code"] == "context_length_exceeded"
    # Its figures, which Anthropic's API words its own way for Claude Code to read (it was a plain APIError).
    assert (caught.value.max_tokens, caught.value.context) == (300, 400)


def test_a_max_tokens_that_is_only_a_cap_asks_no_model_for_room():
    # Ollama's num_predict and llama.cpp's n_predict: the context's end may cut them short, so any model whose
    # context holds the prompt takes it (they were refused as fitting no model).
    import dataclasses

    state = _state(cheap=100, strong=400)
    params = dataclasses.replace(SamplingParams(max_tokens=300), fit_context=True)
    routed = asyncio.run(route(state, AUTO, lambda model: [[1] * 50], params, False))
    assert routed.model.name == "cheap"


def test_a_named_model_is_not_routed():
    routed = _route(_state(cheap=100, strong=400), "strong", 10)
    assert routed.model.name == "strong" and routed.headers() == {}


def test_auto_with_one_model_goes_to_it():
    routed = _route(_state(only=100), AUTO, 10)
    assert routed.model.name == "only" and routed.headers()[ROUTE_REASON_HEADER] == "only model"


def test_a_model_served_as_auto_answers_to_its_name():
    assert _route(_state(cheap=100, auto=400), AUTO, 10).model.name == "auto"


def test_cascade_asks_for_logprobs_the_client_did_not_and_keeps_the_clients_params():
    routed = _route(_state("cascade", cheap=100, strong=400), AUTO, 10)
    assert routed.model.name == "cheap" and routed.params.logprobs == 0 and routed.asked.logprobs is None
    assert routed.fitting == [0, 1]


def test_streamed_auto_under_cascade_is_a_400_naming_stream():
    with pytest.raises(APIError) as caught:
        _route(_state("cascade", cheap=100, strong=400), AUTO, 10, stream=True)
    assert caught.value.status == 400 and caught.value.body["error"]["param"] == "stream"
    assert "non-streamed" in caught.value.body["error"]["message"]


def test_serve_takes_the_router_and_cascade_threshold_flags():
    args = cli._parser().parse_args(["serve", "--router", "cascade", "--cascade-threshold", "-0.5"])
    assert (args.router, args.cascade_threshold) == ("cascade", -0.5)
    assert cli._parser().parse_args(["serve"]).router == "cheapest"
    with pytest.raises(InvalidRequestError, match="router"):
        ServerConfig(router="fastest")


def _finish(monkeypatch, threshold: float, runs: list[RequestOutput]):
    """A cascade over fake engines whose runs answer `runs` in turn; returns the Routed and finish()'s result."""
    state = _state("cascade", cheap=100, strong=400)
    state.config.cascade_threshold = threshold
    answers = iter(runs)
    submitted: list[str] = []

    async def submit(state, model, prompts, params, response_id):
        submitted.append(model.name)
        return []

    async def collect(request, streams):
        return [next(answers)]

    monkeypatch.setattr(serving, "submit", submit)
    monkeypatch.setattr(serving, "collect", collect)
    routed = _route(state, AUTO, 10)
    return routed, asyncio.run(routed.finish(state, None, [], "id")), submitted


def test_cascade_below_the_threshold_answers_from_the_strong_model_and_bills_both_runs(monkeypatch):
    routed, (outputs, block), submitted = _finish(monkeypatch, -1.0, [_output(-3.0, seconds=2.0),
                                                                      _output(-0.1, seconds=5.0)])
    assert routed.model.name == "strong" and submitted == ["strong"] and routed.params.logprobs is None
    assert outputs[0].outputs[0].logprobs[0].logprob == -0.1
    assert block["cost_details"]["compute_seconds"] == 7.0 and block["cost"] == pytest.approx(7.0)
    assert routed.headers()[ROUTE_REASON_HEADER] == "cascade: escalated, confidence -3 < -1"


def test_cascade_at_the_threshold_keeps_the_cheap_answer_without_the_routers_logprobs(monkeypatch):
    routed, (outputs, block), submitted = _finish(monkeypatch, -1.0, [_output(-1.0, seconds=2.0)])
    assert routed.model.name == "cheap" and submitted == []
    assert outputs[0].outputs[0].logprobs is None  # the client did not ask for them
    assert block["cost_details"]["compute_seconds"] == 2.0
