"""POST /tokenize and /detokenize, as vLLM serves them (llama.cpp's field names taken too): a prompt or a chat as a
model's token ids, and back."""

import asyncio
from collections.abc import Callable
from typing import Any, Literal

from fastapi import Request
from pydantic import Field

from tokenmill.embeddings.model import EmbeddingModel
from tokenmill.loader.tokenizer import literal_backend
from tokenmill.router import AUTO
from tokenmill.server.embeddings import embedder, embedders_of
from tokenmill.server.errors import APIError
from tokenmill.server.protocol import ChatCompletionRequest, ChatMessage, NamedToolChoice, RequestBody, ToolDefinition
from tokenmill.server.serving import ServedModel, state_of


class TokenizeRequest(RequestBody):
    """A prompt (vLLM's completion form) or messages (its chat form, rendered as /v1/chat/completions renders them)."""

    model: str | None = None
    prompt: str | None = None
    content: str | None = None  # llama.cpp's name for the prompt; its special tokens are off unless add_special
    add_special: bool | None = None
    parse_special: bool | None = None  # llama.cpp's: false reads special-token text as plain text
    with_pieces: bool | None = None  # llama.cpp's: each token as {"id", "piece"}
    return_token_strs: bool | None = None  # vLLM's: the vocabulary's strings beside the ids
    # Typed as chat's fields are: the body is checked here, where a mistake is the request's 400.
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    # A prompt's BOS where the model wants one (the default, as vLLM); a chat's template writes its own.
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ToolDefinition] | None = None
    # The prompt depends on them: "none" leaves the tools out, a forced call writes its instruction in.
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None


class DetokenizeRequest(RequestBody):
    """Token ids of a model, to be read back as text."""

    model: str | None = None
    tokens: list[int]


_NOT_CHAT = {"prompt", "content", "add_special", "add_special_tokens", "parse_special", "with_pieces",
             "return_token_strs"}


async def tokenize(body: TokenizeRequest, request: Request) -> dict:
    """The token ids a prompt or a chat is to the model, their count, and the model's context."""
    if [body.prompt, body.content, body.messages].count(None) != 2:
        raise APIError(400, "give one of prompt, content (llama.cpp's name for it) or messages", param="prompt")
    if body.add_special is not None and body.add_special_tokens is not None:
        raise APIError(400, "give add_special_tokens or add_special (llama.cpp's name for it), not both",
                       param="add_special")
    if body.content is not None:  # llama.cpp's defaults: no BOS unless asked
        special = body.add_special if body.add_special is not None else body.add_special_tokens
        body = body.model_copy(update={"prompt": body.content, "add_special_tokens": bool(special)})
    elif body.add_special is not None:
        body = body.model_copy(update={"add_special_tokens": body.add_special})
    if (served := _embedding_model(request, body.model)) is not None:  # its inputs' tokens, as vLLM counts them
        name, embedding = served
        if body.prompt is None:
            raise APIError(400, f"{name!r} is an embedding model, with no chat template; give a prompt",
                           param="messages")
        backend = embedding.tokenizer if body.parse_special is not False else literal_backend(embedding.tokenizer)
        encoding = await asyncio.to_thread(backend.encode, body.prompt,
                                           add_special_tokens=body.add_special_tokens is not False)
        return _tokens(body, encoding.ids, embedding.max_input_tokens, lambda: encoding.tokens,
                       lambda i: embedding.tokenizer.decode([i], skip_special_tokens=False).encode())
    model = _model(request, body.model)
    if body.prompt is not None:
        special = body.add_special_tokens is not False
        ids = await asyncio.to_thread(model.tokenizer.encode, body.prompt, special, body.parse_special is not False)
    elif body.add_special_tokens:
        name = "add_special" if body.add_special is not None else "add_special_tokens"  # as the client named it
        raise APIError(400, f"{name} applies to a prompt; a chat's template writes its special tokens", param=name)
    else:
        chat = ChatCompletionRequest.model_validate(body.model_dump(exclude=_NOT_CHAT, exclude_none=True))
        ids = await asyncio.to_thread(chat.prompt_token_ids, model.tokenizer)
    backend = model.tokenizer.backend
    return _tokens(body, ids, model.max_model_len, lambda: [backend.id_to_token(i) for i in ids],
                   model.tokenizer.token_bytes)


def _tokens(body: TokenizeRequest, ids: list[int], max_model_len: int, strs: Callable[[], list[str]],
            token_bytes: Callable[[int], bytes]) -> dict:
    """The answer: vLLM's fields, the tokens as llama.cpp's {"id", "piece"} when with_pieces asks for them."""
    tokens: list = [{"id": i, "piece": _piece(token_bytes(i))} for i in ids] if body.with_pieces else ids
    return {"count": len(ids), "max_model_len": max_model_len, "tokens": tokens,
            "token_strs": strs() if body.return_token_strs else None}


def _piece(raw: bytes) -> str | list[int]:
    """A token's text, or its bytes where they are not whole UTF-8 characters (as llama.cpp gives them)."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return list(raw)


async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
    """The text a model's token ids spell (special tokens included, as vLLM reads them back)."""
    if (served := _embedding_model(request, body.model)) is not None:
        name, embedding = served
        tokenizer, vocab = embedding.tokenizer, embedding.vocab_size
    else:
        model = _model(request, body.model)
        tokenizer, vocab, name = model.tokenizer, model.tokenizer.vocab_size, model.name
    if any(not 0 <= t < vocab for t in body.tokens):
        raise APIError(400, f"tokens must be in [0, {vocab}) for {name!r}", param="tokens")
    text = await asyncio.to_thread(tokenizer.decode, body.tokens, skip_special_tokens=False)
    return {"prompt": text, "content": text}  # vLLM's name and llama.cpp's


def _embedding_model(request: Request, name: str | None) -> tuple[str, EmbeddingModel] | None:
    """The served embedding model a request names, by its served name (it was a 404 "does not exist"), or the first
    where it names none and no generative model is served (as /v1/embeddings takes it)."""
    if name in embedders_of(request) or (name is None and not state_of(request).models):
        served, engine = embedder(request, name)
        return served, engine.model
    return None


def _model(request: Request, name: str | None) -> ServedModel:
    """The served model a request names (the first when none); `auto` names no one tokenizer."""
    state = state_of(request)
    if name == AUTO and len(state.models) == 1:  # the one model auto answers with
        name = None
    if name == AUTO and AUTO not in state.models and state.models:
        raise APIError(400, "auto may answer with any served model, each with its own tokens; name one of "
                       f"{', '.join(repr(n) for n in state.models)}", param="model")
    return state.model(name)
