"""POST /v1/chat/completions: messages rendered with the model's chat template, answered whole or streamed."""

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import replace

from fastapi import Request, Response

from tokenmill.engine.async_engine import RequestStream
from tokenmill.errors import InvalidRequestError
from tokenmill.loader.tokenizer import Tokenizer
from tokenmill.outputs import CompletionOutput, RequestOutput, TokenLogprob
from tokenmill.router.serving import route
from tokenmill.server.deadlines import STATUS_HEADER, deadline_status, with_deadlines
from tokenmill.server.protocol import ChatCompletionRequest
from tokenmill.server.reasoning import ReasoningStream, split_reasoning
from tokenmill.server.serving import (COST_HEADER, ChunkStream, EventStream, Usage, json_logprob, merged, new_id,
                                     state_of, vllm_prompt_logprobs)
from tokenmill.structured.tool_parser import (ArgumentsDelta, NamedCallStream, ToolCall, ToolCallStream,
                                              parse_tool_calls)


async def create_chat_completion(body: ChatCompletionRequest, request: Request,
                                 response: Response) -> dict | EventStream:
    """Answer one conversation with n choices."""
    answer = await answer_chat(body, request, response)
    return answer if isinstance(answer, dict) else EventStream(answer.chunks, answer.streams, answer.headers)


async def answer_chat(body: ChatCompletionRequest, request: Request, response: Response) -> dict | ChunkStream:
    """The chat.completion object, or the chunks of a streamed one (which /v1/responses also re-shapes)."""
    state = state_of(request)
    arrival = time.perf_counter()  # deadlines and latencies count from here: compiling and tokenizing take time too
    params = with_deadlines(request, body.sampling_params(state.sampling_defaults(body.model)))
    if params.structured_output is not None:  # off the event loop: a large grammar takes seconds to compile
        await params.structured_output.compile_off_loop()
    tools, mode = body.tool_dicts(), body.tool_mode
    # `route` renders and tokenizes off the event loop: a long conversation must not stall other streams.
    routed = await route(state, body.model, lambda model: [
        body.truncated(body.prompt_token_ids(model.tokenizer), model.max_model_len, params.max_tokens)
    ], params, bool(body.stream))
    model, tokenizer = routed.model, routed.model.tokenizer
    response_id = new_id("chatcmpl")
    try:
        streams = await routed.start(state, response_id, arrival)
    except InvalidRequestError as exc:
        if exc.param == "prompt":  # chat requests have messages, not a prompt
            exc.param = "messages"
        raise
    created = int(time.time())
    reasoning_parser = state.config.reasoning_parser
    if reasoning_parser == "deepseek_r1" and params.structured_output is not None:
        # A grammar holds from the first token, so no </think> can come: only a <think> the grammar allows is
        # thinking (vLLM starts the grammar after the thinking instead).
        reasoning_parser = "qwen3"
    if body.stream:
        chunks = _chunks(body, params.n, streams[0], tokenizer, response_id, created, model.name,
                         routed.prompts[0], reasoning_parser)
        return ChunkStream(chunks, streams, routed.headers())
    (output,), usage_block = await routed.finish(state, request, streams, response_id)
    model, tokenizer = routed.model, routed.model.tokenizer  # cascade may have moved it to a stronger model
    choices = []
    for sample in output.outputs:
        reasoning, text = split_reasoning(sample.text, reasoning_parser) if reasoning_parser else (None, sample.text)
        # As vLLM: an answer that is all thinking has no content.
        message: dict = {"role": "assistant", "content": text if text or reasoning is None else None}
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        finish_reason = sample.finish_reason
        if mode == "named":
            # The text is the named function's arguments alone, whole or cut short; the call finishes with "stop"
            # (or "length"), as in OpenAI and vLLM.
            message = {**message, "content": None, "tool_calls": [
                {"id": new_id("call"), "type": "function", "function": {"name": body.forced_name, "arguments": text}}]}
        elif tools:
            content, calls = parse_tool_calls(text, body.forced_names)
            calls = calls[:1] if body.parallel_tool_calls is False else calls  # under auto too, as vLLM
            if not calls and body.forced_names:  # a forced call cut before a name: no tags as content either
                message["content"] = content
            elif calls:
                message = {**message, "content": content,
                           "tool_calls": [{"id": new_id("call"), "type": "function",
                                           "function": {"name": c.name, "arguments": c.arguments}} for c in calls]}
                # The model's own choice of calls finishes with "tool_calls".
                finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
        if body.include_reasoning is False:
            message.pop("reasoning_content", None)
        choices.append({
            "index": sample.index,
            "message": message,
            "logprobs": None if sample.logprobs is None else chat_logprobs(sample.token_ids, sample.logprobs, tokenizer),
            "finish_reason": finish_reason,
            "stop_reason": sample.stop_reason,
            **({"token_ids": sample.token_ids} if body.return_token_ids else {}),
        })
    response.headers[COST_HEADER] = repr(usage_block["cost"])
    if (status := deadline_status([output])) is not None:  # a late answer says so: "missed"
        response.headers[STATUS_HEADER] = status
    response.headers.update(routed.headers())
    return {
        "id": response_id, "object": "chat.completion", "created": created, "model": model.name,
        "choices": choices, "usage": usage_block,
        **({"prompt_token_ids": output.prompt_token_ids} if body.return_token_ids else {}),
        **({"prompt_logprobs": vllm_prompt_logprobs(output, tokenizer)} if body.prompt_logprobs is not None else {}),
    }


