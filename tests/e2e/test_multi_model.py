"""Two models in one server: each answers by its name, both at once; unknown names get 404; metrics per model."""

import asyncio
import json
import re
import signal
import time

import httpx
import pytest
from openai import AsyncOpenAI, NotFoundError, OpenAI

NAMES = ["small", "other"]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def pair(start_server, smollm2_path):
    """SmolLM2 twice: by catalog name as `small` (the first, so the default), by file path as `other`."""
    return start_server("--model", "small=smollm2-135m", "--model", f"other={smollm2_path}")


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_models_lists_both_in_flag_order_then_auto(pair):
    client = OpenAI(base_url=f"{pair.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [*NAMES, "auto"]
    assert client.models.retrieve("other").id == "other"


def test_both_models_answer_concurrently_whole_and_streamed(pair):
    client = AsyncOpenAI(base_url=f"{pair.url}/v1", api_key="unused", max_retries=0)
    args = dict(max_tokens=8, temperature=0)

    async def chat(model: str, stream: bool) -> tuple[set[str], str]:
        if stream:
            chunks = [c async for c in await client.chat.completions.create(
                model=model, messages=QUESTION, stream=True, **args)]
            return {c.model for c in chunks}, "".join(c.choices[0].delta.content or "" for c in chunks)
        result = await client.chat.completions.create(model=model, messages=QUESTION, **args)
        return {result.model}, result.choices[0].message.content

    async def complete(model: str, stream: bool) -> tuple[set[str], str]:
        if stream:
            chunks = [c async for c in await client.completions.create(model=model, prompt=PROMPT, stream=True,
                                                                        **args)]
            return {c.model for c in chunks}, "".join(c.choices[0].text for c in chunks)
        result = await client.completions.create(model=model, prompt=PROMPT, **args)
        return {result.model}, result.choices[0].text

    calls = [(kind, model, stream) for kind in (chat, complete) for model in NAMES for stream in (False, True)]

    async def run() -> list[tuple[set[str], str]]:
        return await asyncio.gather(*(kind(model, stream) for kind, model, stream in calls))

    answers = asyncio.run(run())
    for (kind, model, stream), (served_by, _) in zip(calls, answers):
        assert served_by == {model}, (kind.__name__, model, stream)
    # The same weights, greedy: both models give the same text, whole or streamed.
    chats, completions = [text for _, text in answers[:4]], [text for _, text in answers[4:]]
    assert len(set(chats)) == 1 and "Paris" in chats[0]
    assert len(set(completions)) == 1 and completions[0].startswith(" Paris")


def test_request_without_model_goes_to_the_first(pair):
    response = httpx.post(f"{pair.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 1})
    assert response.status_code == 200 and response.json()["model"] == "small"


def test_unknown_model_is_404_naming_the_served_models(pair):
    client = OpenAI(base_url=f"{pair.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(NotFoundError) as caught:
        client.chat.completions.create(model="gpt-9", messages=QUESTION, max_tokens=1)
    assert caught.value.code == "model_not_found" and caught.value.param == "model"
    assert "'gpt-9'" in caught.value.message and "'small', 'other'" in caught.value.message
    with pytest.raises(NotFoundError):
        client.models.retrieve("gpt-9")


def test_metrics_count_each_models_requests_under_its_own_label(pair):
    def finished(name: str) -> float:
        return pair.metric("tokenmill:request_finished_total", model_name=name, finished_reason="length")

    before = {name: finished(name) for name in NAMES}
    body = {"model": "other", "prompt": PROMPT, "max_tokens": 2, "ignore_eos": True}
    assert httpx.post(f"{pair.url}/v1/completions", json=body).status_code == 200
    _wait_for(lambda: finished("other") == before["other"] + 1)
    assert finished("small") == before["small"]
    for name in NAMES:
        for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
            assert pair.metric(f"tokenmill:{gauge}", model_name=name) == 0


def test_startup_log_states_the_kv_split_and_each_model(pair):
    log = pair.log.read_text()
    assert "KV cache: 1 GiB in all (--kv-cache-memory, default 1 on CPU), split evenly: 0.5 GiB for each of 2 models" \
        in log
    tokens = {name: int(n) for name, n in re.findall(r"serving (\w+) = [^ ]+ \(KV cache (\d+) tokens", log)}
    assert set(tokens) == set(NAMES) and tokens["small"] == tokens["other"]


def test_sigterm_lets_both_models_finish_in_flight_streams_then_exits_zero(start_server):
    server = start_server("--model", "a=smollm2-135m", "--model", "b=smollm2-135m", "--shutdown-timeout", "60")
    body = {"prompt": "Tell me a long story.", "max_tokens": 20, "ignore_eos": True, "temperature": 0, "stream": True}
    with (httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "model": "a"}, timeout=120) as first,
          httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "model": "b"}, timeout=120) as second):
        streams = [response.iter_lines() for response in (first, second)]
        for lines in streams:
            next(line for line in lines if line.startswith("data:"))  # both are generating
        server.process.send_signal(signal.SIGTERM)
        rests = [[line for line in lines if line.startswith("data:")] for lines in streams]
    for rest in rests:
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][5:])["choices"][0]["finish_reason"] == "length"
    assert server.process.wait(60) == 0
