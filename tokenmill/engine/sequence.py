"""Sequence: one stream of tokens being generated, with its KV blocks and progress."""

import enum
from dataclasses import dataclass, field

from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    """Where a sequence is in its life."""

    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass
class TokenLogprob:
    """The chosen token's log-probability and the top alternatives at that position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


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
        priority: int = 0,
        seed: int | None = None,
        parent: "Sequence | None" = None,
    ) -> None:
        self.seq_id = seq_id
        self.request_id = request_id
        self.index = index
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.max_tokens = max_tokens
        self.eos_token_ids = eos_token_ids
        self.detokenizer = detokenizer
        self.arrival_time = arrival_time
        self.priority = priority
        self.seed = seed
        # Parallel samples (n > 1) wait for their first sibling's prefill, then share its cached blocks.
        self.parent = parent
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []
        self.finish_reason: str | None = None
        self.logprobs: list[TokenLogprob] = []
        # Entry i is prompt token i + 1 given the tokens before it (the first token has no logprob).
        self.prompt_logprobs: list[TokenLogprob] = []
        self.cumulative_logprob = 0.0
        self.num_preemptions = 0

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
    def is_finished(self) -> bool:
        """True once a stop condition or an abort ended it."""
        return self.status == SequenceStatus.FINISHED

    def sort_key(self) -> tuple[int, float, int]:
        """Scheduling order: lower priority value first, then earlier arrival."""
        return (self.priority, self.arrival_time, self.seq_id)
