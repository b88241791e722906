"""The drafter: each step, which decoding sequences guess ahead, how far, and what they guess."""

from tokenmill.cost.accounting import StepTimeModel
from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.sequence import Sequence
from tokenmill.outputs import DraftCounters
from tokenmill.spec_decode.config import SpeculativeConfig
from tokenmill.spec_decode.model_proposer import ModelProposer
from tokenmill.spec_decode.ngram import lookup, lookup_in

# Drafts a predicted output may propose per step (more if --speculative-config's num_speculative_tokens is larger).
_PREDICTION_TOKENS = 8
# The longest tail of the output matched in a predicted output: long enough to tell repeated lines apart.
_PREDICTION_MATCH = 16
# Before any draft of a sequence is verified, its acceptance rate is taken to be PRIOR_ACCEPTED / PRIOR_TRIED;
# a user's predicted output is expected to be mostly right.
_PRIOR = {"ngram": (1.0, 2.0), "prediction": (4.0, 5.0), "model": (3.0, 4.0)}
# Each verification weighs the counts before it by this, so the rate follows the text as it changes.
_DECAY = 0.8
# Each step a sequence skips drafting weighs its counts by this: after some 30 steps it tries again.
_SKIP_DECAY = 0.95
# A sequence that skipped this many steps in a row drafts one token anyway. Where a row's fitted cost puts the
# threshold above the prior rate (a noisy fit, or a machine where rows cost much), the decay above never brings
# the rate over it, and without drafts neither the rate nor a wider step is ever measured again.
_PROBE_AFTER = 32


