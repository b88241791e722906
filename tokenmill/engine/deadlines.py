"""Deadline feasibility: when a waiting sequence would finish, estimated from the engine's fitted step times."""

import heapq
import math

from tokenmill.config import EngineConfig
from tokenmill.cost.accounting import StepTimeModel
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.sequence import Sequence
from tokenmill.errors import TokenmillError

# The first steps pay for warm-up (allocations, kernel selection; seconds each on a busy CPU) and are left out
# of the fit, which counts every step it is given alike and would otherwise overestimate for good.
WARMUP_STEPS = 4
# Steps fitted before an estimate is trusted enough to refuse anyone: a fit of a handful of points swings widely.
MIN_STEPS = 8


class DeadlineError(TokenmillError):
    """A request whose deadline cannot be met: refused on arrival, or dropped while it waited."""

    def __init__(self, message: str, estimate_ms: float) -> None:
        super().__init__(message)
        self.estimate_ms = estimate_ms


class DeadlineKeeper:
    """Estimates each waiting sequence's first-token and finish times with the sequences ahead of it in the queue."""

    def __init__(self, config: EngineConfig, scheduler: Scheduler) -> None:
        self.enabled = config.scheduling_policy == "deadline"
        self.max_num_seqs = config.max_num_seqs
        self.budget = config.max_num_batched_tokens
        self.block_size = config.block_size
        self.scheduler = scheduler
        # The cost accountant's model of step seconds (prompt tokens, decode tokens, per step), fitted apart
        # from it: the bill must count the warm-up steps, the estimates must not.
        self.times = StepTimeModel()
        self._warmup_left = WARMUP_STEPS

    def observe(self, work: list[tuple[Sequence, int, int]], seconds: float) -> None:
        """Fit one step's measured seconds: its (sequence, prefill tokens, decode tokens) rows took `seconds`."""
        if self._warmup_left:
            self._warmup_left -= 1
            return
        self.times.observe(sum(p for _, p, _ in work), sum(d for _, _, d in work), seconds)

    def check_new(self, seqs: list[Sequence], now: float) -> None:
        """Raise DeadlineError if these sequences of one new request cannot meet their deadline; queue nothing."""
        if not self._trusted() or all(seq.deadline is None for seq in seqs):
            return
        order = self.scheduler.order
        for i, seq in enumerate(seqs):
            # The request's own earlier samples queue ahead of this one too.
            ahead = [s for s in self.scheduler.waiting if order(s) < order(seq)] + seqs[:i]
            late = self._late(seq, sum(self._prompt_work(s) for s in ahead), ahead, now)
            if late is not None:
                raise DeadlineError(f"refused: {late[0]}", late[1])

    def infeasible(self, now: float) -> list[tuple[Sequence, DeadlineError]]:
        """Waiting sequences (in queue order) that can no longer meet their deadline, each with its error."""
        if not self._trusted():
            return []
        late, ahead_tokens, ahead = [], 0, []
        for seq in self.scheduler.waiting:
            # The queue is in Sequence.deadline_key order: past the last sequence with a deadline there is nothing
            # to drop, so a step without deadlines in the queue costs one look.
            if seq.deadline is None:
                break
            if (why := self._late(seq, ahead_tokens, ahead, now)) is not None:
                late.append((seq, DeadlineError(f"dropped while waiting: {why[0]}", why[1])))
            else:  # a dropped sequence holds up nobody behind it
                ahead_tokens = ahead_tokens + self._prompt_work(seq)
                ahead.append(seq)
        return late

    def _trusted(self) -> bool:
        return self.enabled and self.times.num_steps >= MIN_STEPS

    def _late(self, seq: Sequence, ahead_tokens: int, ahead: list[Sequence],
              now: float) -> tuple[str, float] | None:
        """Why seq, queued behind the `ahead` sequences, would miss a deadline, and the estimate (ms from arrival)."""
        first, finish = self.estimate(seq, ahead_tokens, ahead)
        params, waited = seq.params, now - seq.arrival_time
        if params.ttft_deadline_ms is not None and seq.num_output_tokens == 0:
            estimate_ms = (waited + first) * 1000
            if estimate_ms > params.ttft_deadline_ms:
                return (f"the first token is estimated at {estimate_ms:.0f} ms after arrival, past its "
                        f"{params.ttft_deadline_ms:g} ms deadline (x-tokenmill-ttft-deadline-ms); allow more time "
                        "or retry when less loaded", estimate_ms)
        if params.deadline_ms is not None:
            estimate_ms = (waited + finish) * 1000
            if estimate_ms > params.deadline_ms:
                return (f"the answer ({seq.max_tokens - seq.num_output_tokens} tokens at most) is estimated to end "
                        f"{estimate_ms:.0f} ms after arrival, past its {params.deadline_ms:g} ms deadline "
                        "(x-tokenmill-deadline-ms); ask for fewer tokens, allow more time or retry when less loaded",
                        estimate_ms)
        return None

    def estimate(self, seq: Sequence, ahead_tokens: int, ahead: list[Sequence]) -> tuple[float, float]:
        """Seconds from now to seq's first token and to its last (max_tokens), served after the running sequences
        and the `ahead` waiting ones holding ahead_tokens uncomputed tokens."""
        running = self.scheduler.running
        decodes = min(len(running), self.max_num_seqs)
        # Prompt work before seq's first token: running prompts still in chunks, everything ahead, its own.
        prefill = (sum(s.num_uncomputed_tokens for s in running if s.num_uncomputed_tokens > 1)
                   + ahead_tokens + self._prompt_work(seq))
        first = self._slot_wait(ahead) + self._prefill_seconds(prefill, decodes)
        batch = min(decodes + len(ahead) + 1, self.max_num_seqs)
        finish = first + (seq.max_tokens - seq.num_output_tokens - 1) * self._decode_step(batch)
        return first, finish

    def _prompt_work(self, seq: Sequence) -> int:
        """Tokens a waiting sequence will compute: a sample of n shares its first sample's full prompt blocks.

        Counting each sample's whole prompt refused n=4 requests whose first token came in a third of the estimate.
        """
        # With prompt logprobs too: the first sample scores the prompt, the others take its blocks.
        if seq.parent is None or seq.num_computed_tokens:
            return seq.num_uncomputed_tokens
        return min(seq.num_uncomputed_tokens, seq.num_prompt_tokens % self.block_size or self.block_size)

    def _slot_wait(self, ahead: list[Sequence]) -> float:
        """Seconds until a slot of the batch frees for a sequence queued behind `ahead`.

        Sequences leave the batch as they reach max_tokens. Each one ahead takes the first slot to free and holds it
        as long: counting only the running ones, four requests queued for two idle slots were all admitted against a
        deadline the last two then missed.
        """
        running = self.scheduler.running
        free_at = [0] * max(0, self.max_num_seqs - len(running)) + [s.max_tokens - s.num_output_tokens for s in running]
        heapq.heapify(free_at)
        for s in ahead:
            heapq.heappush(free_at, heapq.heappop(free_at) + s.max_tokens - s.num_output_tokens)
        return free_at[0] * self._decode_step(self.max_num_seqs)

    def _prefill_seconds(self, tokens: int, decodes: int) -> float:
        """Steps that compute `tokens` prompt tokens beside `decodes` decodes, chunked by the step's token budget."""
        steps = max(1, math.ceil(tokens / max(self.budget - decodes, 1)))
        return steps * self._decode_step(decodes) + tokens * self.times.per_prefill_token

    def _decode_step(self, decodes: int) -> float:
        return self.times.per_step + decodes * self.times.per_decode_token
