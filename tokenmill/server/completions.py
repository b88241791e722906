"""POST /v1/completions: text completion of one or more prompts, whole or streamed."""

import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import Request, Response

from tokenmill.engine.async_engine import RequestStream
from tokenmill.errors import InvalidRequestError, PromptTooLongError
from tokenmill.loader.tokenizer import Tokenizer
from tokenmill.outputs import CompletionOutput, RequestOutput, TokenLogprob
from tokenmill.router.serving import route
from tokenmill.server.deadlines import STATUS_HEADER, deadline_status, with_deadlines
from tokenmill.server.protocol import CompletionRequest
from tokenmill.server.serving import (COST_HEADER, ChunkStream, EventStream, ServedModel, Usage, json_logprob, merged,
                                      new_id, state_of, vllm_prompt_logprobs)


async def create_completion(body: CompletionRequest, request: Request,
                            response: Response) -> dict | EventStream:
    """Complete each prompt; choices are numbered prompt by prompt, n per prompt."""
    answer = await answer_completion(body, request, response)
    return answer if isinstance(answer, dict) else EventStream(answer.chunks, answer.streams, answer.headers)


async def answer_completion(body: CompletionRequest, request: Request, response: Response) -> dict | ChunkStream:
    """The text_completion object, or the chunks of a streamed one (which Ollama's raw /api/generate re-shapes)."""
    state = state_of(request)
    arrival = time.perf_counter()  # deadlines and latencies count from here: compiling and tokenizing take time too
    params = with_deadlines(request, body.sampling_params(state.sampling_defaults(body.model)))
    if params.structured_output is not None:  # off the event loop: a large grammar takes seconds to compile
        await params.structured_output.compile_off_loop()
    # `route` tokenizes off the event loop: a long prompt takes a while and must not stall other streams.
    has_ids = isinstance(body.prompt, list) and any(isinstance(p, (int, list)) for p in body.prompt)
    routed = await route(state, body.model, lambda model: _prompt_token_ids(body, model, params.max_tokens), params,
                         bool(body.stream), token_ids=has_ids)
    model = routed.model
    response_id = new_id("cmpl")
    try:
        streams = await routed.start(state, response_id, arrival)
    except PromptTooLongError as exc:
        longest = max(len(ids) for ids in routed.prompts)
        if body.prompt_only and longest >= model.max_model_len:  # the engine's says "max_tokens is 1": the client sent 0
            raise PromptTooLongError(f"This model's maximum context length is {model.max_model_len} tokens. However, "
                                     f"the prompt is {longest} tokens; echo with max_tokens 0 scores it by running one "
                                     f"hidden token past it, so it may be at most {model.max_model_len - 1}; shorten "
                                     "the prompt", param=exc.param) from exc
        raise
    created = int(time.time())
    if body.stream:
        chunks = _chunks(body, params.n, streams, model.tokenizer, response_id, created, model.name)
        return ChunkStream(chunks, streams, routed.headers())
    outputs, usage_block = await routed.finish(state, request, streams, response_id)
    if body.prompt_only:
        outputs = [prompt_only(output) for output in outputs]
        usage_block |= {"completion_tokens": 0, "total_tokens": usage_block["prompt_tokens"]}
    model = routed.model  # cascade may have moved it to a stronger model
    choices = [
        _choice(body, output, sample, model.tokenizer, i * params.n + sample.index, i)
        for i, output in enumerate(outputs)
        for sample in output.outputs
    ]
    response.headers[COST_HEADER] = repr(usage_block["cost"])
    if (status := deadline_status(outputs)) is not None:  # a late answer says so: "missed"
        response.headers[STATUS_HEADER] = status
    response.headers.update(routed.headers())
    return {
        "id": response_id, "object": "text_completion", "created": created, "model": model.name,
        "choices": choices, "usage": usage_block,
    }


def _prompt_token_ids(body: CompletionRequest, model: ServedModel, max_tokens: int | None) -> list[list[int]]:
    """Each prompt's token ids for model (its last truncate_prompt_tokens of them, when set)."""
    prompt, tokenizer = body.prompt, model.tokenizer
    special = body.add_special_tokens is not False
    if isinstance(prompt, str):
        prompts = [tokenizer.encode(prompt, special)]
    elif not prompt:
        raise InvalidRequestError("prompt is an empty list; give a string, strings, or token ids", param="prompt")
    elif isinstance(prompt[0], int):
        prompts = [list(prompt)]
    else:
        prompts = [tokenizer.encode(p, special) if isinstance(p, str) else list(p) for p in prompt]
    return [body.truncated(ids, model.max_model_len, max_tokens) for ids in prompts]


def _echo(body: CompletionRequest, output: RequestOutput, tokenizer: Tokenizer, i: int) -> str:
    """Prompt i as sent, as OpenAI echoes it; token ids (or a truncated prompt) read back, special tokens kept."""
    if not body.echo:
        return ""
    sent = body.prompt if isinstance(body.prompt, str) else body.prompt[i]
    if isinstance(sent, str) and body.truncate_prompt_tokens is None:
        return sent
    return tokenizer.decode(output.prompt_token_ids, skip_special_tokens=False)


def prompt_only(output: RequestOutput) -> RequestOutput:
    """The output without the one token a prompt-only request ran to score its prompt."""
    samples = [dataclasses.replace(sample, text="", token_ids=[], logprobs=None if sample.logprobs is None else [],
                                   finish_reason="length" if sample.finish_reason else None, stop_reason=None)
               for sample in output.outputs]
    return dataclasses.replace(output, outputs=samples)


