"""llama.cpp's native server API, for its clients (its web UI's successors, SillyTavern, Continue, llama.vim):
POST /completion, GET /props and POST /apply-template, answered by the same engine as /v1/*.

A completion answers with llama.cpp's fields (content, tokens, stop_type, timings, ...) and tokenmill's usage and
cost beside them; streamed, each event carries the new text and the last the whole account, with no [DONE].
"""

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from importlib.metadata import version

from fastapi import Request, Response

from tokenmill.errors import InvalidRequestError, PromptTooLongError
from tokenmill.outputs import CompletionOutput, RequestOutput, accumulate
from tokenmill.router import AUTO
from tokenmill.router.serving import route
from tokenmill.sampling import SamplingParams
from tokenmill.server.completions import prompt_only
from tokenmill.server.deadlines import STATUS_HEADER, deadline_status, with_deadlines
from tokenmill.server.llama_cpp_protocol import NativeCompletionRequest
from tokenmill.server.protocol import ChatCompletionRequest
from tokenmill.server.serving import (COST_HEADER, EventStream, ServedModel, json_logprob, merged, new_id, sse,
                                      state_of, usage)

_MISSING = object()  # a response field the answer lacks


async def create_completion(body: NativeCompletionRequest, request: Request, response: Response) -> dict | EventStream:
    """Complete one prompt, whole or streamed, in llama.cpp's shapes."""
    state = state_of(request)
    arrival = time.perf_counter()
    try:
        params = with_deadlines(request, body.sampling_params())
        if params.structured_output is not None:  # off the event loop: a large grammar takes seconds to compile
            await params.structured_output.compile_off_loop()
        has_ids = not isinstance(body.prompt, str) and any(isinstance(p, int) for p in body.prompt)
        routed = await route(state, body.model, lambda model: [body.token_ids(model.tokenizer)], params,
                             body.stream, token_ids=has_ids)
        # The params the model runs with (a copy under cascade), and those an escalation would run with.
        biases = body.token_biases(routed.model.tokenizer)
        for each in (routed.params, routed.asked):
            each.logit_bias = {**(each.logit_bias or {}), **biases} or None
        request_id = new_id("cmpl")
        streams = await routed.start(state, request_id, arrival)
    except PromptTooLongError as exc:
        if body.prompt_only:  # the one token run to evaluate it is ours, not a max_tokens the client sent
            raise PromptTooLongError(f"This model's maximum context length is {exc.context} tokens. However, the "
                                     f"prompt is {exc.prompt_tokens} tokens; evaluating it runs one token past it, so "
                                     f"it may be at most {exc.context - 1}", param="prompt") from exc
        raise
    except InvalidRequestError as exc:
        exc.param = body.their_param(exc.param)
        raise
    if body.stream:
        events = _events(body, routed.model, params, merged(streams))
        return EventStream(events, streams, routed.headers(), encode=lambda chunks: sse(chunks, done=False))
    (output,), block = await routed.finish(state, request, streams, request_id)
    if body.prompt_only:
        output = prompt_only(output)
        block |= {"completion_tokens": 0, "total_tokens": block["prompt_tokens"]}
    sample = output.outputs[0]
    # As /v1/completions: what it cost, whether it met its deadline, which model answered.
    response.headers[COST_HEADER] = repr(block["cost"])
    if (status := deadline_status([output])) is not None:
        response.headers[STATUS_HEADER] = status
    response.headers.update(routed.headers())
    return _selected({**_result(body, routed.model, params, output, sample, sample.text, sample.token_ids),
                      "usage": block}, body.response_fields)


async def get_props(request: Request) -> dict:
    """The server's settings as llama.cpp's /props gives them: the defaults a /completion gets, the context, the
    model and its chat template."""
    model = state_of(request).model(None)
    config = model.engine.engine.config
    defaults = NativeCompletionRequest(prompt="")
    return {
        "default_generation_settings": {"n_ctx": model.max_model_len, "params": _settings(defaults, model)},
        "total_slots": config.max_num_seqs, "model_path": config.model, "model_alias": model.name,
        "chat_template": model.tokenizer.chat_template or "", "bos_token": model.tokenizer.bos_token or "",
        "eos_token": model.tokenizer.eos_token or "", "modalities": {"vision": False, "audio": False},
        "build_info": f"tokenmill {version('tokenmill')}", "is_sleeping": False,
    }


async def apply_template(body: ChatCompletionRequest, request: Request) -> dict:
    """The prompt text a chat (as /v1/chat/completions takes it) is to the model it names, rendered, not answered; a
    final assistant message is continued (llama.cpp's prefill) unless the body says otherwise."""
    model = state_of(request).model(None if body.model == AUTO else body.model)  # as count_tokens takes auto
    if body.messages[-1].role == "assistant" and body.continue_final_message is None \
            and body.add_generation_prompt is None:
        body = body.model_copy(update={"continue_final_message": True})
    ids = await asyncio.to_thread(body.prompt_token_ids, model.tokenizer)
    return {"prompt": model.tokenizer.decode(ids, skip_special_tokens=False)}


