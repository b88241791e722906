"""LLMEngine: requests in, one scheduled model step at a time, outputs and timestamps out."""

import itertools
from difflib import SequenceMatcher
import logging
import time
from dataclasses import dataclass

import torch

from tokenmill.config import EngineConfig
from tokenmill.cost.accounting import CostAccountant
from tokenmill.cost.prices import machine_price
from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.deadlines import DeadlineKeeper
from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.model_runner import ModelRunner
from tokenmill.engine.sampler import Sampler, SamplerOutput
from tokenmill.engine.scheduler import Scheduler, SchedulerOutput
from tokenmill.engine.sequence import Sequence
from tokenmill.errors import InvalidRequestError, PromptTooLongError
from tokenmill.loader.source import ModelSource, open_model
from tokenmill.outputs import EngineStats, RequestMetrics, RequestOutput, TokenLogprob
from tokenmill.sampling import SamplingParams
from tokenmill.spec_decode.drafter import Drafter
from tokenmill.spec_decode.model_proposer import build_proposer, load_draft

logger = logging.getLogger(__name__)


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    metrics: RequestMetrics
    # Prompt logprobs go out once, in the request's first output.
    prompt_logprobs_sent: bool = False


class LLMEngine:
    """Owns the scheduler, model runner and sampler; only one thread may drive it."""

    def __init__(self, config: EngineConfig, source: ModelSource | None = None) -> None:
        config.check_device()
        self.config = config
        self.source = source or open_model(config.model)
        self.tokenizer = self.source.tokenizer
        self.model_config = self.source.config
        positions = self.model_config.max_position_embeddings
        _check_max_model_len(config.max_model_len, positions, None)  # before the weights load: they cannot change it
        if config.num_threads:  # before any weights load: quantizing them at load time runs on torch's threads
            torch.set_num_threads(config.num_threads)
        draft = load_draft(config, self.source)
        self.runner = ModelRunner(config, self.source, shared_block_bytes=draft.block_bytes if draft else 0)
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching,
                                          self.runner.sliding_window, self.runner.num_sliding_blocks)
        self.scheduler = Scheduler(config, self.block_manager)
        self.sampler = Sampler()
        pool_tokens = self.runner.num_blocks * config.block_size
        context_limit = self.block_manager.context_limit(config.max_num_batched_tokens) or positions
        _check_max_model_len(config.max_model_len, positions, context_limit)
        self.max_model_len = min(config.max_model_len or positions, positions, context_limit)
        self.requests: dict[str, _Request] = {}
        self.failures: dict[str, Exception] = {}  # see take_failures
        # The requests the current step runs, once it has scheduled them; None before: a step that fails then may
        # have left any request in a bad state, one that fails after only those it ran.
        self.stepping: set[str] | None = None
        self._seq_ids = itertools.count()
        price = machine_price(config.price_per_hour, config.device)  # after the runner has set torch's threads
        self.cost = CostAccountant(price.usd_per_hour)
        self.deadlines = DeadlineKeeper(config, self.scheduler)
        self.drafter = Drafter(config.speculative_config, build_proposer(config, self.source, self.runner, draft))
        penalty = self.source.sampling_defaults.get("repetition_penalty", 1.0)
        if config.speculative_config is not None and penalty != 1.0:
            # Penalized sequences are never drafted for: a draft row's penalties would need the drafts before it.
            logger.warning("%s recommends repetition_penalty %g: requests that leave it unset are not speculated",
                           self.source.name, penalty)
        logger.info("engine ready: %s, KV capacity %d tokens, max_model_len %d",
                    self.source.name, pool_tokens, self.max_model_len)
        logger.info("pricing compute time at %s", price.basis)

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
        fit_context: bool = False,
    ) -> None:
        """Validate and queue a request; raises InvalidRequestError (DeadlineError: a deadline it cannot meet) first.

        fit_context: a max_tokens past the context stops there (finish_reason "length"), as vLLM's offline engine
        does, rather than being refused, as its server (and this engine otherwise) refuses it.
        """
        params = params or SamplingParams()
        fit_context = fit_context or params.fit_context
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self._check_prompt(token_ids, params, fit_context)
        room = self.max_model_len - len(token_ids)
        max_tokens = room if params.max_tokens is None else params.max_tokens
        if fit_context:
            max_tokens = min(max_tokens, room)
        elif params.min_tokens > max_tokens:  # max_tokens unset: the room left, which vLLM's server checks it against
            raise InvalidRequestError(f"min_tokens={params.min_tokens} is more than the {room} tokens this "
                                      f"{len(token_ids)}-token prompt leaves in the {self.max_model_len}-token "
                                      "context", param="min_tokens")
        arrival = time.perf_counter() if arrival_time is None else arrival_time
        prediction = self.tokenizer.encode(params.prediction, add_special_tokens=False) if params.prediction else []
        metrics = RequestMetrics(arrival, price_per_hour=self.cost.price_per_hour, queued_time=time.perf_counter())
        request = _Request(request_id, text, token_ids, params, [], metrics)
        for index in range(params.n):
            seq = Sequence(
                next(self._seq_ids), request_id, index, token_ids, params, max_tokens, self.tokenizer.eos_token_ids,
                IncrementalDetokenizer(self.tokenizer, token_ids, params.stop, params.include_stop_str_in_output,
                                       params.skip_special_tokens),
                arrival,
                seed=None if params.seed is None else params.seed + index,
                parent=request.seqs[0] if index and self.config.enable_prefix_caching else None,
                first=request.seqs[0] if index else None,
            )
            seq.prediction_token_ids = prediction
            request.seqs.append(seq)
        self.deadlines.check_new(request.seqs, time.perf_counter())  # refuses before anything is queued
        for seq in request.seqs:
            self.scheduler.add(seq)
        self.requests[request_id] = request

    def _check_prompt(self, token_ids: list[int], params: SamplingParams, fit_context: bool) -> None:
        if not token_ids:
            raise InvalidRequestError("prompt is empty; give at least one token", param="prompt")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in token_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab}) for this model", param="prompt")
        if any(not 0 <= t < vocab for t in params.stop_token_ids):
            raise InvalidRequestError(f"stop_token_ids must be in [0, {vocab}) for this model", param="stop_token_ids")
        if any(not 0 <= t < vocab for t in params.logit_bias or {}):
            raise InvalidRequestError(f"logit_bias token ids must be in [0, {vocab}) for this model",
                                      param="logit_bias")
        counted = params.max_tokens if params.max_tokens is not None and not fit_context else None
        wanted = len(token_ids) + (counted or 1)
        if wanted > self.max_model_len:
            # OpenAI's and vLLM's opening words: client libraries (litellm, LangChain) know a context overflow by them.
            asked = (f"you requested {wanted} tokens ({len(token_ids)} in the prompt, {counted} in the completion); "
                     "shorten the prompt or lower max_tokens" if counted else
                     f"the prompt is {len(token_ids)} tokens, which leaves no room for a token; shorten the prompt")
            raise PromptTooLongError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, {asked}",
                param="prompt", prompt_tokens=len(token_ids), max_tokens=counted, context=self.max_model_len,
            )

    def abort(self, request_id: str, failed: bool = False) -> RequestOutput | None:
        """Stop a request now and return its KV blocks to the pool; returns its last output if it was live."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq)
                # A failed request's undecoded bytes stay so: decoding them may be what failed.
                seq.end("abort", decode_rest=not failed)
        _finish(request, time.perf_counter())
        return self._output(request)

    def has_unfinished(self) -> bool:
        """True while any request is queued or running."""
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        """Current load (requests, not samples) and the cumulative cache and preemption counters."""
        bm = self.block_manager
        pool = bm.fullest_pool  # what the KV usage gauge reports: the pool closest to refusing a sequence
        return EngineStats(
            num_running=len({s.request_id for s in self.scheduler.running}),
            num_waiting=len({s.request_id for s in self.scheduler.waiting} - {s.request_id for s in self.scheduler.running}),
            num_free_blocks=len(pool.free_blocks),
            num_blocks=pool.num_blocks,
            prefix_queries=bm.prefix_queries,
            prefix_hits=bm.prefix_hits,
            num_preemptions=self.scheduler.num_preemptions,
            busy_seconds=self.cost.busy_seconds,
            drafts=self.drafter.counters.copy(),
            uptime_seconds=self.cost.uptime(),
            price_per_hour=self.cost.price_per_hour,
            num_waiting_tokens=sum(s.num_uncomputed_tokens for s in self.scheduler.waiting),
        )

    def step(self) -> list[RequestOutput]:
        """Run one scheduled model step; return what is new for each request that made visible progress."""
        started = time.perf_counter()
        self.stepping = None
        dropped = self._drop_infeasible(started)
        self.drafter.propose(self.scheduler.running, self.block_manager, self.config.max_num_batched_tokens)
        plan = self.scheduler.schedule()
        self.stepping = {seq.request_id for seq, _ in plan.scheduled}
        if not plan.scheduled:
            return dropped
        work = plan.work()
        now = time.perf_counter()
        for seq, _ in plan.scheduled:
            metrics = self.requests[seq.request_id].metrics
            metrics.first_scheduled_time = metrics.first_scheduled_time or now
        try:
            out = self.runner.execute(plan.scheduled)
            # NOTE: sample before recording progress, so a failure leaves every sequence as it was.
            drafts = [seq.draft_token_ids for seq in out.sample_seqs]
            sampled = self.sampler(out.logits, out.sample_seqs, drafts)
            failed = _drop_failed_samples(plan, out.sample_seqs, sampled)
            self.drafter.record(out.sample_seqs, sampled.token_ids)
            for seq, start, logits in out.prompt_logits:
                targets = seq.token_ids[start + 1 : start + 1 + logits.shape[0]]
                seq.set_prompt_logprobs(start, self.sampler.prompt_logprobs(logits, targets,
                                                                            seq.params.prompt_logprobs or 0))
            before = [seq.num_output_tokens for seq in out.sample_seqs]
            failed |= self._update(plan, out.sample_seqs, sampled.token_ids, sampled.logprobs)
        except Exception:
            # The machine was busy for the failed step too, and its requests pay for it (their costs add up to the
            # machine's); a part of a step is no sample of a step's cost.
            self._charge(work, time.perf_counter() - started, sample=False)
            raise
        now = time.perf_counter()
        self._charge(work, now - started)
        self.drafter.observe(work, now - started)
        self.deadlines.observe(work, now - started)
        touched: dict[str, _Request] = {}
        for seq, had in zip(out.sample_seqs, before):
            request = self.requests[seq.request_id]
            metrics = request.metrics
            metrics.first_token_time = metrics.first_token_time or now
            metrics.token_times += [now] * (seq.num_output_tokens - had)
            metrics.token_samples += [seq.index] * (seq.num_output_tokens - had)
            touched[seq.request_id] = request
        outputs = dropped
        for request in touched.values():
            if request.request_id in failed:
                continue  # its last output, this step's tokens included, comes from its abort (_fail)
            if all(s.is_finished for s in request.seqs):
                _finish(request, now)
                _judge_deadline(request, now)
                del self.requests[request.request_id]
            if (output := self._output(request)) is not None:
                outputs.append(output)
        return self._fail(failed, outputs) if failed else outputs

    def take_failures(self) -> dict[str, Exception]:
        """Requests that failed on their own since the last call (each already aborted), with their errors."""
        failures, self.failures = self.failures, {}
        return failures

    def _update(self, plan: SchedulerOutput, seqs: list[Sequence], token_ids: list[list[int]],
                logprobs: list[list[TokenLogprob] | None]) -> dict[str, Exception]:
        """scheduler.update, where a sequence whose bookkeeping raises (detokenizer, stop strings, grammar) fails its
        request alone; returns those requests' errors."""
        failed: dict[str, Exception] = {}
        computed = [seq.num_computed_tokens for seq, _ in plan.scheduled]  # the one cost on the hot path
        while True:
            try:
                self.scheduler.update(plan, seqs, token_ids, logprobs)
                return failed
            except Exception as exc:
                # NOTE: update records the scheduled sequences in order, each one's computed count first, so the
                # last sequence whose count moved is the one that raised, and those after it are untouched: fail
                # its request and record the rest again. tests/engine/test_faults.py pins this down.
                moved = [i for i, ((seq, _), n) in enumerate(zip(plan.scheduled, computed))
                         if seq.num_computed_tokens != n]
                if not moved:
                    raise
                bad = plan.scheduled[moved[-1]][0]
                if isinstance(exc, InvalidRequestError):  # the request's own doing (its grammar): no bug to trace
                    logger.warning("request %s failed: %s", bad.request_id, str(exc).splitlines()[0])
                else:
                    logger.exception("recording request %s's tokens failed; failing that request alone",
                                     bad.request_id)
                failed[bad.request_id] = exc
                rest = [(item, n) for item, n in zip(plan.scheduled[moved[-1] + 1 :], computed[moved[-1] + 1 :])
                        if item[0].request_id not in failed]
                plan = SchedulerOutput([item for item, _ in rest])
                computed = [n for _, n in rest]

    def _fail(self, failed: dict[str, Exception], outputs: list[RequestOutput]) -> list[RequestOutput]:
        """Abort the requests that failed in this step, keeping their errors for take_failures; the step's outputs
        with each failed request's last one instead of its others."""
        outputs = [output for output in outputs if output.request_id not in failed]
        for request_id, exc in failed.items():
            self.failures[request_id] = exc.with_traceback(None)  # logged already; its frames hold a step's tensors
            if (output := self.abort(request_id, failed=True)) is not None:
                outputs.append(output)
        return outputs

    def _drop_infeasible(self, now: float) -> list[RequestOutput]:
        """End, with their error, the waiting requests that can no longer meet their deadline; their last outputs."""
        outputs = []
        for seq, error in self.deadlines.infeasible(now):
            request = self.requests.get(seq.request_id)
            # A sibling sample of a request dropped a moment ago; or one served already (a sample ran, or this one
            # was preempted): that is answered, and marked if late, as an admitted request is.
            if request is None or request.metrics.first_scheduled_time is not None:
                continue
            request.metrics.deadline_status, request.metrics.deadline_error = "dropped", str(error)
            if (output := self.abort(seq.request_id)) is not None:
                outputs.append(output)
        return outputs

    def _charge(self, work: list[tuple[Sequence, int, int]], seconds: float, sample: bool = True) -> None:
        """Split a step's measured seconds among the requests in it, by the work each sequence did."""
        shares = self.cost.charge([(prefill, decode) for _, prefill, decode in work], seconds, sample)
        for (seq, _, _), (prefill_seconds, decode_seconds) in zip(work, shares):
            metrics = self.requests[seq.request_id].metrics
            metrics.prefill_seconds += prefill_seconds
            metrics.decode_seconds += decode_seconds

    def _output(self, request: _Request) -> RequestOutput | None:
        samples = [delta for seq in request.seqs if (delta := seq.take_delta()) is not None]
        if not samples:
            return None
        prompt_logprobs = None
        if request.params.prompt_logprobs is not None and not request.prompt_logprobs_sent:
            # None first, as vLLM: the first prompt token has nothing before it to be scored from.
            prompt_logprobs, request.prompt_logprobs_sent = [None, *request.seqs[0].prompt_logprobs], True
        return RequestOutput(
            request.request_id, request.prompt, request.prompt_token_ids, samples,
            finished=all(s.is_finished for s in request.seqs),
            num_cached_tokens=request.seqs[0].num_cached_tokens,
            metrics=request.metrics,
            prompt_logprobs=prompt_logprobs,
        )


