"""LLMEngine: requests in, one scheduled model step at a time, outputs and timestamps out."""

import itertools
import logging
import time
from dataclasses import dataclass, field

from tokenmill.config import EngineConfig
from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.model_runner import ModelRunner
from tokenmill.engine.sampler import Sampler
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.sequence import Sequence, TokenLogprob
from tokenmill.errors import InvalidRequestError, PromptTooLongError
from tokenmill.loader.source import ModelSource, open_model
from tokenmill.sampling import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class RequestMetrics:
    """Timestamps (time.perf_counter) from which latency metrics are derived off the hot path."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    finished_time: float | None = None


@dataclass
class CompletionOutput:
    """One sample of a request: its text so far (stop-safe while streaming) and tokens."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None
    cumulative_logprob: float = 0.0


@dataclass
class RequestOutput:
    """Everything a caller sees of one request after a step."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int
    metrics: RequestMetrics
    # With SamplingParams.prompt_logprobs: entry i is prompt token i + 1 (complete once prefill is done).
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass
class EngineStats:
    """A snapshot of the engine's load and cumulative counters, for gauges and back-pressure."""

    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_blocks: int
    prefix_queries: int
    prefix_hits: int
    num_preemptions: int

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of KV blocks held by sequences (cached but unheld blocks count as free)."""
        return 1 - self.num_free_blocks / self.num_blocks


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    metrics: RequestMetrics
    stop_reasons: dict[int, str | int | None] = field(default_factory=dict)


class LLMEngine:
    """Owns the scheduler, model runner and sampler; only one thread may drive it."""

    def __init__(self, config: EngineConfig, source: ModelSource | None = None) -> None:
        self.config = config
        self.source = source or open_model(config.model)
        self.tokenizer = self.source.tokenizer
        self.model_config = self.source.config
        self.runner = ModelRunner(config, self.source)
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager)
        self.sampler = Sampler()
        pool_tokens = self.runner.num_blocks * config.block_size
        self.max_model_len = min(config.max_model_len or self.model_config.max_position_embeddings,
                                 self.model_config.max_position_embeddings, pool_tokens)
        self.requests: dict[str, _Request] = {}
        self._seq_ids = itertools.count()
        logger.info("engine ready: %s, KV capacity %d tokens, max_model_len %d",
                    self.source.name, pool_tokens, self.max_model_len)

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
    ) -> None:
        """Validate and queue a request; raises InvalidRequestError before anything is queued."""
        params = params or SamplingParams()
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self._check_prompt(token_ids, params)
        room = self.max_model_len - len(token_ids)
        max_tokens = room if params.max_tokens is None else params.max_tokens
        arrival = time.perf_counter() if arrival_time is None else arrival_time
        request = _Request(request_id, text, token_ids, params, [], RequestMetrics(arrival))
        eos = [] if params.ignore_eos else self.tokenizer.eos_token_ids
        for index in range(params.n):
            seq = Sequence(
                next(self._seq_ids), request_id, index, token_ids, params, max_tokens, eos,
                IncrementalDetokenizer(self.tokenizer, token_ids, params.stop, params.include_stop_str_in_output),
                arrival, priority,
                seed=None if params.seed is None else params.seed + index,
                parent=request.seqs[0] if index and self.config.enable_prefix_caching else None,
            )
            request.seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = request

    def _check_prompt(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise InvalidRequestError("prompt is empty; give at least one token", param="prompt")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in token_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab}) for this model", param="prompt")
        if any(not 0 <= t < vocab for t in params.stop_token_ids):
            raise InvalidRequestError(f"stop_token_ids must be in [0, {vocab}) for this model", param="stop_token_ids")
        wanted = len(token_ids) + (params.max_tokens or 1)
        if wanted > self.max_model_len:
            asked = f" and max_tokens is {params.max_tokens}, {wanted} in all" if params.max_tokens else ""
            raise PromptTooLongError(
                f"prompt is {len(token_ids)} tokens{asked}; this engine's context is {self.max_model_len} tokens; "
                "shorten the prompt or lower max_tokens",
                param="prompt",
            )

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and return its KV blocks to the pool; returns its final output if it was live."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        request.metrics.finished_time = time.perf_counter()
        return self._output(request)

    def has_unfinished(self) -> bool:
        """True while any request is queued or running."""
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        """Current load (requests, not samples) and the cumulative cache and preemption counters."""
        bm = self.block_manager
        return EngineStats(
            num_running=len({s.request_id for s in self.scheduler.running}),
            num_waiting=len({s.request_id for s in self.scheduler.waiting} - {s.request_id for s in self.scheduler.running}),
            num_free_blocks=bm.num_free_blocks,
            num_blocks=bm.num_blocks,
            prefix_queries=bm.prefix_queries,
            prefix_hits=bm.prefix_hits,
            num_preemptions=self.scheduler.num_preemptions,
        )

    def step(self) -> list[RequestOutput]:
        """Run one scheduled model step; return outputs of requests that produced tokens."""
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            return []
        now = time.perf_counter()
        for seq, _ in plan.scheduled:
            metrics = self.requests[seq.request_id].metrics
            metrics.first_scheduled_time = metrics.first_scheduled_time or now
        out = self.runner.execute(plan.scheduled)
        # NOTE: sample before recording progress, so a failure leaves every sequence as it was.
        sampled = self.sampler(out.logits, out.sample_seqs)
        for seq, start, logits in out.prompt_logits:
            targets = seq.token_ids[start + 1 : start + 1 + logits.shape[0]]
            # Slice assignment: a preempted sequence recomputes its prompt and rewrites equal values.
            seq.prompt_logprobs[start : start + len(targets)] = self.sampler.prompt_logprobs(
                logits, targets, seq.params.prompt_logprobs or 0
            )
        for seq, n in plan.scheduled:
            seq.num_computed_tokens += n
            self.block_manager.cache_full_blocks(seq)
        now = time.perf_counter()
        touched: dict[str, _Request] = {}
        for seq, token_id, logprob in zip(out.sample_seqs, sampled.token_ids, sampled.logprobs):
            request = self.requests[seq.request_id]
            self._append_token(request, seq, token_id, logprob, now)
            touched[seq.request_id] = request
        return [self._output(r) for r in touched.values()]

    def _append_token(
        self, request: _Request, seq: Sequence, token_id: int, logprob: TokenLogprob | None, now: float
    ) -> None:
        seq.token_ids.append(token_id)
        if logprob is not None:
            seq.logprobs.append(logprob)
            seq.cumulative_logprob += logprob.logprob
        metrics = request.metrics
        metrics.first_token_time = metrics.first_token_time or now
        metrics.token_times.append(now)
        # NOTE: the sampler masks EOS and stop ids until min_tokens, so any seen here ends the sequence.
        stop_str = seq.detokenizer.add(token_id, check_stop=seq.num_output_tokens >= seq.params.min_tokens)
        if stop_str is not None:
            self._finish(request, seq, "stop", stop_str)
        elif token_id in seq.eos_token_ids:
            self._finish(request, seq, "stop", None)
        elif token_id in seq.params.stop_token_ids:
            self._finish(request, seq, "stop", token_id)
        elif seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            self._finish(request, seq, "length", None)

    def _finish(self, request: _Request, seq: Sequence, reason: str, stop_reason: str | int | None) -> None:
        seq.finish_reason = reason
        request.stop_reasons[seq.index] = stop_reason
        seq.detokenizer.finish()
        self.scheduler.finish(seq)
        if all(s.is_finished for s in request.seqs):
            request.metrics.finished_time = time.perf_counter()
            del self.requests[request.request_id]

    def _output(self, request: _Request) -> RequestOutput:
        outputs = [
            CompletionOutput(
                index=seq.index,
                text=seq.detokenizer.stream_text,
                token_ids=seq.output_token_ids,
                finish_reason=seq.finish_reason,
                stop_reason=request.stop_reasons.get(seq.index),
                # A copy: outputs cross to the server's thread while this one keeps appending.
                logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
                cumulative_logprob=seq.cumulative_logprob,
            )
            for seq in request.seqs
        ]
        return RequestOutput(
            request.request_id, request.prompt, request.prompt_token_ids, outputs,
            finished=all(s.is_finished for s in request.seqs),
            num_cached_tokens=request.seqs[0].num_cached_tokens,
            metrics=request.metrics,
            prompt_logprobs=request.seqs[0].prompt_logprobs if request.params.prompt_logprobs is not None else None,
        )
