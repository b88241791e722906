"""Drafting with a model: a smaller one with its own KV pool, or the target's own first layers (early exit)."""

import dataclasses
import logging

import torch
from torch import nn

from tokenmill.config import EngineConfig
from tokenmill.engine.kv_cache import KVCache, model_block_bytes
from tokenmill.engine.model_runner import Chunk, ModelRunner, flat_batch
from tokenmill.engine.sequence import Sequence
from tokenmill.errors import InvalidRequestError
from tokenmill.layers.attention import attention_metadata
from tokenmill.loader.model_loader import load_model
from tokenmill.loader.source import ModelSource, open_model

logger = logging.getLogger(__name__)


class ModelProposer:
    """Greedy drafts from a model run over the target's block tables, k forward passes for k tokens."""

    def __init__(
        self, model: nn.Module, runner: ModelRunner, num_layers: int | None, own_cache: bool, max_tokens: int
    ) -> None:
        self.model = model
        # Tokens one draft pass may take (the engine's step budget): a draft model catching up on a long context
        # does so over several steps, as the target's prefill did, not in one pass of the whole context.
        self.max_tokens = max_tokens
        self.block_size, self.device = runner.block_size, runner.device
        # Early exit runs the target's first num_layers layers, then its final norm and LM head.
        self.num_layers = num_layers
        # A separate draft model keeps its KV in its own pool, under the target's block ids, and must catch up
        # on the tokens it has not seen. Early exit writes the target's first layers' KV, which the target has
        # for every computed token already, and which verification then writes again with the same values.
        self.own_cache = own_cache

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        """Up to ks[i] greedy draft tokens for each sequence; its blocks must cover 1 + ks[i] more tokens."""
        drafts: list[list[int]] = [[] for _ in seqs]
        starts = [min(seq.draft_computed, seq.num_computed_tokens) if self.own_cache else seq.num_computed_tokens
                  for seq in seqs]
        chunks: dict[int, Chunk] = {}
        budget = self.max_tokens
        catching_up: set[int] = set()  # sequences that only catch up this step, as far as the budget goes
        # The shortest first: a sequence far behind must not take every other one's drafts for steps on end.
        for i in sorted(range(len(seqs)), key=lambda i: seqs[i].num_tokens - starts[i]):
            tokens = seqs[i].token_ids[starts[i] :]
            if len(tokens) > budget:
                tokens = tokens[:budget]
                catching_up.add(i)
            budget -= len(tokens)
            chunks[i] = Chunk(tokens, starts[i], seqs[i].block_table, seqs[i].sliding_table or None)
        active = [i for i, chunk in chunks.items() if chunk.token_ids]
        while active:
            active.sort(key=lambda i: len(chunks[i].token_ids) > 1)  # single tokens first, as attention wants
            for i, token in zip(active, self._next_tokens([chunks[i] for i in active])):
                if i not in catching_up:  # the token after a partial catch-up is no draft
                    drafts[i].append(token)
                chunks[i] = Chunk([token], chunks[i].start + len(chunks[i].token_ids), seqs[i].block_table,
                                  seqs[i].sliding_table or None)
            active = [i for i in active if i not in catching_up and len(drafts[i]) < ks[i]]
        for i, seq in enumerate(seqs):
            seq.draft_computed = chunks[i].start  # every token before the last draft went through the draft model
        return drafts

    def _next_tokens(self, chunks: list[Chunk]) -> list[int]:
        input_ids, positions, metadata = flat_batch(chunks, self.block_size, self.device)
        with attention_metadata(metadata):
            hidden = self.model(input_ids, positions, self.num_layers)
        ends = torch.tensor([len(c.token_ids) for c in chunks], device=self.device).cumsum(0) - 1
        return self.model.compute_logits(hidden[ends]).argmax(dim=-1).tolist()


@dataclasses.dataclass
class DraftModel:
    """A separate draft model, loaded before the target's KV pool is sized, so that both pools share its budget."""

    model: nn.Module
    source: ModelSource
    config: EngineConfig  # the engine's, for the draft: its own model and quantization

    @property
    def block_bytes(self) -> int:
        """What a block of the draft's pool costs beside the target's."""
        return model_block_bytes(self.config, self.source.config)


def load_draft(config: EngineConfig, source: ModelSource) -> DraftModel | None:
    """The draft model a --speculative-config with a model asks for, loaded; None for the other methods."""
    spec = config.speculative_config
    if spec is None or spec.method != "draft_model":
        return None
    draft_source = open_model(spec.model)
    if draft_source.config.vocab_size != source.config.vocab_size:
        raise InvalidRequestError(
            f"draft model {spec.model!r} has a vocabulary of {draft_source.config.vocab_size} tokens and the model "
            f"{source.config.vocab_size}: a draft must share the model's tokenizer", param="speculative_config")
    draft_config = dataclasses.replace(config, model=spec.model, quantization=spec.quantization,
                                       speculative_config=None)
    model, quantization = load_model(draft_config, draft_source)
    logger.info("draft model %s (quantization %s)", draft_source.name, quantization)
    return DraftModel(model, draft_source, draft_config)


def build_proposer(
    config: EngineConfig, source: ModelSource, runner: ModelRunner, draft: DraftModel | None
) -> ModelProposer | None:
    """The proposer a model-based --speculative-config asks for; None for the lookup methods."""
    spec = config.speculative_config
    if spec is None or spec.method == "ngram":
        return None
    if spec.method == "early_exit":
        if not 1 <= spec.exit_layer < source.config.num_layers:
            raise InvalidRequestError(f"exit_layer={spec.exit_layer} must be in [1, {source.config.num_layers}) for "
                                      "this model", param="speculative_config")
        return ModelProposer(runner.model, runner, spec.exit_layer, own_cache=False,
                             max_tokens=config.max_num_batched_tokens)
    assert draft is not None, "load_draft gives a draft_model method its model"
    # As many blocks as the target's pool, so the target's block tables index the draft's pool too.
    KVCache(draft.config, draft.source.config, draft.model, num_blocks=runner.num_blocks)
    return ModelProposer(draft.model, runner, None, own_cache=True, max_tokens=config.max_num_batched_tokens)
