"""`auto` in the server: choose a request's model; under cascade, re-run an unsure answer on a stronger one."""

import asyncio
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from fastapi import Request

from tokenmill.engine.async_engine import RequestStream
from tokenmill.errors import InvalidRequestError, PromptTooLongError, TokenmillError
from tokenmill.outputs import RequestOutput
from tokenmill.router.policies import AUTO, Route, cheapest, escalate_to, fits, mean_logprob
from tokenmill.sampling import SamplingParams
from tokenmill.server.errors import APIError
from tokenmill.server.serving import ServedModel, ServerState, collect, submit, usage

# Non-streamed routed responses name the model that answered and why, for clients that read no bodies.
ROUTED_MODEL_HEADER = "x-tokenmill-routed-model"
ROUTE_REASON_HEADER = "x-tokenmill-route-reason"


@dataclass
class Routed:
    """The model a request runs on, its prompts in that model's tokens and the params it runs with; why, for `auto`."""

    model: ServedModel
    prompts: list[list[int]]
    params: SamplingParams  # under cascade, with logprobs the client may not have asked for
    asked: SamplingParams  # the client's own params
    route: Route | None = None  # None: the request named its model
    policy: str = ""  # the --router policy that chose the model (auto only)
    encoded: list[list[list[int]]] | None = None  # every model's prompts, in --model order (cascade only)
    fitting: list[int] | None = None  # the models whose context fits the request (cascade only)

    def headers(self) -> dict[str, str]:
        """The routing headers: empty unless the server chose the model."""
        if self.route is None:
            return {}
        return {ROUTED_MODEL_HEADER: _header_value(self.model.name),
                ROUTE_REASON_HEADER: _header_value(self.route.reason)}

    async def start(self, state: ServerState, response_id: str, arrival: float) -> list[RequestStream]:
        """Queue the request, which arrived at `arrival` (perf_counter), on its model. Outside cascade an `auto` request
        counts as routed once the model takes it (a refusal is answered by none); under cascade, once an answer is
        kept."""
        streams = await submit(state, self.model, self.prompts, self.params, response_id, arrival)
        if self.route is not None and self.encoded is None:
            state.metrics.observe_route(self.model.name, self.policy, self.route.kind)
        return streams

    async def finish(self, state: ServerState, request: Request, streams: list[RequestStream],
                     response_id: str) -> tuple[list[RequestOutput], dict]:
        """Whole outputs and their usage; under cascade an unsure answer is discarded and the next model answers."""
        outputs = await collect(request, streams)
        block = usage(outputs)
        if self.route is None or self.encoded is None or self.fitting is None:  # not a cascade
            return outputs, block
        answered = self.route.index
        self.route = escalate_to(mean_logprob(outputs), state.config.cascade_threshold, answered, self.fitting)
        if self.route.index != answered:
            stronger = list(state.models.values())[self.route.index]
            prompts = self.encoded[self.route.index]
            asked = _deadlines_left(self.asked, outputs[0].metrics.arrival_time)
            try:
                if asked is None:
                    raise InvalidRequestError("its deadline passed while the first model answered")
                streams = await submit(state, stronger, prompts, asked, f"{response_id}-escalated")
                escalated = await collect(request, streams)
            except (APIError, TokenmillError) as exc:
                if isinstance(exc, APIError) and exc.status == 499:  # the client is gone: nobody to answer
                    raise
                # Busy, stalled, refusing, or failed or dropped on the way: the answer in hand, made and paid for,
                # beats an error.
                self.route = Route(answered, f"cascade: {stronger.name!r} could not answer the escalation: {exc}",
                                   "escalation_refused")
            else:
                discarded = block
                self.model, self.prompts, self.params = stronger, prompts, asked
                outputs = escalated
                block = usage(outputs)
                # Both runs were paid for, so the cost says so; the tokens are those of the answer the client gets.
                block["cost"] += discarded["cost"]
                block["cost_details"]["compute_seconds"] += discarded["cost_details"]["compute_seconds"]
        if self.route.index == answered and self.asked.logprobs is None:
            # Asked for by the router only, so not the client's to see.
            for output in outputs:
                for sample in output.outputs:
                    sample.logprobs = None
        state.metrics.observe_route(self.model.name, self.policy, self.route.kind)
        return outputs, block


def _header_value(text: str) -> str:
    """text as an HTTP header value: Latin-1 (a model may be named in any script: the rest backslash-escaped) and no
    control characters; else the response fails after its request was queued, or answered and paid for."""
    escaped = text.encode("latin-1", "backslashreplace").decode("latin-1")
    return "".join(c if c.isprintable() else " " for c in escaped)


