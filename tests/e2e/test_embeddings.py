"""/v1/embeddings on a real server beside a chat model, through the official openai client."""

import asyncio
import base64

import httpx
import numpy as np
import pytest
from openai import AsyncOpenAI, BadRequestError, NotFoundError, OpenAI

from tokenmill.loader import catalog

MODEL = "all-minilm-l6-v2"
TEXTS = ["The cat sat on the mat.", "A dog chased the ball.", "Quarterly revenue rose 12%."]


@pytest.fixture(scope="module")
def served(start_server):
    """SmolLM2 for chat and all-MiniLM-L6-v2 for embeddings, in one server."""
    catalog.pull(MODEL)  # before the server starts, so its start-up timeout does not include the download
    return start_server("--model", "smollm2-135m", "--model", MODEL)


@pytest.fixture(scope="module")
def client(served) -> OpenAI:
    return OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def offline():
    """The offline Embedder on the same model: what the server must answer."""
    from tokenmill.embeddings.embedder import Embedder

    return Embedder(MODEL)


def _floats(client: OpenAI, **kwargs) -> np.ndarray:
    response = client.embeddings.create(model=MODEL, encoding_format="float", **kwargs)
    assert [d.index for d in response.data] == list(range(len(response.data)))
    return np.array([d.embedding for d in response.data])


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_models_lists_the_chat_and_the_embedding_model(client):
    assert [m.id for m in client.models.list().data] == ["smollm2-135m", MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_strings_equal_offline_embeddings_with_usage(client, offline):
    response = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    got = np.array([d.embedding for d in response.data])
    assert got.shape == (3, 384)
    assert _cosines(got, offline.embed(TEXTS).numpy()).min() >= 0.9999
    tokens = sum(len(ids) for ids in offline.model.tokenize(TEXTS))
    assert response.usage.prompt_tokens == tokens and response.usage.total_tokens == tokens
    assert response.model == MODEL


def test_every_input_form_gives_the_same_embeddings(client, offline):
    ids = offline.model.tokenize(TEXTS)
    one_string = _floats(client, input=TEXTS[0])
    one_ids = _floats(client, input=ids[0])
    many_ids = _floats(client, input=ids)
    many_strings = _floats(client, input=TEXTS)
    assert one_string.shape == one_ids.shape == (1, 384) and many_ids.shape == (3, 384)
    assert _cosines(one_string, one_ids).min() >= 0.99999
    assert _cosines(many_strings, many_ids).min() >= 0.99999
    # Different texts do get different vectors: the forms are not all answering the same thing.
    assert _cosines(many_strings[:1], many_strings[1:2]).max() < 0.9


def test_base64_is_little_endian_float32_of_the_same_vector(client):
    floats = _floats(client, input=TEXTS)
    response = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="base64")
    decoded = np.array([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in response.data])
    assert decoded.shape == (3, 384)
    assert np.allclose(decoded, floats, atol=1e-6)


@pytest.mark.parametrize("embed_dtype", ["float16", "bfloat16"])
def test_base64_carries_the_element_type_vllms_embed_dtype_asks(client, embed_dtype):
    # It was dropped: a client decoding float16 read 768 meaningless numbers.
    floats = _floats(client, input=TEXTS)
    response = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="base64",
                                        extra_body={"embed_dtype": embed_dtype})
    raw = [np.frombuffer(base64.b64decode(d.embedding), dtype="<f2" if embed_dtype == "float16" else "<u2")
           for d in response.data]
    # bfloat16 is a float32's top 16 bits.
    decoded = np.array([r if embed_dtype == "float16" else (r.astype("<u4") << 16).view("<f4") for r in raw])
    assert decoded.shape == (3, 384) and np.allclose(decoded, floats, atol=5e-3)


def test_openai_client_default_encoding_decodes(client):
    # The client asks for base64 unless told otherwise, and decodes it itself.
    response = client.embeddings.create(model=MODEL, input=TEXTS[0])
    assert np.allclose(np.array(response.data[0].embedding), _floats(client, input=TEXTS[0])[0], atol=1e-6)


def test_dimensions_truncates_and_renormalizes(client):
    full = _floats(client, input=TEXTS)
    short = _floats(client, input=TEXTS, dimensions=64)
    assert short.shape == (3, 64)
    assert np.allclose(np.linalg.norm(short, axis=-1), 1, atol=1e-5)
    prefix = full[:, :64] / np.linalg.norm(full[:, :64], axis=-1, keepdims=True)
    assert np.allclose(short, prefix, atol=1e-5)


def test_concurrent_requests_share_forward_passes(served, client):
    before_inputs = served.metric("tokenmill:embedding_batch_size_sum", model_name=MODEL)
    before_batches = served.metric("tokenmill:embedding_batch_size_count", model_name=MODEL)
    async_client = AsyncOpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)

    async def main() -> list:
        return await asyncio.gather(*(async_client.embeddings.create(model=MODEL, input=f"sentence {i}")
                                      for i in range(16)))

    responses = asyncio.run(main())
    assert len(responses) == 16
    inputs = served.metric("tokenmill:embedding_batch_size_sum", model_name=MODEL) - before_inputs
    batches = served.metric("tokenmill:embedding_batch_size_count", model_name=MODEL) - before_batches
    assert inputs == 16 and batches < 16
    assert served.metric("tokenmill:embedding_queue_time_seconds_count", model_name=MODEL) >= 16


