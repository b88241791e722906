"""Ollama's API, for its clients (the `ollama` libraries, Open WebUI, Enchanted, Continue): /api/chat, /api/generate,
/api/embed and /api/embeddings answered by the same engines as /v1/*, and the model listings they read first.

Answers stream as NDJSON by default (Ollama's), each line an object, the last with done true, why it ended, the
token counts and the prompt's and output's durations in nanoseconds, and tokenmill's usage with its cost.
"""

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import TypeVar

from fastapi import Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ValidationError

from tokenmill.embeddings.inputs import check_dimensions, shorten
from tokenmill.errors import InvalidRequestError
from tokenmill.server.chat import answer_chat
from tokenmill.server.completions import answer_completion
from tokenmill.server.protocol import ChatCompletionRequest
from tokenmill.server.embeddings import embed, embedder, embedders_of, json_rows
from tokenmill.server.errors import field_path, from_exception
from tokenmill.server.ollama_protocol import (OllamaChatRequest, OllamaEmbedRequest, OllamaGenerateRequest,
                                              OllamaRequest, served_name)
from tokenmill.server.serving import ChunkStream, EventStream, ServedModel, state_of
from tokenmill.structured.tool_parser import arguments_object

# The Ollama API version these endpoints follow: clients (Open WebUI, Copilot) compare it before they use them.
API_VERSION = "0.9.0"
Body = TypeVar("Body", bound=BaseModel)


async def chat(request: Request, response: Response) -> Response | dict:
    """POST /api/chat: a conversation answered as one message, streamed line by line unless stream is false."""
    body = await _body(request, OllamaChatRequest)
    _check_thinking(request, body)
    if not body.messages:  # Ollama's way to load a model: every model here is loaded (a 404 if not served)
        state_of(request).model(body.served)
        return JSONResponse(_line(body.model, message={"role": "assistant", "content": ""}, done=True,
                                  done_reason=body.loaded))
    return _answered(body, await answer_chat(await _fitted(request, body), request, response), "message")


