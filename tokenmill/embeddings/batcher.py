"""Dynamic batching policy for encoder inputs: when a batch runs, and which inputs share a padded batch."""

import threading
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from tokenmill.errors import InvalidRequestError

T = TypeVar("T")


@dataclass(frozen=True)
class BatchPolicy:
    """When the embedding queue runs: a token budget per batch and a limit on how long an input waits for company."""

    # Padded tokens per forward pass. all-MiniLM-L6-v2 on one thread embeds 276-282 sentences/s at budgets of
    # 256 to 4,096 and fewer beyond (247 at 8,192, 178 at 16,384) as the activations outgrow the caches.
    max_batch_tokens: int = 2048
    # A lone request waits at most about one pass of a short sentence (2.4 ms here) for company. Under a
    # closed loop of 16 clients the queue fills while a pass runs anyway, and 0 was as fast (docs/benchmarks.md).
    max_wait_ms: float = 2.0

    def __post_init__(self) -> None:
        # `not <=`: NaN and anything past what a thread's wait takes (inf raised inside the batching thread, and
        # every embedding request then hung).
        if self.max_batch_tokens < 1 or not 0 <= self.max_wait_ms <= threading.TIMEOUT_MAX * 1000:
            raise InvalidRequestError(f"embedding max_batch_tokens must be at least 1 and max_wait_ms a number of "
                                      f"milliseconds >= 0 and finite; got {self.max_batch_tokens} and {self.max_wait_ms}")


def plan_batches(lengths: list[int], max_batch_tokens: int) -> list[list[int]]:
    """Indices into lengths, shortest first, cut into batches whose padded size (count x longest) fits the budget.

    A batch holds one input at least, so an input longer than the budget runs alone.
    """
    batches: list[list[int]] = []
    current: list[int] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        # Sorted ascending, so the input joining is the batch's longest.
        if current and (len(current) + 1) * lengths[i] > max_batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


@dataclass
class Pending(Generic[T]):
    """One queued input: what the caller attached, its length in tokens and when it arrived."""

    item: T
    num_tokens: int
    arrival: float


@dataclass
class Batcher(Generic[T]):
    """The queue's policy: hold inputs until their tokens reach the budget or the oldest has waited the limit."""

    policy: BatchPolicy
    pending: list[Pending[T]] = field(default_factory=list)
    num_tokens: int = 0

    def add(self, item: T, num_tokens: int, now: float) -> None:
        """Queue one input that arrived at `now` (seconds, any monotonic clock)."""
        self.pending.append(Pending(item, num_tokens, now))
        self.num_tokens += num_tokens

    def wait_time(self, now: float) -> float | None:
        """Seconds until a batch is due: 0 when one is due now, None when nothing waits."""
        if not self.pending:
            return None
        if self.num_tokens >= self.policy.max_batch_tokens:
            return 0.0
        # NOTE: pending is in arrival order, so its head is the oldest input.
        return max(0.0, self.pending[0].arrival + self.policy.max_wait_ms / 1000 - now)

    def take(self) -> list[list[Pending[T]]]:
        """Everything waiting, sorted by length and cut into batches within the token budget; the queue empties."""
        pending, self.pending, self.num_tokens = self.pending, [], 0
        plan = plan_batches([p.num_tokens for p in pending], self.policy.max_batch_tokens)
        return [[pending[i] for i in batch] for batch in plan]
