"""POST /v1/score and /v1/rerank, as vLLM serves them for embedding models: cosine similarity of embeddings.

A pair's score is the cosine of its two texts' embeddings, as vLLM scores with an embedding model (a cross-encoder
would read the pair together; this server serves none). Rerank orders documents by their score against the query,
in the shape Jina's and Cohere's rerank APIs share.
"""

import asyncio
import functools
import re
import time
import uuid

import torch.nn.functional as F
from fastapi import Request
from pydantic import Field

from tokenmill.errors import InvalidRequestError
from tokenmill.embeddings.inputs import token_inputs
from tokenmill.server.embeddings import MAX_INPUTS, embed, embedder
from tokenmill.server.errors import APIError
from tokenmill.server.protocol import RequestBody


class ScoreRequest(RequestBody):
    """vLLM's score body: text_1 against each of text_2 (one to one, one to many, or pairwise lists)."""

    model: str | None = None
    text_1: str | list[str]
    text_2: str | list[str]
    truncate_prompt_tokens: int | None = None


class RerankRequest(RequestBody):
    """A query and the documents to order by relevance to it; top_n keeps the best n."""

    model: str | None = None
    query: str
    documents: list[str] = Field(min_length=1)
    top_n: int | None = None
    truncate_prompt_tokens: int | None = None


async def create_score(body: ScoreRequest, request: Request) -> dict:
    """The score of each (text_1, text_2) pair, in text_2's order."""
    firsts = [body.text_1] if isinstance(body.text_1, str) else body.text_1
    seconds = [body.text_2] if isinstance(body.text_2, str) else body.text_2
    if not firsts or not seconds:
        raise APIError(400, "text_1 and text_2 each need at least one text", param="text_1" if not firsts else "text_2")
    if len(firsts) > 1 and len(firsts) != len(seconds):
        raise APIError(400, f"text_1 has {len(firsts)} texts and text_2 {len(seconds)}; give one text_1 to score "
                       "against every text_2, or as many as text_2 to score in pairs", param="text_1")
    name, scores, tokens = await _scores(request, body.model, firsts, seconds, body.truncate_prompt_tokens)
    return {"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": name,
            "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}}


async def create_rerank(body: RerankRequest, request: Request) -> dict:
    """The documents by relevance to the query, most relevant first."""
    if body.top_n is not None and body.top_n < 0:
        raise APIError(400, f"top_n={body.top_n} must be at least 0 (0: every document)", param="top_n")
    name, scores, tokens = await _scores(request, body.model, [body.query], body.documents,
                                         body.truncate_prompt_tokens)
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[:body.top_n or None]
    return {"id": f"rerank-{uuid.uuid4().hex}", "model": name, "usage": {"total_tokens": tokens},
            "results": [{"index": i, "document": {"text": body.documents[i]}, "relevance_score": scores[i]}
                        for i in order]}


async def _scores(request: Request, model: str | None, firsts: list[str], seconds: list[str],
                  truncate: int | None) -> tuple[str, list[float], int]:
    """The served name, each pair's cosine (firsts repeated when one), and the tokens embedded."""
    if len(firsts) + len(seconds) > MAX_INPUTS:
        raise APIError(400, f"{len(firsts) + len(seconds)} texts to embed; the limit is {MAX_INPUTS} per request",
                       param="documents" if request.url.path.endswith("rerank") else "text_2")
    name, engine = embedder(request, model)
    # Each side tokenized on its own, so an error names the field and index the client sent.
    rerank = request.url.path.endswith("rerank")
    ids: list[list[int]] = []
    for texts, field in ((firsts, "query" if rerank else "text_1"), (seconds, "documents" if rerank else "text_2")):
        try:
            # A blank chunk among a retriever's documents is scored (as vLLM scores it), not the whole request refused.
            ids += await asyncio.to_thread(functools.partial(token_inputs, empty_texts=True), engine.model, texts,
                                           truncate)
        except InvalidRequestError as exc:
            where = field if field == "query" else f"{field}[{_index(str(exc))}]"
            param = field if exc.param == "input" else exc.param  # truncate_prompt_tokens names itself
            raise InvalidRequestError(re.sub(r"^input\[\d+\]", where, str(exc)), param=param) from exc
    # Then in one batch, as token ids already within the limit: the engine pads and embeds them together.
    vectors, tokens = await embed(request, name, engine, ids, None)
    left, right = vectors[:len(firsts)], vectors[len(firsts):]
    return name, F.cosine_similarity(left.expand_as(right) if len(firsts) == 1 else left, right).tolist(), tokens


def _index(message: str) -> str:
    found = re.match(r"input\[(\d+)\]", message)
    return found[1] if found else "0"