async def _fitted(request: Request, body: OllamaChatRequest) -> ChatCompletionRequest:
    """The chat request, its oldest turns dropped (system turns and the last kept) until the prompt and room for the
    reply fit the model's context, as Ollama truncates a conversation unless truncate is false: a long chat was a
    400. It is cut before a user turn only: templates that want roles to alternate refuse any other start."""
    model = state_of(request).models.get(body.served)  # a router's name: routing picks a model that fits
    messages = body.messages or []
    whole = body.chat_request()
    if body.truncate is False or model is None:
        return whole
    # Room for num_predict, or a quarter of the context: Ollama shifts its context to go on, which this engine
    # does not, so a prompt cut to the brim would leave the answer a few tokens.
    room = min(whole.max_tokens or model.max_model_len // 4, model.max_model_len // 2)

    tried: dict[int, tuple[ChatCompletionRequest, bool]] = {}  # the search ends on a cut it rendered already

    def from_turn(start: int) -> tuple[ChatCompletionRequest, bool]:
        if start not in tried:
            kept = [m for m in messages[:start] if m.role.lower() == "system"] + messages[start:]
            chat_request = body.model_copy(update={"messages": kept}).chat_request() if start else whole
            fits = len(chat_request.prompt_token_ids(model.tokenizer)) + room <= model.max_model_len
            tried[start] = chat_request, fits
        return tried[start]

    cuts = [i for i in range(1, len(messages)) if messages[i].role.lower() == "user"]
    if not cuts or (await asyncio.to_thread(from_turn, 0))[1]:
        return whole
    # Fewer turns, a shorter prompt: the fewest to drop, found by halving (each try renders the whole chat). Where
    # even the last cut does not fit, the engine's 400 says by how much.
    low, high = 0, len(cuts) - 1
    while low < high:
        middle = (low + high) // 2
        if (await asyncio.to_thread(from_turn, cuts[middle]))[1]:
            high = middle
        else:
            low = middle + 1
    return (await asyncio.to_thread(from_turn, cuts[high]))[0]


async def generate(request: Request, response: Response) -> Response | dict:
    """POST /api/generate: a prompt completed, through the model's chat template unless raw."""
    body = await _body(request, OllamaGenerateRequest)
    body.refusals()
    _check_thinking(request, body)
    if not body.prompt:  # Ollama's way to load (or, with keep_alive 0, unload) a model
        state_of(request).model(body.served)
        return JSONResponse(_line(body.model, response="", done=True, done_reason=body.loaded))
    if body.raw:
        answer = await answer_completion(body.completion_request(), request, response)
    else:
        answer = await answer_chat(body.chat_request(), request, response)
    return _answered(body, answer, "response")


async def embed_inputs(request: Request) -> Response:
    """POST /api/embed: each input's embedding (as the served model pools and normalizes it)."""
    arrival = time.perf_counter()
    body = await _body(request, OllamaEmbedRequest)
    name, engine = embedder(request, served_name(body.model))
    check_dimensions(engine.model, body.dimensions)
    # Ollama's client sends "" for none; an empty string among others is refused, as on /v1/embeddings.
    inputs = ([body.input] if body.input else []) if isinstance(body.input, str) else body.input or []
    vectors, tokens = await embed(request, name, engine, inputs, -1 if body.truncate else None) if inputs else ([], 0)
    if inputs:
        vectors = shorten(engine.model, vectors, body.dimensions)
    total = _ns(time.perf_counter() - arrival)
    # Off the event loop and one embedding at a time, as /v1/embeddings serializes: 2,048 embeddings' numbers in one
    # call held every other request about a second.
    embeddings = await asyncio.to_thread(json_rows, (vector.tolist() for vector in vectors))
    return Response(f'{{"model":{json.dumps(body.model)},"embeddings":{embeddings},"total_duration":{total},'
                    f'"load_duration":0,"prompt_eval_count":{tokens}}}', media_type="application/json")


async def embed_prompt(request: Request) -> JSONResponse:
    """POST /api/embeddings, the older form: one prompt's embedding."""
    body = await _body(request, OllamaEmbedRequest)
    name, engine = embedder(request, served_name(body.model))
    if not body.prompt:
        return JSONResponse({"embedding": []})
    vectors, _ = await embed(request, name, engine, [body.prompt], -1)
    return JSONResponse({"embedding": vectors[0].tolist()})


async def tags(request: Request) -> dict:
    """GET /api/tags: every served model, as Ollama lists what it has pulled."""
    return {"models": _models(request)}


async def running(request: Request) -> dict:
    """GET /api/ps: the models in memory (all of them, loaded until the server stops)."""
    return {"models": [{**card, "size_vram": 0, "expires_at": "9999-12-31T23:59:59Z"} for card in _models(request)]}


async def show(request: Request) -> dict:
    """POST /api/show: a model's template, stop tokens, context and capabilities."""
    raw = await _json(request)
    name = served_name(str(raw.get("model") or raw.get("name") or ""))
    if name in embedders_of(request):
        card = next(card for card in _models(request) if card["model"] == f"{name}:latest")
        return {"modelfile": "", "parameters": "", "template": "", "license": "", "system": "",
                "details": card["details"], "model_info": {}, "capabilities": ["embedding"],
                "modified_at": card["modified_at"]}
    model = state_of(request).model(name)
    config, tokenizer = model.engine.engine.model_config, model.tokenizer
    stops = "".join(f'\nstop {json.dumps(tokenizer.decode([t], skip_special_tokens=False))}'
                    for t in tokenizer.eos_token_ids)
    arch = config.architecture
    return {
        "modelfile": "", "parameters": f"num_ctx {model.max_model_len}{stops}",
        "template": tokenizer.chat_template or "", "license": "", "system": "",
        "details": _details(model), "modified_at": _modified(_path(model)),
        "model_info": {"general.architecture": arch, f"{arch}.context_length": model.max_model_len,
                       f"{arch}.embedding_length": config.hidden_size, f"{arch}.block_count": config.num_layers},
        "capabilities": ["completion", "tools", *(["thinking"] if _thinks(request, model) else [])],
    }


def _thinks(request: Request, model: ServedModel) -> bool:
    """Whether a model can think as Ollama's `think` asks: its template switches or sets thinking, or a reasoning
    parser splits the thinking off."""
    template = model.tokenizer.chat_template or ""
    return state_of(request).config.reasoning_parser is not None or any(
        word in template for word in ("enable_thinking", "reasoning_effort", "<think>"))


def _check_thinking(request: Request, body: OllamaRequest) -> None:
    """400 for think asked of a model that cannot, as Ollama says (it was answered without thinking, unsaid)."""
    models = state_of(request).models
    if body.think and body.served in models and not _thinks(request, models[body.served]):
        raise InvalidRequestError(f'"{body.model}" does not support thinking', param="think")  # Ollama's words


async def api_version() -> dict:
    """GET /api/version: the Ollama API version followed here, and tokenmill's own."""
    return {"version": API_VERSION, "tokenmill": version("tokenmill")}


async def root() -> PlainTextResponse:
    """GET and HEAD /: what Ollama's clients check to see a server is there."""
    return PlainTextResponse("tokenmill is running (Ollama's API under /api, OpenAI's under /v1)")


def _answered(body: OllamaRequest, answer: ChunkStream | dict, field: str) -> Response | dict:
    """The answer as Ollama's: its lines streamed as NDJSON, or one object (the response's headers kept)."""
    if isinstance(answer, ChunkStream):
        return EventStream(_lines(body, answer, field), answer.streams, answer.headers, encode=_ndjson,
                           media_type="application/x-ndjson")
    choice = answer["choices"][0]
    logprobs = _logprobs(choice)
    if field == "response":  # a completion's text, or a one-turn chat's
        line = _line(body.model, response=choice["text"] if "text" in choice else choice["message"]["content"] or "")
        return {**line, **_thought(choice.get("message", {})), **logprobs,
                **_account(answer["usage"], choice["finish_reason"])}
    message = choice["message"]
    calls = [{"function": {"name": c["function"]["name"], "arguments": arguments_object(c["function"]["arguments"])}}
             for c in message.get("tool_calls") or []]
    reply = {"role": "assistant", "content": message["content"] or "", **_thought(message),
             **({"tool_calls": calls} if calls else {})}
    return {**_line(body.model, message=reply), **logprobs, **_account(answer["usage"], choice["finish_reason"])}


async def _lines(body: OllamaRequest, answer: ChunkStream, field: str) -> AsyncIterator[dict]:
    """A chat's (or a completion's) chunks as Ollama's lines: each delta's text in `field` (message or response),
    thinking beside it, tool calls whole at the end, then done with the counts and durations."""
    calls: dict[int, dict] = {}
    finish = usage = None
    async with aclosing(answer.chunks) as chunks:
        async for chunk in chunks:
            usage = chunk.get("usage") or usage
            for choice in chunk["choices"]:
                finish = choice.get("finish_reason") or finish
                delta = choice["delta"] if "delta" in choice else {"content": choice["text"]}  # chat's or raw's
                for call in delta.get("tool_calls") or []:
                    whole = calls.setdefault(call["index"], {"name": "", "arguments": ""})
                    whole["name"] += call.get("function", {}).get("name") or ""
                    whole["arguments"] += call.get("function", {}).get("arguments") or ""
                text, thought = delta.get("content") or "", delta.get("reasoning_content") or ""
                logprobs = _logprobs(choice)
                if text or thought or logprobs:
                    yield {**_text_line(body.model, field, text, thought), **logprobs}
    if calls:
        yield _line(body.model, message={"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": c["name"], "arguments": arguments_object(c["arguments"])}} for c in calls.values()]},
            done=False)
    yield {**_text_line(body.model, field, "", ""), **_account(usage, finish)}