class Drafter:
    """Proposes draft tokens for the decoding sequences where the expected gain outweighs the verification cost."""

    def __init__(self, config: SpeculativeConfig | None, proposer: ModelProposer | None = None) -> None:
        self.config = config
        # Drafts from a model (draft_model, early_exit); None: from lookups.
        self.proposer = proposer
        # Decode steps' seconds ≈ per_step + per_decode_token × rows (decodes and drafts alike), fitted from the
        # steps themselves: what one more row costs against what a step yields, on this machine and model.
        self.step_times = StepTimeModel()
        self._row_counts: set[int] = set()
        # Whether the last propose() had any sequence that may draft.
        self._considered = False
        self.counters = DraftCounters()

    def observe(self, work: list[tuple[Sequence, int, int]], seconds: float) -> None:
        """Add a measured step to the fit, if it decoded only (a prompt chunk's cost is another matter) and drafting
        was considered for it (the fit is of no use to engines that never draft)."""
        if not self._considered or any(prefill for _, prefill, _ in work):
            return
        rows = sum(decode for _, _, decode in work)
        self.step_times.observe(0, rows, seconds)
        if len(self._row_counts) < 2:
            self._row_counts.add(rows)

    def propose(self, running: list[Sequence], block_manager: BlockManager, budget: int | None = None) -> None:
        """Set draft_token_ids of every running sequence: empty where it should not speculate or budget has no room."""
        for seq in running:
            seq.draft_token_ids = []
        decoding = [s for s in running if s.is_decoding]
        # Penalties and grammars depend on every token before a position: a draft row would need its own.
        candidates = [(seq, kind) for seq in decoding
                      if (kind := "prediction" if seq.prediction_token_ids else self._kind()) is not None
                      and not seq.params.has_penalties and seq.params.structured_output is None]
        # Without speculation (no method, no prediction) the step is left alone, its timing included.
        self._considered = bool(candidates)
        if not candidates:
            return
        threshold = self._threshold(len(decoding))
        # The step's budget (None: no limit) less every running sequence's own tokens: the scheduler gives drafts only
        # this (a prompt's next chunk goes first), so guesses past it, a draft model's passes and blocks included,
        # would be made only to be dropped.
        room = None if budget is None else budget - sum(s.num_uncomputed_tokens for s in running)
        modelled: list[tuple[Sequence, int]] = []
        spare: list[int] | None = None  # blocks the running sequences' own next tokens leave, once needed
        for seq, kind in candidates:
            most = min(self._max_tokens(kind), seq.max_tokens - seq.num_output_tokens - 1)
            # Draft token i is accepted with probability about rate**i: guess while that beats the threshold.
            rate = self._rate(seq, kind)
            k = most
            if self.config is None or self.config.adaptive:
                k = next((i for i in range(most) if rate ** (i + 1) <= threshold), most)
            if k == 0 and most > 0 and seq.steps_without_drafts >= _PROBE_AFTER:
                k = 1
            if k == 0:
                # Drift back toward the prior, so a sequence that stopped drafting gets to try again later.
                seq.drafts_tried *= _SKIP_DECAY
                seq.drafts_accepted *= _SKIP_DECAY
                seq.steps_without_drafts += 1
                continue
            if room is not None:
                k = min(k, room)
                if k <= 0:
                    continue
            seq.steps_without_drafts = 0
            if kind == "prediction":
                seq.draft_token_ids = lookup_in(seq.prediction_token_ids, seq.output_token_ids, k, _PREDICTION_MATCH)
            elif kind == "ngram":
                seq.draft_token_ids = lookup(seq.token_ids, k, self.config.prompt_lookup_min,
                                             self.config.prompt_lookup_max)
            else:
                # A draft model writes KV for the drafts as it makes them: their slots must exist first, taken
                # only from blocks that every running sequence's own next tokens leave, so no guess preempts.
                if spare is None:
                    spare = block_manager.spare_blocks([(s, s.num_uncomputed_tokens) for s in running])
                extra = block_manager.extra_blocks(seq, 1 + k, 1)
                if not all(e <= left for e, left in zip(extra, spare)):
                    continue
                block_manager.allocate(seq, 1 + k)
                spare = [left - e for e, left in zip(extra, spare)]
                modelled.append((seq, k))
            if room is not None:  # by what is drafted: a lookup that finds nothing leaves it to those after
                room -= k if kind not in ("prediction", "ngram") else len(seq.draft_token_ids)
        if modelled:
            drafts = self.proposer.propose([seq for seq, _ in modelled], [k for _, k in modelled])
            for (seq, _), draft in zip(modelled, drafts):
                seq.draft_token_ids = draft

    def record(self, seqs: list[Sequence], emitted: list[list[int]]) -> None:
        """Count each sequence's verified drafts (still in draft_token_ids) against the tokens it emitted."""
        c = self.counters
        for seq, tokens in zip(seqs, emitted):
            drafts = len(seq.draft_token_ids)
            if not drafts:
                continue
            accepted = len(tokens) - 1
            c.num_drafts += 1
            c.num_draft_tokens += drafts
            c.num_accepted_tokens += accepted
            c.accepted_per_pos += [0] * (drafts - len(c.accepted_per_pos))
            for i in range(accepted):
                c.accepted_per_pos[i] += 1
            # Positions tried: every accepted one and the first rejected (those after it say nothing).
            seq.drafts_tried = seq.drafts_tried * _DECAY + min(accepted + 1, drafts)
            seq.drafts_accepted = seq.drafts_accepted * _DECAY + accepted

    def _kind(self) -> str | None:
        """How a sequence without a predicted output drafts: by lookup, by a model, or not at all."""
        if self.config is None:
            return None
        return "ngram" if self.proposer is None else "model"

    def _max_tokens(self, kind: str) -> int:
        configured = self.config.num_speculative_tokens if self.config is not None else 0
        # A predicted output is the caller's own word on what follows: it may run further than lookups do.
        return max(configured, _PREDICTION_TOKENS) if kind == "prediction" else configured

    @staticmethod
    def _rate(seq: Sequence, kind: str) -> float:
        accepted, tried = _PRIOR[kind]
        return (seq.drafts_accepted + accepted) / (seq.drafts_tried + tried)

    def _threshold(self, batch: int) -> float:
        """The acceptance probability a draft token needs to pay for its row at this batch size."""
        # A step of `batch` decodes yields batch tokens in per_step + batch * per_decode_token seconds; a draft row
        # costs per_decode_token more and yields rate**i tokens. It pays when it yields tokens at least as
        # cheaply as the step does: rate**i > per_decode_token * batch / step_time. At batch 1 on a CPU the
        # per-step weight reads dominate and nearly any draft pays; as the batch grows the bar rises.
        if len(self._row_counts) < 2:
            # Until steps of two sizes are timed, rows and steps cannot be told apart: time a step of the size not
            # seen yet (with drafts if only plain steps were timed, else without).
            return 0.0 if not self._row_counts or max(self._row_counts) <= batch else 1.0
        m = self.step_times
        step = m.per_step + batch * m.per_decode_token
        return m.per_decode_token * batch / step if step > 0 else 0.0

