"""Sampler: logits to next tokens, with penalties, truncation, per-request seeds and logprobs."""

import itertools
import logging
from dataclasses import dataclass, field

import torch

from tokenmill import ops
from tokenmill.engine.sequence import Sequence
from tokenmill.outputs import TokenLogprob

logger = logging.getLogger(__name__)

# Mixes a request's seed with its output position so each draw is fixed by (seed, position) alone,
# independent of batch composition, preemption and drafts.
_SEED_STRIDE = 1_000_003


@dataclass
class SamplerOutput:
    """The tokens each sequence emits this step (one, or with drafts up to all of them plus one), with logprobs."""

    token_ids: list[list[int]]
    logprobs: list[list[TokenLogprob] | None]
    # Sequences (by index) whose sampling raised; each has no tokens here, and the engine fails its request.
    failed: dict[int, Exception] = field(default_factory=dict)


class Sampler:
    """Turns one step's logits into tokens: one row per sequence, or 1 + its drafts' rows where it speculated."""

    @torch.inference_mode()
    def __call__(
        self, logits: torch.Tensor, seqs: list[Sequence], drafts: list[list[int]] | None = None
    ) -> SamplerOutput:
        # logits: [rows, vocab]; sequence i owns 1 + len(drafts[i]) consecutive rows, row j predicting the token
        # after its draft j - 1 (row 0: after its last token).
        drafts = drafts or [[] for _ in seqs]
        row_seqs, offsets = _rows(seqs, drafts)
        # Logprobs report the model's own distribution, before penalties and truncation (as vLLM).
        want_logprobs = any(s.params.logprobs is not None for s in seqs)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        penalized = False
        try:
            self._apply_penalties(logits, row_seqs, offsets)
            penalized = True
            return self._sample(logits, raw_logprobs, seqs, drafts, row_seqs, offsets)
        except Exception:
            # NOTE: one sequence's bad state (its grammar, its penalties) must not fail the whole batch: sample each
            # sequence alone, on the same rows. Only a failing batch pays for this; penalties, the one stage that
            # cannot be applied twice, are applied again only if the batch raised before writing them.
            logger.exception("sampling a batch of %d sequences failed; sampling each on its own", len(seqs))
            return self._sample_each(logits, raw_logprobs, seqs, drafts, penalize=not penalized)

    def _sample(
        self, logits: torch.Tensor, raw_logprobs: torch.Tensor | None, seqs: list[Sequence], drafts: list[list[int]],
        row_seqs: list[Sequence], offsets: list[int],
    ) -> SamplerOutput:
        """Tokens and logprobs for seqs from their penalized logits rows."""
        logits = self._mask_early_stops(logits, row_seqs, offsets)
        # Before temperature and truncation, so greedy and sampled rows alike only ever pick grammatical tokens.
        # The drafter never drafts for a constrained sequence: a draft row's mask would need the grammar advanced.
        constrained = [i for i, s in enumerate(row_seqs) if s.params.structured_output is not None]
        if constrained:
            assert all(offsets[i] == 0 for i in constrained), "drafts for a sequence with a grammar"
            # Imported here: llguidance's torch helpers import sympy (~480 modules), which no other request needs.
            from tokenmill.structured.mask import apply_masks

            apply_masks(logits, constrained, [row_seqs[i].grammar for i in constrained])
            # As vLLM, which masks the logits before its sampler reads logprobs: a constrained row's logprobs are
            # over the tokens its grammar allows (a guided_choice answer read at rank 24,907, below forbidden ones).
            if asking := [i for i in constrained if row_seqs[i].params.logprobs is not None]:
                apply_masks(raw_logprobs, asking, [row_seqs[i].grammar for i in asking])
                rows = torch.tensor(asking, device=logits.device)
                raw_logprobs[rows] = raw_logprobs[rows].log_softmax(-1)
        chosen = _argmax(logits)
        sampled = [i for i, s in enumerate(row_seqs) if not s.params.greedy]
        if sampled:
            rows = torch.tensor(sampled, device=logits.device)
            sampled_seqs = [row_seqs[i] for i in sampled]
            probs = self._probs(logits[rows], sampled_seqs)
            last = [i for i, s in enumerate(sampled_seqs) if s.params.temperature_last]
            if not last:
                probs = _truncate(probs, sampled_seqs)
            else:
                if first := [i for i, s in enumerate(sampled_seqs) if not s.params.temperature_last]:
                    index = torch.tensor(first, device=logits.device)
                    probs[index] = _truncate(probs[index], [sampled_seqs[i] for i in first])
                # The cut from the untempered distribution, the kept tokens' tempered odds: the race renormalizes.
                index = torch.tensor(last, device=logits.device)
                kept = _truncate(_softmax(logits[rows[index]]), [sampled_seqs[i] for i in last], min_p_last=True) > 0
                probs[index] = probs[index] * kept
            noise = self._noise(probs, sampled_seqs, [offsets[i] for i in sampled])
            # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p (truncated, renormalized by the argmax
            # itself), needing no cumsum or sync.
            chosen[rows] = _argmax(probs / noise)
        token_ids = self._accept(drafts, chosen.tolist())
        logprobs: list[list[TokenLogprob] | None] = [None] * len(seqs)
        if raw_logprobs is not None:
            firsts = list(itertools.accumulate((len(d) + 1 for d in drafts), initial=0))
            # Each emitted token is its row's chosen one: the rows that asked get their ranks in one op, not a
            # vocabulary pass per token.
            asked = [r for i, s in enumerate(seqs) if s.params.logprobs is not None
                     for r in range(firsts[i], firsts[i + 1])]
            rows = torch.tensor(asked, device=raw_logprobs.device)
            ranks = dict(zip(asked, _ranks(raw_logprobs[rows], chosen[rows]).tolist()))
            for i, (seq, tokens) in enumerate(zip(seqs, token_ids)):
                if seq.params.logprobs is not None:
                    logprobs[i] = [_token_logprob(raw_logprobs[firsts[i] + j], t, seq.params.logprobs,
                                                  ranks[firsts[i] + j]) for j, t in enumerate(tokens)]
        return SamplerOutput(token_ids, logprobs)

    @staticmethod
    def _accept(drafts: list[list[int]], chosen: list[int]) -> list[list[int]]:
        """Each sequence's tokens: its drafts while each equals the token its row chose, then that row's own token."""
        # Every draft is proposed with certainty (lookups, a greedy draft model), so accepting it exactly when its
        # row's draw picks it keeps each position's distribution (the draft with probability p(draft), else a draw
        # from p without it), and a seeded request emits the tokens a run without drafts would: the draws are the same.
        out, first = [], 0
        for draft in drafts:
            tokens: list[int] = []
            for j, d in enumerate(draft):
                if chosen[first + j] != d:
                    break
                tokens.append(d)
            tokens.append(chosen[first + len(tokens)])
            out.append(tokens)
            first += len(draft) + 1
        return out

    @torch.inference_mode()
    def prompt_logprobs(self, logits: torch.Tensor, targets: list[int], top_n: int) -> list[TokenLogprob]:
        """Logprob of each target token under its row of logits [rows, vocab], with top_n alternatives."""
        logprobs = torch.log_softmax(logits, dim=-1)
        target_ids = torch.tensor(targets, device=logits.device)
        ranks = _ranks(logprobs, target_ids).tolist()
        chosen = logprobs.gather(1, target_ids[:, None])[:, 0].tolist()
        if not top_n:
            return [TokenLogprob(t, lp, rank=r) for t, lp, r in zip(targets, chosen, ranks)]
        values, ids = logprobs.topk(top_n, dim=-1)
        return [
            TokenLogprob(t, lp, list(zip(i, v)), r)
            for t, lp, r, i, v in zip(targets, chosen, ranks, ids.tolist(), values.tolist())
        ]

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence], offsets: list[int]) -> None:
        """Bias and penalize logits in place; every row's change is computed before any is written, so a raise writes
        none."""
        biased, repeats, counted = [], [], []
        for i, seq in enumerate(seqs):
            p = seq.params
            row = None
            # The bias first, as OpenAI adds it to the model's logits and vLLM before penalties; on every row, draft
            # rows too: it does not depend on the tokens before.
            if p.logit_bias:
                ids, bias = _bias_tensors(seq, logits.device)
                row = logits[i].clone().index_add_(0, ids, bias.to(logits.dtype))
                biased.append((i, row))
            # The drafter never drafts for a penalized sequence: a draft row's penalties would need its drafts.
            assert offsets[i] == 0 or not p.has_penalties, "drafts for a sequence with penalties"
            # llama.cpp's window: the last n tokens, prompt and output alike, for all three penalties.
            window = seq.token_ids[-p.repetition_window:] if p.repetition_window and p.has_penalties else None
            if p.repetition_penalty != 1.0:
                # As in vLLM and transformers: every token seen so far (prompt and output) is penalized, unless a
                # window is set.
                seen = torch.tensor(sorted(set(window or seq.token_ids)), device=logits.device)
                prior = (logits[i] if row is None else row)[seen]
                repeats.append((i, seen, torch.where(prior > 0, prior / p.repetition_penalty,
                                                     prior * p.repetition_penalty)))
            if p.presence_penalty or p.frequency_penalty:
                # OpenAI semantics: only generated tokens count, unless a window is set.
                output = torch.tensor(window or seq.output_token_ids, dtype=torch.long, device=logits.device)
                counts = torch.bincount(output, minlength=logits.shape[1])[: logits.shape[1]].to(logits.dtype)
                counted.append((i, p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)))
        # Repetition after the bias, then presence and frequency, as a row with both always had them.
        for i, row in biased:
            logits[i] = row
        for i, seen, values in repeats:
            logits[i, seen] = values
        for i, penalty in counted:
            logits[i] -= penalty

    def _sample_each(
        self, logits: torch.Tensor, raw_logprobs: torch.Tensor | None, seqs: list[Sequence], drafts: list[list[int]],
        penalize: bool,
    ) -> SamplerOutput:
        """Sample each sequence on its own rows, so that a sequence that raises fails alone."""
        out = SamplerOutput([], [])
        first = 0
        for i, (seq, draft) in enumerate(zip(seqs, drafts)):
            rows = slice(first, first + len(draft) + 1)
            first = rows.stop
            row_seqs, offsets = _rows([seq], [draft])
            try:
                if penalize:
                    self._apply_penalties(logits[rows], row_seqs, offsets)
                raw = None if raw_logprobs is None else raw_logprobs[rows]
                alone = self._sample(logits[rows], raw, [seq], [draft], row_seqs, offsets)
            except Exception as exc:
                logger.exception("sampling request %s failed; failing that request alone", seq.request_id)
                out.failed[i] = exc
                out.token_ids.append([])
                out.logprobs.append(None)
            else:
                out.token_ids += alone.token_ids
                out.logprobs += alone.logprobs
        return out

    def _mask_early_stops(self, logits: torch.Tensor, seqs: list[Sequence], offsets: list[int]) -> torch.Tensor:
        for i, seq in enumerate(seqs):
            if seq.num_output_tokens + offsets[i] < seq.params.min_tokens and seq.stop_token_ids:
                logits[i, seq.stop_token_ids] = float("-inf")
        return logits

    @staticmethod
    def _probs(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        temps = torch.tensor([s.params.temperature for s in seqs], device=logits.device)
        return _softmax(logits / temps[:, None])

    @staticmethod
    def _noise(probs: torch.Tensor, seqs: list[Sequence], offsets: list[int]) -> torch.Tensor:
        """Each row's Exp(1) race noise, fixed by (seed, position) when seeded."""
        noise = torch.empty_like(probs)
        for i, (seq, offset) in enumerate(zip(seqs, offsets)):
            gen = None
            if seq.seed is not None:
                gen = torch.Generator(device=probs.device)
                # Wrapped into 64 bits (clients send any 64-bit seed, negative ones too), then the high half folded
                # into the low: the CPU generator keeps only the low 32 bits, so seeds 2**32 apart drew alike.
                mixed = (seq.seed * _SEED_STRIDE + seq.num_output_tokens + offset) % 2**64
                gen.manual_seed(mixed ^ (mixed >> 32))
            noise[i].exponential_(generator=gen)
        return noise


def _bias_tensors(seq: Sequence, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """seq's logit_bias as (token ids, biases) on device, built once: rebuilt each step, a 40,000-entry bias made
    every step of its batch 6x slower (and a GPU would copy both anew each step)."""
    if seq.logit_bias_tensors is None or seq.logit_bias_tensors[0].device != device:
        bias = seq.params.logit_bias
        assert bias, "bias tensors for a sequence without a logit_bias"
        seq.logit_bias_tensors = (torch.tensor(list(bias), dtype=torch.long, device=device),
                                  torch.tensor(list(bias.values()), dtype=torch.float32, device=device))
    return seq.logit_bias_tensors


def _rows(seqs: list[Sequence], drafts: list[list[int]]) -> tuple[list[Sequence], list[int]]:
    """Each logits row's sequence, and its offset among that sequence's rows."""
    row_seqs = [seq for seq, draft in zip(seqs, drafts) for _ in range(len(draft) + 1)]
    offsets = [j for draft in drafts for j in range(len(draft) + 1)]
    return row_seqs, offsets


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """Index of each row's maximum (the first, on ties; NaN above all), as argmax gives it."""
    if x.is_cpu and x.dtype == torch.float32 and x.stride(-1) == 1 and ops.available():
        # 5-6x faster than max(dim) at any row count (csrc/argmax.cpp).
        out = torch.empty(len(x), dtype=torch.long)
        torch.ops.tokenmill.argmax_rows(x, out)
        return out
    # max(dim) reduces 3x faster than argmax on CPU (16 x 49,152 floats: 0.17 ms against 0.50), but one row
    # runs on one thread there: a flat argmax splits it (Gemma 3's 262,144 logits: 0.17 ms against 0.42).
    if len(x) == 1:
        return x.reshape(-1).argmax().view(1)
    return x.max(dim=-1).indices


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    """Each row's probabilities; a logit past float's range (a repetition penalty near 0, a temperature near it)
    would make the row NaN, so it is clamped to the range first."""
    return torch.softmax(logits.clamp(max=torch.finfo(logits.dtype).max), dim=-1)


def _truncate(probs: torch.Tensor, seqs: list[Sequence], min_p_last: bool = False) -> torch.Tensor:
    """Zero the probabilities that top_k, top_p and min_p rule out: min_p first, as vLLM, or last, as llama.cpp
    (its top_p then weighs what top_k left, not what min_p did)."""
    min_p = [s.params.min_p for s in seqs]
    if not any(p > 0 for p in min_p):
        return _top_k_top_p(probs, seqs)
    # The floor is relative to the top probability, which top_k and top_p always keep.
    floor = torch.tensor(min_p, device=probs.device)[:, None] * probs.max(dim=-1, keepdim=True).values
    if min_p_last:
        kept = _top_k_top_p(probs, seqs)
        return kept.masked_fill(kept < floor, 0.0)
    return _top_k_top_p(probs.masked_fill(probs < floor, 0.0), seqs)


def _top_k_top_p(probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Zero the probabilities that top_k and top_p rule out."""
    top_k = [s.params.top_k for s in seqs]
    top_p = [s.params.top_p for s in seqs]
    if all(k <= 0 for k in top_k) and all(p == 1.0 for p in top_p):
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    k = torch.tensor([min(k, probs.shape[1]) if k > 0 else probs.shape[1] for k in top_k], device=probs.device)[:, None]
    # top_k keeps every token tied with the k-th, as vLLM and transformers do.
    beyond_k = sorted_probs < sorted_probs.gather(1, k - 1)
    kept = sorted_probs.masked_fill(beyond_k, 0.0)
    # top_p weighs what top_k left (and min_p, where it ran first), renormalized, as vLLM (transformers renormalizes
    # too, but runs min_p last). A token stays if the mass strictly before it is below top_p: the top token always
    # does.
    mass_before = (kept.cumsum(dim=-1) - kept) / kept.sum(dim=-1, keepdim=True)
    p = torch.tensor(top_p, device=probs.device, dtype=probs.dtype)[:, None]
    # Rows with top_p == 1 keep everything: float32 cumsum can reach 1.0 before the tail ends.
    drop_sorted = beyond_k | ((mass_before >= p) & (p < 1.0))
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return probs.masked_fill(drop, 0.0)


def _ranks(logprobs: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Each row's rank of its token: how many tokens are at least as likely, itself included (vLLM V1's count)."""
    return (logprobs >= logprobs.gather(1, token_ids[:, None])).sum(dim=-1)


def _token_logprob(row: torch.Tensor, token_id: int, top_n: int, rank: int) -> TokenLogprob:
    top: list[tuple[int, float]] = []
    if top_n:
        values, ids = row.topk(top_n)
        top = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token_id, float(row[token_id]), top, rank)