def _check_max_model_len(asked: int | None, positions: int, context_limit: int | None) -> None:
    """Refuse a --max-model-len the model or the KV pool (once sized) cannot give, as vLLM does, rather than serve
    a shorter one."""
    if asked is not None and asked > positions:
        raise InvalidRequestError(f"max_model_len={asked} is more than the {positions} positions the model was "
                                  "trained for", param="max_model_len")
    if asked is not None and context_limit is not None and asked > context_limit:
        raise InvalidRequestError(f"max_model_len={asked} is more than the KV cache holds for one sequence "
                                  f"({context_limit} tokens); raise --kv-cache-memory or lower --max-model-len",
                                  param="max_model_len")


def _drop_failed_samples(plan: SchedulerOutput, seqs: list[Sequence], sampled: SamplerOutput) -> dict[str, Exception]:
    """Take the requests whose sampling failed out of this step's plan and samples (in place); their errors."""
    if not sampled.failed:
        return {}
    failed = {seqs[i].request_id: exc for i, exc in sampled.failed.items()}
    kept = [i for i, seq in enumerate(seqs) if seq.request_id not in failed]
    seqs[:] = [seqs[i] for i in kept]
    sampled.token_ids[:] = [sampled.token_ids[i] for i in kept]
    sampled.logprobs[:] = [sampled.logprobs[i] for i in kept]
    plan.scheduled[:] = [(seq, n) for seq, n in plan.scheduled if seq.request_id not in failed]
    return failed


def _judge_deadline(request: _Request, now: float) -> None:
    """Mark an answered request with a deadline as met or missed (an aborted one was not answered: no mark)."""
    params, metrics = request.params, request.metrics
    waited = now - metrics.arrival_time
    first = (metrics.first_token_time or now) - metrics.arrival_time
    if params.deadline_ms is None and params.ttft_deadline_ms is None:
        return
    late = ((params.deadline_ms is not None and waited > params.deadline_ms / 1000)
            or (params.ttft_deadline_ms is not None and first > params.ttft_deadline_ms / 1000))
    metrics.deadline_status = "missed" if late else "met"


def _finish(request: _Request, now: float) -> None:
    """Stamp a request's end, and count how much of its predicted output the answers kept."""
    request.metrics.finished_time = now
    for seq in request.seqs:
        if seq.prediction_token_ids:
            # Tokens of the prediction found in the answer in order: OpenAI's accepted_prediction_tokens.
            matcher = SequenceMatcher(None, seq.prediction_token_ids, seq.output_token_ids, autojunk=False)
            kept = sum(block.size for block in matcher.get_matching_blocks())
            request.metrics.accepted_prediction_tokens += kept
            request.metrics.rejected_prediction_tokens += len(seq.prediction_token_ids) - kept