def _deadlines_left(params: SamplingParams, arrived: float) -> SamplingParams | None:
    """params with its deadlines shortened by the time since the client asked (they run from its request, not from
    an escalation); None if one has passed."""
    elapsed_ms = (time.perf_counter() - arrived) * 1000
    left = {name: value - elapsed_ms for name in ("deadline_ms", "ttft_deadline_ms")
            if (value := getattr(params, name)) is not None}
    if any(ms <= 0 for ms in left.values()):
        return None
    return replace(params, **left)


async def route(state: ServerState, requested: str | None, encode: Callable[[ServedModel], list[list[int]]],
                params: SamplingParams, stream: bool, token_ids: bool = False) -> Routed:
    """The model a request runs on: the one it names, or for `auto` the one the server's policy picks.

    encode: the request's prompts as a model's token ids (by its tokenizer, cut to its context).
    token_ids: the request's prompts include token ids, which mean the same only to models sharing a tokenizer.
    """
    if requested != AUTO or AUTO in state.models:  # a model served under the name `auto` is just a model
        model = state.model(requested)
        # Off the event loop: a long prompt takes a while to tokenize and must not stall other streams.
        return Routed(model, await asyncio.to_thread(encode, model), params, params)
    models = list(state.models.values())
    policy = state.config.router
    if len(models) == 1:
        return Routed(models[0], await asyncio.to_thread(encode, models[0]), params, params,
                      Route(0, "only model", "only_model"), policy)
    # Off the event loop: the first time, a tokenizer's digest serializes all of it (12 MB for Gemma 3's).
    if ((token_ids or params.stop_token_ids or params.logit_bias)
            and len(await asyncio.to_thread(lambda: {model.tokenizer.fingerprint for model in models})) > 1):
        param = "prompt" if token_ids else "stop_token_ids" if params.stop_token_ids else "logit_bias"
        raise InvalidRequestError(f"{param} token ids mean different tokens to the served models (their tokenizers "
                                  "differ); name the model they are for rather than 'auto'", param=param)
    if policy == "cascade" and stream:
        raise APIError(400, "model 'auto' under --router cascade answers only non-streamed requests in this version; "
                       "set stream to false or name a model", param="stream", code="unsupported_stream")
    # Each model's own tokens: served models need not share a tokenizer, and contexts are counted in them.
    results = [await _encode_or_refuse(encode, model) for model in models]
    refusals = [r for r in results if isinstance(r, InvalidRequestError)]
    if len(refusals) == len(models):
        raise refusals[0]
    # A model that cannot take the request at all (a chat to a base model without a chat template) fits no context.
    encoded = [[] if isinstance(r, InvalidRequestError) else r for r in results]
    longest = [sys.maxsize if isinstance(r, InvalidRequestError) else max(len(p) for p in r) for r in results]
    # A max_tokens that is only a cap asks no model for room beyond the prompt's.
    asked_room = None if params.fit_context else params.max_tokens
    chosen = cheapest(longest, asked_room, [model.max_model_len for model in models])
    if chosen is None:
        largest = max(model.max_model_len for model in models)
        # The figures ride along: Anthropic's API words them its own way, which Claude Code reads.
        asked = (f"you requested {min(longest) + asked_room} tokens ({min(longest)} in the prompt at least, "
                 f"{asked_room} in the completion)" if asked_room else f"the prompt is {min(longest)} tokens at least")
        raise PromptTooLongError(f"This model's maximum context length is {largest} tokens (the largest of the served "
                                 f"models'). However, {asked}; shorten the prompt"
                                 f"{' or lower max_tokens' if asked_room else ''}", param="model",
                                 prompt_tokens=min(longest),
                                 max_tokens=params.max_tokens, context=largest)
    routed = Routed(models[chosen.index], encoded[chosen.index], params, params, chosen, policy)
    if policy == "cheapest":
        return routed
    routed.encoded = encoded
    routed.fitting = [i for i, (n, model) in enumerate(zip(longest, models))
                      if fits(n, asked_room, model.max_model_len)]
    if params.logprobs is None:  # the cascade judges the answer by its token logprobs
        routed.params = replace(params, logprobs=0)
    return routed


async def _encode_or_refuse(encode: Callable[[ServedModel], list[list[int]]],
                            model: ServedModel) -> list[list[int]] | InvalidRequestError:
    """A model's prompts for the request, or why that model cannot take it."""
    try:
        return await asyncio.to_thread(encode, model)
    except InvalidRequestError as exc:
        return exc
