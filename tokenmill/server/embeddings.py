"""POST /v1/embeddings in OpenAI's shape, answered by the dynamically batched embedding engines."""

import asyncio
import base64
import json
from collections.abc import Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from fastapi import Request
from fastapi.responses import Response
from pydantic import ValidationError, ValidatorFunctionWrapHandler, field_validator
from pydantic_core import PydanticCustomError

from tokenmill.embeddings.engine import EmbeddingEngine
from tokenmill.embeddings.inputs import EmbeddingInput, check_dimensions, shorten, token_inputs
from tokenmill.server.errors import APIError
from tokenmill.server.protocol import RequestBody
from tokenmill.server.serving import refuse_past_waiting, refuse_past_waiting_tokens, state_of, unless_disconnected

# OpenAI's limit on inputs per request.
MAX_INPUTS = 2048


class EmbeddingRequest(RequestBody):
    """OpenAI's embeddings body, with vLLM's truncate_prompt_tokens."""

    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = None
    # vLLM's: the element type base64 carries (float32, as OpenAI's client decodes it, unless asked).
    embed_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # vLLM's too: they were dropped, and a client got what it had not asked for. normalize true normalizes a model
    # whose pooling does not; false is refused for one whose pooling does, as add_special_tokens false always is.
    normalize: bool | None = None
    add_special_tokens: bool | None = None

    def refusals(self, normalized: bool) -> None:
        """400 for vLLM's switches this server cannot turn: unnormalized embeddings of a model whose pooling
        normalizes them, inputs without their special tokens."""
        if self.normalize is False and normalized:
            raise APIError(400, "normalize false is not supported: this model's pooling normalizes its embeddings",
                           param="normalize")
        if self.add_special_tokens is False:
            raise APIError(400, "add_special_tokens false is not supported: inputs are embedded with the model's "
                           "special tokens, as it was trained", param="add_special_tokens")

    @field_validator("input", mode="wrap")
    @classmethod
    def _input_forms(cls, value: object, handler: ValidatorFunctionWrapHandler) -> object:
        # The union's own error names the first form it tried: a float among token ids read "should be a valid
        # string".
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("input_form", "input must be a string, strings, token ids (integers) or lists "
                                      "of token ids") from None


def embedders_of(request: Request) -> dict[str, EmbeddingEngine]:
    """The served embedding engines by served name, in --model order (none on an app built without them)."""
    return getattr(request.app.state, "embedders", {})


def embedder(request: Request, name: str | None) -> tuple[str, EmbeddingEngine]:
    """The embedding model a request names (the first served when none); 400 for a generative one, 404 else."""
    embedders = embedders_of(request)
    served = ", ".join(repr(n) for n in embedders) or "none"
    if name is None:
        if not embedders:
            raise APIError(404, "this server serves no embedding models; start it with one (--model "
                           "all-minilm-l6-v2)", param="model", code="model_not_found")
        return next(iter(embedders.items()))
    if name in embedders:
        return name, embedders[name]
    if name in state_of(request).models:
        raise APIError(400, f"{name!r} is a generative model; {request.url.path} needs an embedding model (served: "
                       f"{served})", param="model", code="model_not_embedding")
    raise APIError(404, f"the embedding model {name!r} does not exist; this server's embedding models: {served}",
                   param="model", code="model_not_found")


async def create_embedding(body: EmbeddingRequest, request: Request) -> Response:
    """Embed each input; `data` is in input order, `usage` counts the tokens embedded."""
    name, engine = embedder(request, body.model)
    check_dimensions(engine.model, body.dimensions)
    body.refusals(engine.model.pooling.normalize)
    if isinstance(body.input, list) and len(body.input) > MAX_INPUTS and not isinstance(body.input[0], int):
        raise APIError(400, f"input has {len(body.input)} items; the limit is {MAX_INPUTS} per request",
                       param="input")
    vectors, num_tokens = await embed(request, name, engine, body.input, body.truncate_prompt_tokens)
    vectors = shorten(engine.model, vectors, body.dimensions)
    if body.normalize and not engine.model.pooling.normalize:  # asked of a model whose pooling leaves them be
        vectors = F.normalize(vectors, dim=-1)  # after the cut to dimensions, as vLLM
    # Off the event loop, one embedding at a time: serializing one 384-float embedding takes 0.5 ms, so 2,048
    # in one call would hold the interpreter (and every other request) for a second.
    return Response(await asyncio.to_thread(_body, vectors, body.encoding_format, body.embed_dtype, name, num_tokens),
                    media_type="application/json")


async def embed(request: Request, name: str, engine: EmbeddingEngine, inputs: EmbeddingInput,
                truncate: int | None) -> tuple[torch.Tensor, int]:
    """The inputs' embeddings, through the engine's queue, and the tokens embedded; 429 past the queue's bounds."""
    model = engine.model
    if not engine.is_running:
        raise APIError(503, f"the engine of {name!r} is not running; see the server log", type="server_error")
    config = state_of(request).config
    # As the generative models' queues: bounded per model by --max-waiting requests and --max-waiting-tokens.
    refuse_past_waiting(name, engine.num_waiting, 1, config.max_waiting)
    engine.num_waiting += 1  # from here: others arrive while this one is tokenized
    try:
        # Off the event loop: 2,048 long inputs take a while to tokenize and must not stall other requests.
        ids = await asyncio.to_thread(token_inputs, model, inputs, truncate)
        num_tokens = sum(len(i) for i in ids)
        refuse_past_waiting_tokens(name, engine.num_waiting_tokens, num_tokens, config.max_waiting_tokens)
        engine.num_waiting_tokens += num_tokens
        try:
            # A client that goes away leaves its inputs still queued to be dropped, not embedded for nobody.
            return await unless_disconnected(request, engine.embed(ids)), num_tokens
        finally:
            engine.num_waiting_tokens -= num_tokens
    finally:
        engine.num_waiting -= 1


def json_rows(rows: Iterable[object]) -> str:
    """A JSON array whose items are serialized one call each: json.dumps keeps the interpreter for a whole call,
    so between items the event loop's thread gets its turn."""
    return "[" + ",".join(json.dumps(row, separators=(",", ":"), allow_nan=False) for row in rows) + "]"


def _body(vectors: torch.Tensor, encoding_format: str, embed_dtype: str, name: str, num_tokens: int) -> bytes:
    """The response's JSON, its embeddings serialized one at a time."""
    data = json_rows({"object": "embedding", "index": i, "embedding": _encode(v, encoding_format, embed_dtype)}
                     for i, v in enumerate(vectors))
    usage = json.dumps({"prompt_tokens": num_tokens, "total_tokens": num_tokens})
    return f'{{"object":"list","data":{data},"model":{json.dumps(name)},"usage":{usage}}}'.encode()


def _encode(vector: torch.Tensor, encoding_format: str, embed_dtype: str) -> list[float] | str:
    if encoding_format == "float":
        return vector.tolist()
    # As OpenAI: the raw little-endian bytes (float32 unless vLLM's embed_dtype asks otherwise), base64-encoded.
    if embed_dtype == "bfloat16":  # numpy has no bfloat16: its bits as 16-bit integers
        raw = vector.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2")
    else:
        raw = vector.numpy().astype("<f2" if embed_dtype == "float16" else "<f4")
    return base64.b64encode(raw.tobytes()).decode("ascii")