async def _events(body: NativeCompletionRequest, model: ServedModel, params: SamplingParams,
                  outputs: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[dict]:
    """A stream's events: each delta's text and token ids, then the whole account with stop true."""
    whole: RequestOutput | None = None
    async with aclosing(outputs):
        async for _, output in outputs:
            whole = accumulate(whole, output)
            sample = output.outputs[0]
            if body.prompt_only or not (sample.text or sample.token_ids):
                continue
            yield {"index": 0, "content": sample.text, "tokens": sample.token_ids, "stop": False, "id_slot": 0,
                   "tokens_predicted": len(whole.outputs[0].token_ids), "tokens_evaluated": len(whole.prompt_token_ids),
                   **({"completion_probabilities": _probabilities(model, sample)} if body.n_probs else {})}
    assert whole is not None
    if body.prompt_only:
        whole = prompt_only(whole)
    # As llama.cpp's last event: the text already went out, so content and tokens are empty here. The headers went
    # out first: a late answer says so here.
    status = deadline_status([whole])
    yield _selected({**_result(body, model, params, whole, whole.outputs[0], "", []),
                     "usage": usage([whole]), **({"deadline_status": status} if status else {})}, body.response_fields)


def _result(body: NativeCompletionRequest, model: ServedModel, params: SamplingParams, output: RequestOutput,
            sample: CompletionOutput, content: str, tokens: list[int]) -> dict:
    """llama.cpp's completion object: the text, why it stopped, the prompt's and output's counts and timings."""
    reason = sample.stop_reason
    stop_type = "limit" if sample.finish_reason == "length" else "word" if isinstance(reason, str) else "eos"
    cached = output.num_cached_tokens
    # As llama-server: an answer stopped by the context's end (its max_tokens is only a cap) is truncated.
    truncated = stop_type == "limit" and len(output.prompt_token_ids) + len(sample.token_ids) >= model.max_model_len
    probabilities = _probabilities(model, sample) if body.n_probs and not body.stream else []
    if probabilities and stop_type == "word":  # as llama.cpp: the stop word's tokens are not the answer's
        probabilities = probabilities[:max(0, len(probabilities) - len(model.tokenizer.encode(reason, False)))]
    return {
        "index": 0, "content": content, "tokens": tokens if body.return_tokens or body.stream else [],
        "id_slot": 0, "stop": True, "model": model.name, "tokens_predicted": len(sample.token_ids),
        "tokens_evaluated": len(output.prompt_token_ids), "generation_settings": _settings(body, model, params),
        "prompt": model.tokenizer.decode(output.prompt_token_ids, skip_special_tokens=False),
        "has_new_line": "\n" in sample.text, "truncated": truncated, "stop_type": stop_type,
        # llama.cpp's slot holds the prompt and every output token but the last, fed back to it.
        "stopping_word": reason if stop_type == "word" else "",
        "tokens_cached": len(output.prompt_token_ids) + max(len(sample.token_ids) - 1, 0),
        "timings": _timings(output, sample, cached),
        **({"completion_probabilities": probabilities} if body.n_probs and not body.stream else {}),
    }


def _selected(result: dict, fields: list[str] | None) -> dict:
    """Only the fields asked for (all when none are, or the list is empty, as llama.cpp reads it); a nested one
    ("timings/prompt_n") under its path's name."""
    if not fields:
        return result
    picked = {}
    for field in fields:
        value: object = result
        for key in field.split("/"):
            value = value.get(key, _MISSING) if isinstance(value, dict) else _MISSING
        if value is not _MISSING:  # a field the answer lacks is left out, as llama.cpp does
            picked[field] = value
    return picked


def _settings(body: NativeCompletionRequest, model: ServedModel, params: SamplingParams | None = None) -> dict:
    """The sampling settings in llama.cpp's names (generation_settings, /props' defaults)."""
    return {
        "n_ctx": model.max_model_len, "model": model.name, "n_predict": body.n_predict,
        "seed": params.seed if params is not None and params.seed is not None else body.seed,
        "temperature": body.temperature, "top_k": body.top_k, "top_p": body.top_p, "min_p": body.min_p,
        "repeat_penalty": body.repeat_penalty, "repeat_last_n": body.repeat_last_n,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty, "stop": body.stop, "n_probs": body.n_probs,
        "ignore_eos": body.ignore_eos, "stream": body.stream, "grammar": body.grammar or "",
        "samplers": ["penalties", "top_k", "top_p", "min_p", "temperature"],
    }


def _timings(output: RequestOutput, sample: CompletionOutput, cached: int) -> dict:
    """llama.cpp's timings: the prompt's evaluation (the tokens not read from the cache) and the output's."""
    m = output.metrics
    started = m.first_scheduled_time if m.first_scheduled_time is not None else m.arrival_time
    first = m.first_token_time if m.first_token_time is not None else started
    last = m.token_times[-1] if m.token_times else first
    prompt_n, predicted_n = len(output.prompt_token_ids) - cached, len(sample.token_ids)
    prompt_ms, predicted_ms = (first - started) * 1e3, (last - first) * 1e3

    def rates(n: int, ms: float) -> tuple[float, float]:
        return (ms / n if n else 0.0), (n / ms * 1e3 if ms > 0 else 0.0)

    # As llama.cpp counts them: every output token over the time after the prompt's (whose step gave the first).
    (prompt_per_token, prompt_per_second), (predicted_per_token, predicted_per_second) = \
        rates(prompt_n, prompt_ms), rates(predicted_n, predicted_ms)
    return {"cache_n": cached, "prompt_n": prompt_n, "prompt_ms": prompt_ms, "prompt_per_token_ms": prompt_per_token,
            "prompt_per_second": prompt_per_second, "predicted_n": predicted_n, "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_per_token, "predicted_per_second": predicted_per_second}


def _probabilities(model: ServedModel, sample: CompletionOutput) -> list[dict]:
    """llama.cpp's completion_probabilities: per token its id, text, logprob, bytes and the top alternatives."""
    tokenizer = model.tokenizer

    def entry(token_id: int, logprob: float) -> dict:
        raw = tokenizer.token_bytes(token_id)
        return {"id": token_id, "token": raw.decode("utf-8", errors="replace"), "bytes": list(raw),
                "logprob": json_logprob(logprob)}

    return [{**entry(t, lp.logprob), "top_logprobs": [entry(alt, p) for alt, p in lp.top]}
            for t, lp in zip(sample.token_ids, sample.logprobs or [])]
