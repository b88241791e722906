"""/v1/score and /v1/rerank on a real server: cosine similarity of the embedding model's vectors, as vLLM's."""

import httpx
import numpy as np
import pytest

from tokenmill.loader import catalog

MODEL = "all-minilm-l6-v2"
QUERY = "Which animal sat on the mat?"
DOCUMENTS = ["Quarterly revenue rose 12%.", "The cat sat on the mat.", "A dog chased the ball."]


@pytest.fixture(scope="module")
def served(start_server):
    """SmolLM2 and all-MiniLM-L6-v2 in one server, with an API key."""
    catalog.pull(MODEL)
    return start_server("--model", "smollm2-135m", "--model", MODEL, "--api-key", "k")


@pytest.fixture(scope="module")
def post(served):
    def post(path: str, **body) -> httpx.Response:
        return httpx.post(f"{served.url}{path}", json=body, headers={"Authorization": "Bearer k"}, timeout=60)

    return post


@pytest.fixture(scope="module")
def offline():
    from tokenmill.embeddings.embedder import Embedder

    return Embedder(MODEL)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_scores_are_the_cosines_of_the_offline_embeddings(post, offline):
    vectors = offline.embed([QUERY, *DOCUMENTS]).numpy()
    expected = [_cosine(vectors[0], v) for v in vectors[1:]]
    answer = post("/v1/score", model=MODEL, text_1=QUERY, text_2=DOCUMENTS).json()
    assert [d["index"] for d in answer["data"]] == [0, 1, 2] and answer["model"] == MODEL
    assert np.allclose([d["score"] for d in answer["data"]], expected, atol=1e-4)
    tokens = sum(len(ids) for ids in offline.model.tokenize([QUERY, *DOCUMENTS]))
    assert answer["usage"]["prompt_tokens"] == tokens
    # Lists of the same length score pair by pair; without /v1 it answers the same.
    pairs = post("/score", model=MODEL, text_1=DOCUMENTS, text_2=DOCUMENTS[::-1]).json()["data"]
    assert np.isclose(pairs[1]["score"], 1.0, atol=1e-4)
    assert np.isclose(pairs[0]["score"], _cosine(vectors[1], vectors[3]), atol=1e-4)


def test_rerank_orders_documents_most_relevant_first_and_keeps_top_n(post):
    for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
        answer = post(path, model=MODEL, query=QUERY, documents=DOCUMENTS, top_n=2).json()
        results = answer["results"]
        assert [r["index"] for r in results][0] == 1 and len(results) == 2
        assert results[0]["document"]["text"] == DOCUMENTS[1]
        assert results[0]["relevance_score"] >= results[1]["relevance_score"]
        assert answer["usage"]["total_tokens"] > 0


def test_a_blank_document_is_scored_not_the_whole_request_refused(post):
    # A retriever's blank chunk made the request a 400 ("documents[1] is empty"), losing the other documents' order.
    results = post("/v1/rerank", model=MODEL, query=QUERY, documents=[DOCUMENTS[1], ""]).json()["results"]
    assert [r["index"] for r in results] == [0, 1] and results[1]["document"]["text"] == ""
    scores = post("/v1/score", model=MODEL, text_1=QUERY, text_2=["", DOCUMENTS[1]]).json()["data"]
    assert len(scores) == 2 and scores[0]["score"] < scores[1]["score"]


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/rerank", {"model": "smollm2-135m", "query": "q", "documents": ["d"]}, 400, "model"),
    ("/v1/rerank", {"model": MODEL, "query": "q", "documents": []}, 400, "documents"),
    ("/v1/rerank", {"model": MODEL, "query": "q", "documents": ["d"], "top_n": -1}, 400, "top_n"),
    ("/v1/score", {"model": MODEL, "text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, 400, "text_1"),
    ("/v1/score", {"model": MODEL, "text_1": "a", "text_2": ["word " * 400]}, 400, "text_2"),
    ("/v1/score", {"model": "nope", "text_1": "a", "text_2": "b"}, 404, "model"),
    ("/v1/rerank", {"model": MODEL, "query": "q", "documents": ["d"], "truncate_prompt_tokens": 0}, 400,
     "truncate_prompt_tokens"),
])
def test_bad_requests_are_refused_naming_the_field(post, path, body, status, param):
    response = post(path, **body)
    assert response.status_code == status and response.json()["error"]["param"] == param


@pytest.mark.parametrize("body, param, named", [
    ({"query": "cat " * 400, "documents": ["dog"]}, "query", "query is"),
    ({"query": "cat", "documents": ["a", "dog " * 400]}, "documents", "documents[1] is"),
])
def test_a_text_over_the_limit_is_named_as_the_client_sent_it(post, body, param, named):
    # The query and documents were embedded as one input list: the query's error blamed documents, and a
    # document's named its place in that list (input[2] for documents[1]).
    error = post("/v1/rerank", model=MODEL, **body).json()["error"]
    assert error["param"] == param and error["message"].startswith(named)


def test_the_key_guards_them_as_it_guards_v1(served):
    for path in ("/score", "/rerank", "/v2/rerank", "/v1/rerank"):
        assert httpx.post(f"{served.url}{path}", json={"query": "q", "documents": ["d"]}).status_code == 401
