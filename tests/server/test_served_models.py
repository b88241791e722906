"""Several models in one server, without loading one: --model specs, KV budget shares, routing, health, metrics."""

import asyncio
import json
import threading
import time
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tokenmill import cli
from tokenmill.config import EngineConfig, ServerConfig
from tokenmill.errors import InvalidRequestError
from tokenmill.outputs import CompletionOutput, RequestMetrics, RequestOutput
from tokenmill.server import served_models
from tokenmill.server.app import health
from tokenmill.server.errors import APIError
from tokenmill.server.metrics import Metrics
from tokenmill.server.served_models import ModelSpec, kv_shares, load_engines
from tokenmill.server.serving import ServedModel, ServerState


def test_serve_collects_every_model_flag_while_other_commands_keep_one():
    args = cli._parser().parse_args(["serve", "--model", "small=smollm2-135m", "--model", "/m/other.gguf"])
    assert args.models == ["small=smollm2-135m", "/m/other.gguf"]
    assert args.model == "small=smollm2-135m"
    default = cli._parser().parse_args(["serve"])
    assert default.models == [] and default.model == EngineConfig.model
    assert cli._parser().parse_args(["generate", "--model", "a", "--model", "b", "hi"]).model == "b"


def test_model_spec_is_model_or_name_equals_model():
    assert ModelSpec.parse("smollm2-135m") == ModelSpec("smollm2-135m")
    assert ModelSpec.parse("small=/models/a.gguf") == ModelSpec("/models/a.gguf", "small")
    for bad in ("=a.gguf", "small="):
        with pytest.raises(InvalidRequestError, match="NAME=MODEL"):
            ModelSpec.parse(bad)


def test_a_path_whose_name_holds_an_equals_sign_is_a_model(tmp_path):
    path = tmp_path / "a=b.gguf"  # was name ".../a", model "b.gguf": "no such file or directory: b.gguf"
    path.touch()
    assert ModelSpec.parse(str(path)) == ModelSpec(str(path))
    assert ModelSpec.parse(f"x={path}") == ModelSpec(str(path), "x")


def test_a_name_given_twice_is_refused_before_any_model_loads():
    # Both engines were built (the second model pulled) before the refusal.
    with pytest.raises(InvalidRequestError, match="'a'.*NAME=MODEL"):
        served_models.split_specs([ModelSpec("/models/x.gguf", "a"), ModelSpec("/models/y.gguf", "a")])


def test_an_embedding_model_may_not_take_the_routers_name(monkeypatch):
    # /v1/models listed `auto` twice, and chats to `auto` met the embedding model's 400.
    monkeypatch.setattr(served_models.EmbeddingModel, "load", lambda model, dtype: SimpleNamespace(name="m"))
    with pytest.raises(InvalidRequestError, match="router's choice"):
        served_models.load_embedding_models([ModelSpec("all-minilm-l6-v2", "auto")], "auto", {"small", "big"})


def test_kv_cache_memory_is_the_total_split_evenly():
    assert [c.kv_cache_memory for c in kv_shares(EngineConfig(kv_cache_memory=3.0), 3)] == [1.0, 1.0, 1.0]
    assert [c.kv_cache_memory for c in kv_shares(EngineConfig(), 2)] == [0.5, 0.5]  # 1 GiB on CPU, unset


def test_one_model_keeps_the_whole_budget():
    assert kv_shares(EngineConfig(kv_cache_memory=2.0), 1)[0].kv_cache_memory == 2.0
    assert kv_shares(EngineConfig(device="cuda"), 1)[0].kv_cache_fraction == EngineConfig.kv_cache_fraction


@pytest.mark.parametrize("n", [2, 3])
def test_gpu_models_loaded_in_turn_each_take_an_even_share_of_the_memory_free_at_start(n):
    free, taken = 100.0, []
    for config in kv_shares(EngineConfig(device="cuda", kv_cache_fraction=0.9), n):
        assert config.kv_cache_memory is None
        taken.append(free * config.kv_cache_fraction)  # what engine/kv_cache.py sizes from the free memory
        free -= taken[-1]
    assert taken == pytest.approx([90.0 / n] * n)