def _echo_logprobs(output: RequestOutput) -> tuple[list[int], list[TokenLogprob | None]]:
    """The prompt's tokens and logprobs, to lead an echoed choice (the first token has none)."""
    assert output.prompt_logprobs is not None
    return output.prompt_token_ids, output.prompt_logprobs


def _choice(body: CompletionRequest, output: RequestOutput, sample: CompletionOutput, tokenizer: Tokenizer,
            index: int, i: int) -> dict:
    echo = _echo(body, output, tokenizer, i)
    logprobs = None
    if sample.logprobs is not None:
        token_ids, token_logprobs = list(sample.token_ids), list(sample.logprobs)
        if body.echo:
            prompt_ids, prompt_logprobs = _echo_logprobs(output)
            token_ids, token_logprobs = prompt_ids + token_ids, prompt_logprobs + token_logprobs
        logprobs = completion_logprobs(token_ids, token_logprobs, tokenizer, 0)
    return {"index": index, "text": echo + sample.text, "logprobs": logprobs, "finish_reason": sample.finish_reason,
            "stop_reason": sample.stop_reason, **_token_ids(body, output, sample, True),
            **({"prompt_logprobs": vllm_prompt_logprobs(output, tokenizer)}
               if body.prompt_logprobs is not None else {})}


def _token_ids(body: CompletionRequest, output: RequestOutput, sample: CompletionOutput, first: bool) -> dict:
    """vLLM's return_token_ids: the choice's prompt ids (in its first chunk) and its output's."""
    if not body.return_token_ids:
        return {}
    return {"prompt_token_ids": output.prompt_token_ids if first else None, "token_ids": sample.token_ids}


async def _chunks(body: CompletionRequest, n: int, streams: list[RequestStream], tokenizer: Tokenizer,
                  response_id: str, created: int, model: str) -> AsyncIterator[dict]:
    head = {"id": response_id, "object": "text_completion", "created": created, "model": model}
    if body.include_usage:  # OpenAI: then every chunk has a usage field, null but in the last
        head["usage"] = None
    counted = Usage()
    finals: list[RequestOutput] = []
    firsts: dict[int, RequestOutput] = {}  # each request's first output: the one with its prompt logprobs
    offsets: dict[int, int] = {}  # text offset reached by each choice's logprobs
    async with aclosing(merged(streams)) as outputs:
        async for i, output in outputs:
            if body.prompt_only:
                output = prompt_only(output)
            counted.add(i, output)
            if output.finished:
                finals.append(output)
            first = firsts.setdefault(i, output)
            choices = []
            for sample in output.outputs:
                index = i * n + sample.index
                text, token_ids, token_logprobs = sample.text, sample.token_ids, sample.logprobs or []
                ids = _token_ids(body, output, sample, index not in offsets)
                if index not in offsets:  # a choice's first chunk leads with the echoed prompt
                    offsets[index] = 0
                    text = _echo(body, output, tokenizer, i) + text
                    if body.echo and sample.logprobs is not None:
                        prompt_ids, prompt_logprobs = _echo_logprobs(first)
                        token_ids, token_logprobs = prompt_ids + token_ids, prompt_logprobs + token_logprobs
                logprobs = None
                if sample.logprobs is not None:
                    logprobs = completion_logprobs(token_ids, token_logprobs, tokenizer, offsets[index])
                    offsets[index] += sum(len(t) for t in logprobs["tokens"])
                choices.append({"index": index, "text": text, "logprobs": logprobs,
                                "finish_reason": sample.finish_reason, "stop_reason": sample.stop_reason, **ids})
            # One choice a chunk, as OpenAI and vLLM send them: clients read choices[0]. The usage so far on each
            # chunk, when asked: a client can meter tokens and cost as they come.
            usage = {"usage": counted.block()} if body.continuous_usage else {}
            for choice in choices:
                yield {**head, "choices": [choice], **usage}
    if (status := deadline_status(finals)) is not None:  # the headers went out first: a late stream says so here
        yield {**head, "choices": [], "deadline_status": status,
               **({"usage": counted.block()} if body.continuous_usage else {})}
    if body.include_usage:
        yield {**head, "choices": [], "usage": counted.block()}


def completion_logprobs(token_ids: list[int], logprobs: list[TokenLogprob | None], tokenizer: Tokenizer,
                        text_offset: int) -> dict:
    """The legacy completions logprobs block: tokens, their logprobs, top alternatives, text offsets."""
    tokens = [tokenizer.token_text(t) for t in token_ids]
    offsets = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [None if lp is None else json_logprob(lp.logprob) for lp in logprobs],
        "top_logprobs": [None if lp is None else _top_by_text(lp, tokenizer) for lp in logprobs],
        "text_offset": offsets,
    }


def _top_by_text(lp: TokenLogprob, tokenizer: Tokenizer) -> dict[str, float]:
    """The alternatives keyed by their text, the chosen token among them (as OpenAI returns up to logprobs + 1)."""
    # Keyed by text, tokens can collide (each half of a character is "\ufffd"): the most likely one keeps the key.
    top: dict[str, float] = {}
    for token_id, logprob in sorted([*lp.top, (lp.token_id, lp.logprob)], key=lambda item: -item[1]):
        top.setdefault(tokenizer.token_text(token_id), json_logprob(logprob))
    return top
