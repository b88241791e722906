"""ModelRunner: turns a schedule into one flat batch, runs the model over the paged KV pool, returns logits."""

from dataclasses import dataclass

import torch

from tokenmill.config import EngineConfig, ModelConfig
from tokenmill.engine.cuda_graphs import GRAPH_BATCH_SIZES, DecodeGraphs
from tokenmill.engine.kv_cache import KVCache
from tokenmill.engine.sequence import Sequence
from tokenmill.heap import return_freed_heap
from tokenmill.layers.attention import AttentionMetadata, PrefillChunk, attention_metadata
from tokenmill.loader.model_loader import load_model
from tokenmill.loader.source import ModelSource

# Prompt rows (chunks and verified drafts) in one step whose freed buffers are worth returning (see execute).
_LARGE_PROMPT_ROWS = 256


@dataclass
class RunnerOutput:
    """One step's logits: the last row of each sequence that reached its end (and its drafts' rows), and prompt rows."""

    sample_seqs: list[Sequence]
    logits: torch.Tensor  # [rows, vocab]: per sample sequence, 1 + len(seq.draft_token_ids) rows
    # (sequence, first position, logits [rows, vocab]): row j predicts prompt token first + j + 1.
    prompt_logits: list[tuple[Sequence, int, torch.Tensor]]


@dataclass
class Batch:
    """One step as the model sees it: every scheduled token in one flat row list, and what to read back."""

    input_ids: torch.Tensor  # [tokens]
    positions: torch.Tensor  # [tokens]
    metadata: AttentionMetadata
    sample_rows: torch.Tensor  # the last token's row of each sequence that reached its end, then its drafts' rows
    sample_seqs: list[Sequence]
    # (sequence, first position, first row, rows) of prompt rows whose logprobs were asked for.
    prompt_rows: list[tuple[Sequence, int, int, int]]


