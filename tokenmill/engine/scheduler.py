"""Scheduler: each step, pick which sequences run and how many tokens each computes."""

import bisect
from dataclasses import dataclass, field

from tokenmill.config import EngineConfig
from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.sequence import Sequence, SequenceStatus
from tokenmill.outputs import TokenLogprob


@dataclass
class SchedulerOutput:
    """One step's work: (sequence, tokens to compute) pairs, and who was preempted to make room."""

    # NOTE: single-token rows (decodes) come first, then prompt chunks; the runner and the PyTorch
    # attention path rely on it (AttentionMetadata checks it).
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_decodes(self) -> int:
        """How many leading entries compute one token each."""
        return sum(n == 1 for _, n in self.scheduled)

    def work(self) -> list[tuple[Sequence, int, int]]:
        """(sequence, prefill tokens, decode tokens) of each row; read it before update() records the progress."""
        # A decode computes the one token sampled last, and any drafts after it; every other row (a prompt chunk,
        # a recompute after preemption) is prefill work.
        return [(seq, 0, n) if seq.is_decoding else (seq, n, 0) for seq, n in self.scheduled]


class Scheduler:
    """One token-budget loop: running sequences first (decodes before prompt chunks), then admissions."""

    def __init__(self, config: EngineConfig, block_manager: BlockManager) -> None:
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.block_manager = block_manager
        # The waiting queue's order, also the preemption order (the last in it goes first).
        self.order = Sequence.deadline_key if config.scheduling_policy == "deadline" else Sequence.sort_key
        self.waiting: list[Sequence] = []  # kept sorted by self.order
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        """Queue a new (or preempted) sequence in the policy's order (deadline, or priority and arrival)."""
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=self.order)

    def has_unfinished(self) -> bool:
        """True while any sequence waits or runs."""
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        """Fill this step's token budget."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        # Decodes (one token) go before prompt chunks so a long prompt never delays them.
        ordered = sorted(self.running, key=lambda s: s.num_uncomputed_tokens > 1)
        # Drafts get only what the running sequences after them leave: a guess must never hold back another's next
        # token or a prompt's next chunk. So while a prompt longer than the budget prefills, nobody drafts: its
        # first token comes sooner, and a step full of prompt tokens is compute-bound, where drafts pay least.
        own = [s.num_uncomputed_tokens for s in ordered]  # taken before a preemption changes the counts
        own_after = sum(own)
        spare: list[int] | None = None  # blocks every running sequence's own tokens leave, once a draft asks
        for seq, tokens in zip(ordered, own):
            if budget == 0:
                break
            own_after -= tokens
            if seq.status != SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            drafts = seq.draft_token_ids[: max(0, budget - n - own_after)]
            if drafts:
                # A guess is never worth preempting anyone for: its slots come only from blocks left once every
                # running sequence's own tokens (those after this one too) have theirs.
                if spare is None:
                    spare = self.block_manager.spare_blocks(list(zip(ordered, own)))
                extra = self.block_manager.extra_blocks(seq, n + len(drafts), n)
                while drafts and not all(e <= left for e, left in zip(extra, spare)):
                    drafts = drafts[:-1]  # those that fit the blocks left (its own last one, often)
                    extra = self.block_manager.extra_blocks(seq, n + len(drafts), n)
                if drafts:
                    spare = [left - e for e, left in zip(extra, spare)]
            seq.draft_token_ids = drafts
            n += len(drafts)
            while not self.block_manager.can_allocate(seq, n):
                victim = max(self.running, key=self.order)
                budget += self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                self.block_manager.allocate(seq, n)
                out.scheduled.append((seq, n))
                budget -= n
        # Admitting while others were just preempted would only thrash the pool.
        if not out.preempted:
            self._admit(out, budget)
        # The batch order, set here once: an admission can be a single token too (its prefix was cached).
        out.scheduled.sort(key=lambda item: item[1] > 1)
        return out

    def update(
        self, out: SchedulerOutput, sampled_seqs: list[Sequence], token_ids: list[list[int]],
        logprobs: list[list[TokenLogprob] | None],
    ) -> None:
        """Record a step's progress: computed tokens, sampled (and accepted draft) tokens, full blocks, who finished."""
        emitted = {seq.seq_id: (tokens, lps) for seq, tokens, lps in zip(sampled_seqs, token_ids, logprobs)}
        for seq, n in out.scheduled:
            tokens, lps = emitted.get(seq.seq_id, ([], None))
            drafts, seq.draft_token_ids = len(seq.draft_token_ids), []
            # Every token sampled but the last was an accepted draft, whose KV this step wrote; a rejected
            # draft's slot is written over when its position is computed again.
            seq.num_computed_tokens += n - drafts + (len(tokens) - 1 if drafts else 0)
            for i, token_id in enumerate(tokens):
                seq.append_token(token_id, lps[i] if lps is not None else None)
                if seq.finish_reason is not None:
                    break
            # A stop among the accepted drafts leaves the tokens after it uncomputed as well as unappended.
            seq.num_computed_tokens = min(seq.num_computed_tokens, seq.num_tokens - 1)
            # A draft model's pool holds its rejected guesses from here on: it must run these positions again,
            # however many steps pass before it drafts next.
            seq.draft_computed = min(seq.draft_computed, seq.num_computed_tokens)
            self.block_manager.cache_full_blocks(seq)
            if seq.finish_reason is not None:
                self.finish(seq)
            else:  # blocks held for rejected drafts, or for drafts dropped when scheduling
                self.block_manager.trim(seq)

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        for seq in list(self.waiting):
            if budget == 0 or len(self.running) >= self.max_num_seqs:
                break
            if seq.parent is not None and not _prefilled(seq.parent):
                continue  # wait to share the sibling's prompt blocks instead of computing them again
            # Prompt logprobs need every prompt token computed, by the first sample alone: its siblings share its
            # blocks as without them (each computing the prompt again cost n times the work).
            lookup = seq.params.prompt_logprobs is None or seq.parent is not None
            if lookup:
                self.block_manager.allocate_prefix(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            if not self.block_manager.can_allocate(seq, n):
                self.block_manager.free(seq)
                break
            self.block_manager.allocate(seq, n)
            # Counted once admitted (a refused admission is tried again) and only the first time: after a
            # preemption the hits are of the sequence's own output as well, not of its prompt.
            if lookup and not seq.num_preemptions:
                self.block_manager.count_prefix_hit(seq)
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append((seq, n))
            budget -= n

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> int:
        """Free seq's blocks and requeue it for recompute; return the budget it had been given."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.draft_token_ids = []
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq)
        out.preempted.append(seq)
        returned = 0
        for i, (s, n) in enumerate(out.scheduled):
            if s is seq:
                del out.scheduled[i]
                returned = n
                break
        return returned

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and release its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED


def _prefilled(seq: Sequence) -> bool:
    return seq.is_finished or seq.num_computed_tokens >= seq.num_prompt_tokens