def _account(usage: dict | None, finish: str | None) -> dict:
    """The done line's fields: why it ended, the counts, and the durations (nanoseconds) the engine measured: the
    prompt's up to the first token, the output's after it; tokenmill's usage and cost beside them."""
    counted = usage or {"prompt_tokens": 0, "completion_tokens": 0}
    latency = counted.get("latency") or {}
    first = latency.get("time_to_first_token_seconds") or 0.0
    total = latency.get("end_to_end_seconds") or first
    return {"done": True, "done_reason": "length" if finish == "length" else "stop", "total_duration": _ns(total),
            "load_duration": 0, "prompt_eval_count": counted["prompt_tokens"], "prompt_eval_duration": _ns(first),
            "eval_count": counted["completion_tokens"], "eval_duration": _ns(total - first), "usage": usage}


def _logprobs(choice: dict) -> dict:
    """A chat choice's logprobs as Ollama's: the same list of {token, logprob, bytes, top_logprobs}, at the top."""
    content = (choice.get("logprobs") or {}).get("content")
    return {"logprobs": content} if content else {}


def _thought(message: dict) -> dict:
    """A --reasoning-parser's thinking, as Ollama's `thinking`."""
    return {"thinking": message["reasoning_content"]} if message.get("reasoning_content") else {}


