"""POST /v1/chat/completions: messages rendered with the model's chat template, answered whole or streamed."""

import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from tokenmill.engine.async_engine import RequestStream
from tokenmill.errors import InvalidRequestError
from tokenmill.loader.tokenizer import Tokenizer
from tokenmill.outputs import TokenLogprob
from tokenmill.router.serving import route
from tokenmill.server.protocol import ChatCompletionRequest
from tokenmill.server.serving import COST_HEADER, Usage, merged, new_id, sse, state_of, submit


async def create_chat_completion(body: ChatCompletionRequest, request: Request,
                                 response: Response) -> dict | StreamingResponse:
    """Answer one conversation with n choices."""
    state = state_of(request)
    params = body.sampling_params()
    conversation = body.conversation()
    # `route` renders and tokenizes off the event loop: a long conversation must not stall other streams.
    routed = await route(state, body.model, lambda tokenizer: [tokenizer.encode_chat(conversation)], params,
                         bool(body.stream))
    model, tokenizer = routed.model, routed.model.tokenizer
    response_id = new_id("chatcmpl")
    try:
        streams = await submit(state, model, routed.prompts, routed.params, response_id)
    except InvalidRequestError as exc:
        if exc.param == "prompt":  # chat requests have messages, not a prompt
            exc.param = "messages"
        raise
    created = int(time.time())
    if body.stream:
        chunks = _chunks(body, params.n, streams[0], tokenizer, response_id, created, model.name)
        return StreamingResponse(sse(chunks), media_type="text/event-stream", headers=routed.headers())
    (output,), usage_block = await routed.finish(state, request, streams, response_id)
    model, tokenizer = routed.model, routed.model.tokenizer  # cascade may have moved it to a stronger model
    choices = [
        {
            "index": sample.index,
            "message": {"role": "assistant", "content": sample.text},
            "logprobs": None if sample.logprobs is None else chat_logprobs(sample.token_ids, sample.logprobs, tokenizer),
            "finish_reason": sample.finish_reason,
        }
        for sample in output.outputs
    ]
    response.headers[COST_HEADER] = repr(usage_block["cost"])
    response.headers.update(routed.headers())
    return {
        "id": response_id, "object": "chat.completion", "created": created, "model": model.name,
        "choices": choices, "usage": usage_block,
    }


async def _chunks(body: ChatCompletionRequest, n: int, stream: RequestStream, tokenizer: Tokenizer,
                  response_id: str, created: int, model: str) -> AsyncIterator[dict]:
    head = {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": model}
    # As OpenAI: each choice opens with a chunk that only names the role.
    yield {**head, "choices": [
        {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        for i in range(n)
    ]}
    counted = Usage()
    async with aclosing(merged([stream])) as outputs:
        async for _, output in outputs:
            counted.add(0, output)
            choices = [
                {
                    "index": sample.index,
                    "delta": {"content": sample.text} if sample.text else {},
                    "logprobs": None if sample.logprobs is None else chat_logprobs(sample.token_ids, sample.logprobs,
                                                                                   tokenizer),
                    "finish_reason": sample.finish_reason,
                }
                for sample in output.outputs
            ]
            yield {**head, "choices": choices}
    if body.include_usage:
        yield {**head, "choices": [], "usage": counted.block()}


def chat_logprobs(token_ids: list[int], logprobs: list[TokenLogprob], tokenizer: Tokenizer) -> dict:
    """The chat logprobs block: per token its text, logprob, UTF-8 bytes and top alternatives."""

    def entry(token_id: int, logprob: float) -> dict:
        # `bytes` are the token's own bytes, so a client can rebuild characters split across tokens.
        return {"token": tokenizer.decode([token_id]), "logprob": logprob, "bytes": list(tokenizer.token_bytes(token_id))}

    return {
        "content": [
            {**entry(t, lp.logprob), "top_logprobs": [entry(alt, p) for alt, p in lp.top]}
            for t, lp in zip(token_ids, logprobs)
        ]
    }