async def _chunks(body: ChatCompletionRequest, n: int, stream: RequestStream, tokenizer: Tokenizer,
                  response_id: str, created: int, model: str, prompt: list[int],
                  reasoning_parser: str | None) -> AsyncIterator[dict]:
    head = {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": model}
    if body.include_usage:  # OpenAI: then every chunk has a usage field, null but in the last
        head["usage"] = None
    # As OpenAI: each choice opens with a chunk that only names the role; before any output, its usage (when asked
    # for on every chunk) counts the prompt alone, as vLLM's. One choice a chunk, here and below: clients read
    # choices[0].
    before = {"prompt_tokens": len(prompt), "completion_tokens": 0, "total_tokens": len(prompt)}
    for i in range(n):
        yield {**head, "choices": [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        ], **({"usage": before} if body.continuous_usage else {}),
            **({"prompt_token_ids": prompt} if body.return_token_ids else {})}
    counted = Usage()

    def chunk(choices: list[dict]) -> dict:
        # The usage so far on each chunk, when asked: a client can meter tokens and cost as they come.
        return {**head, "choices": choices, **({"usage": counted.block()} if body.continuous_usage else {})}

    finals: list[RequestOutput] = []
    # With tools on offer each choice's text goes through a parser, which holds back what may be a call.
    parsers: dict[int, ToolCallStream | NamedCallStream] = {}
    if body.tool_mode == "named":
        parsers = {i: NamedCallStream(body.forced_name) for i in range(n)}
    elif body.tool_dicts():
        parsers = {i: ToolCallStream(body.forced_names) for i in range(n)}
    # Before it, with a reasoning parser, the thinking is split off each choice's text.
    thinking = {i: ReasoningStream(reasoning_parser) for i in range(n)} if reasoning_parser else {}
    async with aclosing(merged([stream])) as outputs:
        async for _, output in outputs:
            counted.add(0, output)
            if output.finished:
                finals.append(output)
            samples, reasoning = [], {}
            for sample in output.outputs:
                if thinking:
                    parts = [thinking[sample.index].feed(sample.text)]
                    if sample.finish_reason is not None:
                        parts.append(thinking[sample.index].finish())
                    shown = body.include_reasoning is not False
                    reasoning[sample.index] = "".join(r for r, _ in parts) if shown else ""
                    sample = replace(sample, text="".join(c for _, c in parts))
                samples.append(sample)
            if parsers:
                for sample in samples:
                    if reasoning.get(sample.index):
                        yield chunk([{"index": sample.index, "delta": {"reasoning_content": reasoning[sample.index]},
                                      "logprobs": None, "finish_reason": None}])
                    for choice in _tool_choices(sample, parsers[sample.index], tokenizer,
                                                body.parallel_tool_calls is False,
                                                body.return_token_ids):
                        yield chunk([choice])
                continue
            for sample in samples:
                yield chunk([{
                    "index": sample.index,
                    "delta": {**({"reasoning_content": reasoning[sample.index]} if reasoning.get(sample.index) else {}),
                              **({"content": sample.text} if sample.text else {})},
                    "logprobs": None if sample.logprobs is None else chat_logprobs(sample.token_ids, sample.logprobs,
                                                                                   tokenizer),
                    "finish_reason": sample.finish_reason,
                    "stop_reason": sample.stop_reason,
                    **({"token_ids": sample.token_ids} if body.return_token_ids else {}),
                }])
    if (status := deadline_status(finals)) is not None:  # the headers went out first: a late stream says so here
        yield {**chunk([]), "deadline_status": status}
    if body.include_usage:
        yield {**head, "choices": [], "usage": counted.block()}


def _tool_choices(sample: CompletionOutput, parser: ToolCallStream | NamedCallStream, tokenizer: Tokenizer,
                  single: bool, token_ids: bool) -> list[dict]:
    """One choice delta per parsed event: content, or a call (its id, type and name, then its arguments, as OpenAI);
    with single (parallel_tool_calls false), the first call alone, as vLLM."""
    events = parser.feed(sample.text) + (parser.finish() if sample.finish_reason is not None else [])
    deltas: list[dict] = []
    index = parser.num_calls - sum(isinstance(e, ToolCall) for e in events)  # the first new call's index
    for event in events:
        if isinstance(event, ToolCall):
            if index == 0 or not single:
                deltas.append({"tool_calls": [{"index": index, "id": new_id("call"), "type": "function",
                                               "function": {"name": event.name, "arguments": ""}}]})
                deltas.append({"tool_calls": [{"index": index, "function": {"arguments": event.arguments}}]})
            index += 1
        elif isinstance(event, ArgumentsDelta):  # more of the call just opened
            deltas.append({"tool_calls": [{"index": index - 1, "function": {"arguments": event.text}}]})
        else:
            deltas.append({"content": event})
    finish_reason = sample.finish_reason
    # A named function's call finishes with "stop", as in OpenAI and vLLM.
    if finish_reason == "stop" and parser.num_calls and not isinstance(parser, NamedCallStream):
        finish_reason = "tool_calls"
    if not deltas and (finish_reason is not None or sample.logprobs or token_ids and sample.token_ids):
        deltas.append({})
    logprobs = None if sample.logprobs is None else chat_logprobs(sample.token_ids, sample.logprobs, tokenizer)
    return [
        {"index": sample.index, "delta": delta, "logprobs": logprobs if i == 0 else None,
         "finish_reason": finish_reason if i == len(deltas) - 1 else None,
         "stop_reason": sample.stop_reason if i == len(deltas) - 1 else None,
         **({"token_ids": sample.token_ids if i == 0 else []} if token_ids else {})}
        for i, delta in enumerate(deltas)
    ]


def chat_logprobs(token_ids: list[int], logprobs: list[TokenLogprob], tokenizer: Tokenizer) -> dict:
    """The chat logprobs block: per token its text, logprob, UTF-8 bytes and top alternatives."""

    def entry(token_id: int, logprob: float) -> dict:
        # `bytes` are the token's own bytes, so a client can rebuild characters split across tokens; `token` is
        # them as text, a special token's too (as vLLM shows <|im_end|>), not the nothing it adds to content.
        raw = tokenizer.token_bytes(token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": json_logprob(logprob), "bytes": list(raw)}

    return {
        "content": [
            {**entry(t, lp.logprob), "top_logprobs": [entry(alt, p) for alt, p in lp.top]}
            for t, lp in zip(token_ids, logprobs)
        ]
    }