def _text_line(model: str, field: str, text: str, thought: str) -> dict:
    thinking = {"thinking": thought} if thought else {}
    if field == "message":
        return _line(model, message={"role": "assistant", "content": text, **thinking}, done=False)
    return _line(model, response=text, **thinking, done=False)


async def _ndjson(lines: AsyncIterator[dict]) -> AsyncIterator[str]:
    """One compact JSON object per line, as Ollama's clients read them; a failure once begun ends them with an error
    line, as Ollama's do."""
    try:
        async with aclosing(lines):
            async for line in lines:
                yield json.dumps(line, separators=(",", ":")) + "\n"
    except Exception as exc:
        yield json.dumps({"error": from_exception(exc).body["error"]["message"]}) + "\n"


async def _json(request: Request) -> dict:
    """The body as JSON whatever its content type (curl -d sends a form's): 400 if it is no JSON object."""
    try:
        raw = json.loads(await request.body() or b"{}")
    except ValueError as exc:
        raise InvalidRequestError(f"request body is not valid JSON: {exc}") from exc
    except RecursionError as exc:  # Python's parser gives up on nesting about a thousand deep
        raise InvalidRequestError("request body is nested too deeply to parse") from exc
    if not isinstance(raw, dict):
        raise InvalidRequestError("request body must be a JSON object")
    return raw


async def _body(request: Request, kind: type[Body]) -> Body:
    """The body as the request model; 400 naming the first bad field."""
    raw = await _json(request)
    try:
        return kind.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = field_path(error["loc"])
        raise InvalidRequestError(f"{where}: {error['msg']}" if where else error["msg"], param=where) from exc


def _models(request: Request) -> list[dict]:
    """Each served model as /api/tags lists it."""
    cards = []
    for model in state_of(request).models.values():
        path = _path(model)
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        cards.append(_card(model.name, sum(p.stat().st_size for p in files), _modified(path), _details(model)))
    for name, engine in embedders_of(request).items():
        size = sum(p.numel() * p.element_size() for p in engine.model.encoder.parameters())
        cards.append(_card(name, size, _timestamp(datetime.now(timezone.utc)), {
            "parent_model": "", "format": "safetensors", "family": "bert", "families": ["bert"],
            "parameter_size": "", "quantization_level": ""}))
    return cards


def _card(name: str, size: int, modified: str, details: dict) -> dict:
    # The digest names the served model (Ollama's is its blob's hash): clients use it to tell models apart.
    return {"name": f"{name}:latest", "model": f"{name}:latest", "modified_at": modified, "size": size,
            "digest": hashlib.sha256(name.encode()).hexdigest(), "details": details}


def _details(model: ServedModel) -> dict:
    arch = model.engine.engine.model_config.architecture
    path = _path(model)
    return {"parent_model": "", "format": "gguf" if path.suffix == ".gguf" else "safetensors", "family": arch,
            "families": [arch], "parameter_size": "", "quantization_level": ""}


def _path(model: ServedModel) -> Path:
    return Path(model.engine.engine.source.path)


def _modified(path: Path) -> str:
    return _timestamp(datetime.fromtimestamp(path.stat().st_mtime, timezone.utc))


def _line(model: str, **fields: object) -> dict:
    return {"model": model, "created_at": _timestamp(datetime.now(timezone.utc)), **fields}


def _timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with nine digits of fraction, as Ollama writes it (Enchanted's parser needs them)."""
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{moment.microsecond:06d}000Z"


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)