def test_input_over_the_limit_is_refused_naming_both_lengths(client):
    with pytest.raises(BadRequestError) as error:
        client.embeddings.create(model=MODEL, input="word " * 300)
    message = error.value.body["message"]
    assert "302 tokens" in message and "limit is 256" in message and "truncate_prompt_tokens" in message
    assert error.value.body["param"] == "input"


def test_truncate_prompt_tokens_cuts_inputs(client):
    response = client.embeddings.create(model=MODEL, input=["word " * 300, "short"],
                                        extra_body={"truncate_prompt_tokens": -1})
    assert response.usage.prompt_tokens == 256 + 3
    response = client.embeddings.create(model=MODEL, input="word " * 300, extra_body={"truncate_prompt_tokens": 10})
    assert response.usage.prompt_tokens == 10


@pytest.mark.parametrize("kwargs, param, words", [
    (dict(input="x", dimensions=385), "dimensions", "385"),
    (dict(input="x", dimensions=0), "dimensions", "1 to 384"),
    (dict(input=[]), "input", "empty list"),
    (dict(input=["ok", ""]), "input", "input[1] is empty"),
    (dict(input=[101, 99999, 102]), "input", "99999"),
    (dict(input="x", extra_body={"truncate_prompt_tokens": 1000}), "truncate_prompt_tokens", "256"),
    (dict(input="x", encoding_format="int8"), "encoding_format", "float"),
    (dict(input="x", encoding_format="base64", extra_body={"embed_dtype": "fp8_e4m3"}), "embed_dtype", "float16"),
    # vLLM's switches at other than what the model does: they were dropped, and the answer was the model's own.
    (dict(input="x", extra_body={"normalize": False}), "normalize", "pooling normalizes"),
    (dict(input="x", extra_body={"add_special_tokens": False}), "add_special_tokens", "special tokens"),
])
def test_bad_inputs_get_400_naming_the_field(client, kwargs, param, words):
    with pytest.raises(BadRequestError) as error:
        client.embeddings.create(model=MODEL, **kwargs)
    assert error.value.body["param"] == param and words in error.value.body["message"]


def test_a_lone_surrogate_is_a_400_naming_the_input(served):
    # Escaped in otherwise valid JSON (the openai client cannot send one): it was a 500 from the tokenizer.
    body = '{"model": "%s", "input": ["ok", "\\ud800"]}' % MODEL
    response = httpx.post(f"{served.url}/v1/embeddings", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "input.1" and "lone UTF-16 surrogate" in error["message"]


def test_chat_model_for_embeddings_is_a_400(client):
    with pytest.raises(BadRequestError) as error:
        client.embeddings.create(model="smollm2-135m", input="x")
    assert "generative model" in error.value.body["message"] and MODEL in error.value.body["message"]


def test_unknown_model_for_embeddings_is_a_404(client):
    with pytest.raises(NotFoundError) as error:
        client.embeddings.create(model="nope", input="x")
    assert error.value.body["code"] == "model_not_found"


def test_embedding_model_for_completions_and_chat_is_a_400(client):
    with pytest.raises(BadRequestError) as error:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert "embedding model" in error.value.body["message"] and "/v1/completions" in error.value.body["message"]
    with pytest.raises(BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    # The chat model still answers beside it.
    assert client.completions.create(model="smollm2-135m", prompt="hi", max_tokens=2).choices[0].text is not None


def test_an_embedding_model_alone_is_served(start_server):
    alone = start_server("--model", MODEL, "--embedding-max-wait-ms", "0")
    client = OpenAI(base_url=f"{alone.url}/v1", api_key="unused", max_retries=0)
    assert len(client.embeddings.create(model=MODEL, input="hello", encoding_format="float").data[0].embedding) == 384
    # A request naming no model gets the first embedding model, as completions get the first generative one.
    unnamed = httpx.post(f"{alone.url}/v1/embeddings", json={"input": ["a", "b"]}).json()
    assert unnamed["model"] == MODEL and len(unnamed["data"]) == 2
    with pytest.raises(NotFoundError) as error:
        client.completions.create(model="whatever", prompt="hi", max_tokens=2)
    assert "embedding models only" in error.value.body["message"]
    with pytest.raises(NotFoundError):  # `auto` chooses among generative models, and there are none
        client.models.retrieve("auto")
    # /tokenize naming no model counts for the first embedding model, as /v1/embeddings takes it (a 404 said
    # "tokenizing needs a generative one").
    tokenized = httpx.post(f"{alone.url}/tokenize", json={"prompt": "hello"})
    assert tokenized.status_code == 200 and tokenized.json()["max_model_len"] == 256
    chat = httpx.post(f"{alone.url}/tokenize", json={"messages": [{"role": "user", "content": "hello"}]})
    assert chat.status_code == 400 and f"{MODEL!r} is an embedding model" in chat.json()["error"]["message"]


def test_tokenize_and_detokenize_answer_for_a_served_embedding_model(served, offline):
    # Both were 404s saying the model "does not exist" while it answered /v1/embeddings.
    tokenized = httpx.post(f"{served.url}/tokenize", json={"model": MODEL, "prompt": TEXTS[0]}).json()
    expected = offline.model.tokenizer.encode(TEXTS[0]).ids
    assert tokenized["tokens"] == expected and tokenized["count"] == len(expected)
    assert tokenized["max_model_len"] == offline.model.max_input_tokens
    back = httpx.post(f"{served.url}/detokenize", json={"model": MODEL, "tokens": expected}).json()
    assert back["prompt"] == offline.model.tokenizer.decode(expected, skip_special_tokens=False)
    chat = httpx.post(f"{served.url}/tokenize", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"