class ModelRunner:
    """Runs one forward pass per engine step over the paged KV pool."""

    def __init__(self, config: EngineConfig, source: ModelSource, shared_block_bytes: int = 0) -> None:
        self.device = torch.device(config.device)
        self.model, self.quantization = load_model(config, source)
        # shared_block_bytes: a draft model's pool, indexed by this pool's block ids, shares its memory budget.
        self.kv_cache = KVCache(config, source.config, self.model, shared_block_bytes=shared_block_bytes)
        self.block_size = config.block_size
        self.num_blocks = self.kv_cache.num_blocks
        # The block manager's sliding-window layout (BlockManager): the window whose blocks are released, and
        # the sliding layers' own pool where full-attention layers keep theirs.
        self.sliding_window = self.kv_cache.sliding_window
        self.num_sliding_blocks = self.kv_cache.num_sliding_blocks
        self.graphs: DecodeGraphs | None = None
        self._large_step_since_trim = False
        if captures_decode(self.device, config, source.config, hybrid=bool(self.num_sliding_blocks)):
            max_blocks = -(-source.config.max_position_embeddings // self.block_size)
            # No decode batch is larger than max_num_seqs: the sizes up to the first that holds it.
            sizes = [b for b in GRAPH_BATCH_SIZES if b < config.max_num_seqs]
            sizes += [b for b in GRAPH_BATCH_SIZES if b >= config.max_num_seqs][:1]
            # As every step runs: without autograd, whose saved activations a graph would otherwise keep alive.
            with torch.inference_mode():
                self.graphs = DecodeGraphs(self.model, sizes, max_blocks, self.block_size, self.device, capture=True)

    @torch.inference_mode()
    def execute(self, scheduled: list[tuple[Sequence, int]]) -> RunnerOutput:
        """Run the scheduled tokens; return the logits to sample from and the prompt rows asked for."""
        batch = self.prepare(scheduled)
        prompt_rows = len(batch.input_ids) - batch.metadata.num_decodes
        decode_only = prompt_rows == 0
        # glibc keeps what a step frees for the steps after. A 512-row chunk's freed buffers (9 MiB for SmolLM2)
        # stayed resident through all the decoding after it in about one run in three (`bench memory`), where a
        # later allocation sat above them in the heap; returned once, as decoding resumes (about 0.5 ms).
        self._large_step_since_trim |= prompt_rows >= _LARGE_PROMPT_ROWS
        if decode_only and self._large_step_since_trim and self.device.type == "cpu":
            return_freed_heap()
            self._large_step_since_trim = False
        hidden = None
        if self.graphs is not None and decode_only:
            hidden = self.graphs.run(batch.input_ids, batch.positions, batch.metadata)
        if hidden is None:
            with attention_metadata(batch.metadata):
                hidden = self.model(batch.input_ids, batch.positions)
        logits = self.model.compute_logits(hidden[batch.sample_rows]).float()
        prompt_logits = [
            (seq, start, self.model.compute_logits(hidden[row : row + count]).float())
            for seq, start, row, count in batch.prompt_rows
        ]
        return RunnerOutput(batch.sample_seqs, logits, prompt_logits)

    def prepare(self, scheduled: list[tuple[Sequence, int]]) -> Batch:
        """Flatten the schedule (decodes first, as the scheduler orders it) into one batch of rows."""
        chunks: list[Chunk] = []
        sample_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        prompt_rows: list[tuple[Sequence, int, int, int]] = []
        query_start = 0
        for seq, n in scheduled:
            start = seq.num_computed_tokens
            drafts = seq.draft_token_ids
            # A speculating sequence computes its last token and its drafts: a verification chunk, attended
            # causally like a prompt chunk.
            chunks.append(Chunk(seq.token_ids[start : start + n - len(drafts)] + drafts, start, seq.block_table,
                                seq.sliding_table or None))
            if start + n == seq.num_tokens + len(drafts):
                sample_rows += range(query_start + n - 1 - len(drafts), query_start + n)
                sample_seqs.append(seq)
            last_prompt_row = min(start + n, seq.num_prompt_tokens - 1)
            # Not again once known: a sequence preempted after its prompt recomputes the prompt's keys only. The
            # request's first sample scores the prompt for all n.
            if (seq.params.prompt_logprobs is not None and seq.index == 0 and start < last_prompt_row
                    and len(seq.prompt_logprobs) < last_prompt_row):
                prompt_rows.append((seq, start, query_start, last_prompt_row - start))
            query_start += n
        input_ids, positions, metadata = flat_batch(chunks, self.block_size, self.device)
        return Batch(input_ids, positions, metadata, _tensor(sample_rows, self.device), sample_seqs, prompt_rows)


@dataclass
class Chunk:
    """Consecutive tokens of one sequence to compute, from position start, over its block table(s)."""

    token_ids: list[int]
    start: int
    block_table: list[int]
    # A hybrid model's sliding layers' table (Sequence.sliding_table); None where every layer reads block_table.
    sliding_table: list[int] | None = None


def flat_batch(
    chunks: list[Chunk], block_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Token ids, positions and attention metadata of chunks laid end to end (single tokens must come first)."""
    input_ids: list[int] = []
    positions: list[int] = []
    prefills: list[PrefillChunk] = []
    row_seqs: list[int] = []  # each token's index into chunks
    for i, chunk in enumerate(chunks):
        n, start = len(chunk.token_ids), chunk.start
        if n > 1:
            prefills.append(PrefillChunk(len(input_ids), n, start + n))
        input_ids += chunk.token_ids
        positions += range(start, start + n)
        row_seqs += [i] * n
    position_ids, row_index = _tensor(positions, device), _tensor(row_seqs, device)
    num_decodes = sum(len(c.token_ids) == 1 for c in chunks)

    def metadata(tables: list[list[int]]) -> AttentionMetadata:
        slots = [table[p // block_size] * block_size + p % block_size
                 for c, table in zip(chunks, tables) for p in range(c.start, c.start + len(c.token_ids))]
        # Built once per step rather than in each layer; padding and released entries (RELEASED, -1) point
        # at block 0, outside every row's window of keys.
        width = max(len(t) for t in tables)
        padded = _tensor([t + [0] * (width - len(t)) for t in tables], device).clamp_(min=0)
        return AttentionMetadata(
            slot_mapping=_tensor(slots, device),
            row_tables=padded.view(len(chunks), width).index_select(0, row_index),
            row_lens=position_ids + 1,
            block_size=block_size,
            num_decodes=num_decodes,
            prefills=prefills,
        )

    meta = metadata([c.block_table for c in chunks])
    if chunks[0].sliding_table is not None:
        meta.sliding = metadata([c.sliding_table for c in chunks])
    return _tensor(input_ids, device), position_ids, meta


def _tensor(values: list, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def captures_decode(device: torch.device, config: EngineConfig, model_config: ModelConfig, hybrid: bool) -> bool:
    """Whether decode steps replay CUDA graphs (else they run eagerly)."""
    # NOTE: a hybrid model's sliding layers read their own tables (AttentionMetadata.sliding), which the graphs'
    # static buffers do not hold; an MoE layer reads its experts' token counts on the host (one sync a layer) and
    # runs only the experts chosen, which a capture would freeze. Those models decode eagerly.
    return device.type == "cuda" and not config.enforce_eager and not hybrid and not model_config.num_experts