def test_a_name_served_twice_is_refused(monkeypatch):
    monkeypatch.setattr(served_models, "TurnTakingEngine", lambda config: SimpleNamespace(source=SimpleNamespace(
        name=config.model.rsplit("/", 1)[-1])))
    engines = load_engines(EngineConfig(), [ModelSpec("/a/m.gguf", "x"), ModelSpec("/a/m.gguf")])
    assert list(engines) == ["x", "m.gguf"]
    with pytest.raises(InvalidRequestError, match="'m.gguf'.*NAME=MODEL"):
        load_engines(EngineConfig(), [ModelSpec("/a/m.gguf"), ModelSpec("/b/m.gguf")])


def test_steps_of_two_busy_engines_alternate():
    turns, order, ready = served_models._Turns(), [], threading.Barrier(2)

    def engine(name: str) -> None:
        ready.wait()
        for _ in range(50):
            with turns:
                order.append(name)
                time.sleep(0.002)  # a step; the other engine asks for its turn meanwhile

    threads = [threading.Thread(target=engine, args=(name,)) for name in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    switches = sum(x != y for x, y in zip(order, order[1:]))
    assert switches >= 90  # a plain lock lets the engine that just stepped take the next turn too


def _state(**running: bool) -> ServerState:
    models = {name: ServedModel(name, SimpleNamespace(is_running=up, stalled=None, failing=None), None, 2048)
              for name, up in running.items()}
    return ServerState(models, ServerConfig(), Metrics(next(iter(running))))


def test_request_naming_no_model_goes_to_the_first():
    state = _state(small=True, other=True)
    assert state.model(None).name == "small"
    assert state.model("other").name == "other"


def test_unknown_model_is_404_naming_every_served_model():
    with pytest.raises(APIError) as caught:
        _state(small=True, other=True).model("gpt-9")
    assert caught.value.status == 404
    error = caught.value.body["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "'gpt-9'" in error["message"] and "'small', 'other'" in error["message"]


def test_a_request_samples_with_its_models_recommended_settings_where_it_leaves_them_unset():
    from tokenmill.server.protocol import ChatCompletionRequest

    state = _state(qwen=True, smol=True)
    state.models["qwen"].sampling_defaults = {"temperature": 0.6, "top_k": 20, "top_p": 0.95}
    state.models["smol"].sampling_defaults = {"temperature": 0.6, "top_k": 40}
    chat = ChatCompletionRequest(model="qwen", messages=[{"role": "user", "content": "hi"}], top_p=0.5)
    params = chat.sampling_params(state.sampling_defaults(chat.model))
    assert (params.temperature, params.top_k, params.top_p) == (0.6, 20, 0.5)  # the request's own value wins
    assert state.sampling_defaults(None) == state.models["qwen"].sampling_defaults  # the first model's
    # auto may route to either: only what both recommend; a name not served has none (routing answers 404).
    assert state.sampling_defaults("auto") == {"temperature": 0.6}
    assert state.sampling_defaults("gpt-9") == {}
    plain = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}]).sampling_params()
    assert (plain.temperature, plain.top_k, plain.top_p) == (1.0, -1, 1.0)


def _health(state: ServerState):
    request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(tokenmill=state)))
    return asyncio.run(health(request))


def test_health_is_503_naming_any_engine_that_stopped():
    assert _health(_state(small=True, other=True)).status_code == 200
    response = _health(_state(small=True, other=False))
    assert response.status_code == 503
    assert "'other'" in json.loads(response.body)["error"]["message"]
    failing = _state(small=True, other=True)
    failing.models["other"].engine.failing = "its last 3 steps failed"
    response = _health(failing)
    assert response.status_code == 503
    assert "'other' is failing: its last 3 steps failed" in json.loads(response.body)["error"]["message"]


def test_each_models_series_appear_in_one_exposition_under_its_own_label():
    small = Metrics("small")
    other = small.for_model("other")
    done = RequestOutput("r", None, [1, 2], [CompletionOutput(0, "x", [3], "length")], True, 0,
                         RequestMetrics(arrival_time=1.0, first_token_time=1.5, token_times=[1.5], token_samples=[0],
                                        finished_time=2.0))
    other.observe_finished(done)
    finished = {
        (s.labels["model_name"], s.labels["finished_reason"]): s.value
        for family in text_string_to_metric_families(small.render().decode())
        for s in family.samples if s.name == "tokenmill:request_finished_total"
    }
    assert finished[("other", "length")] == 1 and finished[("small", "length")] == 0
    assert small.render() == other.render()
