"""Sequence: one stream of tokens being generated, with its KV blocks and progress."""

import enum
from typing import TYPE_CHECKING

from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.outputs import CompletionOutput, TokenLogprob
from tokenmill.sampling import SamplingParams

if TYPE_CHECKING:
    import torch

    from tokenmill.structured.matcher import GrammarState


class SequenceStatus(enum.Enum):
    """Where a sequence is in its life."""

    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class Sequence:
    """One sample of one request: prompt plus generated tokens, its block table and progress."""

    def __init__(
        self,
        seq_id: int,
        request_id: str,
        index: int,
        prompt_token_ids: list[int],
        params: SamplingParams,
        max_tokens: int,
        eos_token_ids: list[int],
        detokenizer: IncrementalDetokenizer,
        arrival_time: float,
        seed: int | None = None,
        parent: "Sequence | None" = None,
        first: "Sequence | None" = None,
    ) -> None:
        """parent: the first sample, whose prompt blocks this one shares (prefix caching on); first: the first sample
        of the request whichever, whose grammar this one copies rather than compiles again."""
        self.seq_id = seq_id
        self.request_id = request_id
        self.index = index
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.max_tokens = max_tokens
        # The one place ignore_eos applies: with it set, EOS is an ordinary token.
        self.eos_token_ids = [] if params.ignore_eos else eos_token_ids
        # Token ids that end this sequence (and that the sampler masks until min_tokens); a set to test each token.
        self.stop_token_ids = params.stop_token_ids + self.eos_token_ids
        self._stop_ids = frozenset(self.stop_token_ids)
        self.detokenizer = detokenizer
        self.arrival_time = arrival_time
        self.seed = seed
        # params.logit_bias as (token ids, biases) on the logits' device, built by the sampler at its first step.
        self.logit_bias_tensors: "tuple[torch.Tensor, torch.Tensor] | None" = None
        # Parallel samples (n > 1) wait for their first sibling's prefill, then share its cached blocks.
        self.parent = parent
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.block_table: list[int] = []
        # Hybrid sliding-window models (Gemma 3): the sliding layers' blocks, those before the window released.
        self.sliding_table: list[int] = []
        self.block_hashes: list[bytes] = []
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.logprobs: list[TokenLogprob] = []
        # Entry i is prompt token i + 1 given the tokens before it (the first token has no logprob).
        self.prompt_logprobs: list[TokenLogprob] = []
        self.cumulative_logprob = 0.0
        self.num_preemptions = 0
        # Tokens guessed to follow this step's input (tokenmill/spec_decode), verified by the same forward pass.
        self.draft_token_ids: list[int] = []
        # OpenAI's predicted output, as token ids: drafts come from it rather than from the prompt.
        self.prediction_token_ids: list[int] = []
        # Tokens whose KV a separate draft model holds (spec_decode/model_proposer.py); reset with the blocks.
        self.draft_computed = 0
        # Decayed counts of draft tokens this sequence had verified and accepted: its recent acceptance rate.
        self.drafts_tried = 0.0
        self.drafts_accepted = 0.0
        # Steps in a row this sequence could have drafted and did not (spec_decode/drafter.py probes after a while).
        self.steps_without_drafts = 0
        # Where a structured output's grammar stands; the sampler masks by it, and such a sequence never drafts.
        self.grammar: "GrammarState | None" = None
        if first is not None and first.grammar is not None:
            self.grammar = first.grammar.copy()  # n samples of a 790 KB regex held the engine 0.4 s each
        elif params.structured_output is not None:
            # Imported here: the grammar library and torch stay out of commands that never decode (`--help`, `plan`).
            from tokenmill.structured.matcher import GrammarState

            self.grammar = GrammarState(params.structured_output, detokenizer.tokenizer)
        # What take_delta has handed out already.
        self._text_sent = 0
        self._tokens_sent = 0
        self._finish_sent = False

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens so far."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        """Generated tokens so far."""
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose KV is not in the cache yet (the whole prompt at first, then one per step)."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        """True once the prompt is computed and one sampled token waits: the state in which it may draft."""
        return self.num_uncomputed_tokens == 1 and self.num_output_tokens > 0

    def set_prompt_logprobs(self, start: int, logprobs: list[TokenLogprob]) -> None:
        """Record the logprobs of prompt tokens start + 1 onwards, computed by one prompt chunk."""
        # Slice assignment: a preempted sequence recomputes its prompt and rewrites equal values.
        self.prompt_logprobs[start : start + len(logprobs)] = logprobs

    def append_token(self, token_id: int, logprob: TokenLogprob | None) -> None:
        """Add a sampled token; set finish_reason (and stop_reason) if it ends the sequence."""
        self.token_ids.append(token_id)
        if logprob is not None:
            self.logprobs.append(logprob)
            self.cumulative_logprob += logprob.logprob
        # NOTE: the sampler masks stop ids until min_tokens, so any seen here ends the sequence. As in vLLM, a stop
        # token's own text stays out of the output unless include_stop_str_in_output (EOS's is usually empty).
        stop_token = token_id in self._stop_ids
        stop_str = None
        if not stop_token or self.params.include_stop_str_in_output:
            # As vLLM, and as the sampler masks stop ids: the first min_tokens tokens end nothing.
            stop_str = self.detokenizer.add(token_id, check_stop=self.num_output_tokens > self.params.min_tokens)
        if self.grammar is not None and not self.grammar.advance(token_id):
            # Not an end the output reached: the request fails with the library's reason (LLMEngine._update).
            raise self.grammar.rejected()
        if stop_str is not None:
            self.end("stop", stop_str)
        elif token_id in self.eos_token_ids:
            self.end("stop")
        elif token_id in self.params.stop_token_ids:
            self.end("stop", token_id)
        elif self.grammar is not None and self.grammar.is_complete:
            self.end("stop")  # nothing but EOS could follow: end now rather than spend a step sampling it
        elif self.num_output_tokens >= self.max_tokens:
            self.end("length")

    def end(self, reason: str, stop_reason: str | int | None = None, decode_rest: bool = True) -> None:
        """Record why the sequence ends; its text is complete from here on (see Detokenizer.finish)."""
        found = self.detokenizer.finish(decode_rest, check_stop=self.num_output_tokens > self.params.min_tokens)
        if found is not None and reason != "abort":
            # Text held back for a partial character completed a stop string, and was cut there: say so.
            reason, stop_reason = "stop", found
        self.finish_reason, self.stop_reason = reason, stop_reason

    def take_delta(self) -> CompletionOutput | None:
        """What is new since the last call (stop-safe text, its tokens, the finish), or None if nothing is."""
        text = self.detokenizer.stream_text
        finishing = self.finish_reason is not None and not self._finish_sent
        # Tokens whose text is held back (a possible stop string, half a UTF-8 character) wait for it,
        # so no delta is empty and logprobs go out with their text.
        if len(text) == self._text_sent and not finishing:
            return None
        first, self._tokens_sent = self._tokens_sent, self.num_output_tokens
        new_text, self._text_sent = text[self._text_sent :], len(text)
        self._finish_sent = self.finish_reason is not None
        return CompletionOutput(
            self.index, new_text, self.token_ids[self.num_prompt_tokens + first :], self.finish_reason,
            self.stop_reason, self.logprobs[first:] if self.params.logprobs is not None else None,
            # None unless logprobs were asked for, as vLLM: 0.0 reads as a probability of 1.
            self.cumulative_logprob if self.params.logprobs is not None else None,
        )

    @property
    def is_finished(self) -> bool:
        """True once a stop condition or an abort ended it."""
        return self.status == SequenceStatus.FINISHED

    def sort_key(self) -> tuple[int, float, int]:
        """Scheduling order: lower priority value first, then earlier arrival."""
        return (self.params.priority, self.arrival_time, self.seq_id)

    @property
    def deadline(self) -> float | None:
        """When (time.perf_counter) this sequence's next promise falls due: its first token, else its whole answer."""
        due = []
        if self.params.ttft_deadline_ms is not None and self.num_output_tokens == 0:
            due.append(self.arrival_time + self.params.ttft_deadline_ms / 1000)
        if self.params.deadline_ms is not None:
            due.append(self.arrival_time + self.params.deadline_ms / 1000)
        return min(due, default=None)

    def deadline_key(self) -> tuple:
        """Earliest-deadline-first order: sequences with a deadline by it, then the rest in sort_key order."""
        deadline = self.deadline
        return (1, *self.sort_key()) if deadline is None else (0, deadline, self.seq_id)
