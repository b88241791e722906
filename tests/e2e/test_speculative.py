"""Speculative decoding through the server: predicted outputs with OpenAI's counts, and vLLM's metrics."""

import json

import pytest
from openai import BadRequestError, OpenAI

MODEL = "smollm2-135m"
TEXT = ("The river Thames flows through London, past the Houses of Parliament and under Tower Bridge, before it "
        "widens into an estuary and meets the North Sea.")
ASK = [{"role": "user", "content": f"Repeat this text exactly:\n\n{TEXT}"}]


@pytest.fixture(scope="module")
def spec_server(start_server):
    # Not adaptive: whether drafts pay is fitted from this machine's step times, and these tests need drafts.
    config = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 5,
              "adaptive": False}
    return start_server("--speculative-config", json.dumps(config))


@pytest.fixture(scope="module")
def client(spec_server) -> OpenAI:
    return OpenAI(base_url=f"{spec_server.url}/v1", api_key="unused", max_retries=0)


def _chat(client: OpenAI, **extra):
    return client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=40, **extra)


def test_a_prediction_is_counted_as_openai_counts_it_and_changes_nothing(client):
    plain = _chat(client)
    predicted = _chat(client, prediction={"type": "content", "content": TEXT})
    assert predicted.choices[0].message.content == plain.choices[0].message.content
    details = predicted.usage.completion_tokens_details
    # The answer repeats the prediction: nearly all of it is found in the answer.
    assert details.accepted_prediction_tokens >= 25 and details.rejected_prediction_tokens <= 2
    wrong = _chat(client, prediction={"type": "content", "content": [{"type": "text", "text": "Bananas are " * 8}]})
    assert wrong.choices[0].message.content == plain.choices[0].message.content
    assert wrong.usage.completion_tokens_details.rejected_prediction_tokens > \
        wrong.usage.completion_tokens_details.accepted_prediction_tokens


def test_a_streamed_prediction_reports_its_counts_in_the_usage_chunk(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=ASK, temperature=0, max_tokens=40, stream=True,
        stream_options={"include_usage": True}, prediction={"type": "content", "content": TEXT},
    )
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens_details.accepted_prediction_tokens >= 20
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == _chat(client).choices[0].message.content


def test_a_malformed_prediction_is_a_400(client):
    with pytest.raises(BadRequestError) as error:
        _chat(client, prediction={"type": "file", "content": TEXT})
    assert error.value.status_code == 400 and "prediction" in str(error.value)


def test_ngram_drafts_show_in_vllms_metrics(client, spec_server):
    before = spec_server.metric("tokenmill:spec_decode_num_accepted_tokens_total")
    client.completions.create(model=MODEL, prompt=f"{TEXT}\n\nThe same text again:\n\n{TEXT[:60]}", temperature=0,
                              max_tokens=32)
    accepted = spec_server.metric("tokenmill:spec_decode_num_accepted_tokens_total") - before
    drafted = spec_server.metric("tokenmill:spec_decode_num_draft_tokens_total")
    assert 0 < accepted <= drafted and spec_server.metric("tokenmill:spec_decode_num_drafts_total") > 0
    assert spec_server.metric("tokenmill:spec_decode_num_accepted_tokens_per_pos_total", position="0") > 0
