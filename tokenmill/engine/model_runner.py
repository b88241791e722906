"""ModelRunner: loads the model, owns the KV pool, turns a schedule into a flat batch and logits."""

import ctypes
import logging
import math
import mmap
from dataclasses import dataclass

import torch
from torch import nn

from tokenmill import ops
from tokenmill.config import DTYPES, EngineConfig, resolve_kv_cache_dtype
from tokenmill.engine.sequence import Sequence
from tokenmill.layers.attention import Attention, AttentionMetadata, PrefillChunk, attention_metadata
from tokenmill.layers.packed_linear import can_pack, pack_linears
from tokenmill.loader.source import ModelSource
from tokenmill.models.registry import model_class
from tokenmill.quant import quantize_model
from tokenmill.quant.policy import choose_quantization

logger = logging.getLogger(__name__)

_GIB = 1 << 30


@dataclass
class RunnerOutput:
    """One step's logits: the last row of each sequence that reached its end, and prompt rows where asked."""

    sample_seqs: list[Sequence]
    logits: torch.Tensor  # [len(sample_seqs), vocab]
    # (sequence, first position, logits [rows, vocab]): row j predicts prompt token first + j + 1.
    prompt_logits: list[tuple[Sequence, int, torch.Tensor]]


class ModelRunner:
    """Runs one forward pass per engine step over the paged KV pool."""

    def __init__(self, config: EngineConfig, source: ModelSource) -> None:
        self.config = config
        self.model_config = source.config
        self.device = torch.device(config.device)
        self.dtype = DTYPES[config.dtype]
        self.kv_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, self.device, self.dtype)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        # Built on the meta device, so no weight is initialized only to be overwritten and a layer
        # to be quantized never holds a float copy: each takes its rows as they stream in.
        self.quantization = self._quantization(source)
        with torch.device("meta"):
            self.model = model_class(source.config.architecture)(source.config).to(self.dtype)
            quantize_model(self.model, self.quantization, config.quant_group_size)
        # Quantized layers are filled by a CPU op (quantize_weight_rows): they load on CPU and move after.
        _allocate(self.model, torch.device("cpu") if self.quantization != "none" else self.device)
        self.model.load_weights(source.weights(self.dtype))
        self.model.to(self.device).eval()
        if self.quantization == "none" and can_pack(self.device, self.dtype):
            pack_linears(self.model)
        # The C++ ops' first build compiles for seconds: at load, not in a client's first request (a
        # quantized model's load has built them already).
        if self.device.type == "cpu":
            ops.available()
        _return_freed_heap()
        self.block_size = config.block_size
        self.num_blocks = self._num_kv_blocks()
        self._allocate_kv_pool()

    def _quantization(self, source: ModelSource) -> str:
        choice = choose_quantization(self.config.quantization, source.files.native_quantization(), self.device, self.dtype)
        (logger.warning if choice.slow else logger.info)("quantization %s (%s)", choice.method, choice.reason)
        return choice.method

    @property
    def kv_block_bytes(self) -> int:
        """Bytes of one KV block: keys and values of every layer (int8: with their scales)."""
        c = self.model_config
        # int8 keeps a float32 scale per token and head beside its head_dim levels.
        token_head_bytes = c.head_dim * self.kv_dtype.itemsize + (4 if self.kv_dtype == torch.int8 else 0)
        return 2 * c.num_layers * self.block_size * c.num_kv_heads * token_head_bytes

    def _num_kv_blocks(self) -> int:
        budget = self.config.kv_cache_memory
        if budget is None and self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = free * self.config.kv_cache_fraction / _GIB
        return max(1, int((budget if budget is not None else 1.0) * _GIB // self.kv_block_bytes))

    def _allocate_kv_pool(self) -> None:
        c = self.model_config
        shape = (2, c.num_layers, self.num_blocks, self.block_size, c.num_kv_heads)
        self.kv_pool = self._pool((*shape, c.head_dim), self.kv_dtype)
        self.kv_scales = self._pool(shape, torch.float32) if self.kv_dtype == torch.int8 else None
        layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        for i, layer in enumerate(layers):
            layer.k_cache, layer.v_cache = self.kv_pool[0, i], self.kv_pool[1, i]
            if self.kv_scales is not None:
                layer.k_scale, layer.v_scale = self.kv_scales[0, i], self.kv_scales[1, i]
        nbytes = self.kv_pool.nbytes + (self.kv_scales.nbytes if self.kv_scales is not None else 0)
        logger.info(
            "KV pool: %d blocks of %d tokens = %d tokens (%.2f GiB of %s)", self.num_blocks, self.block_size,
            self.num_blocks * self.block_size, nbytes / _GIB, str(self.kv_dtype).removeprefix("torch."),
        )

    def _pool(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if self.device.type != "cpu":
            return torch.zeros(shape, dtype=dtype, device=self.device)
        # Anonymous pages stay unmapped until a block is first written, so the process holds only the
        # KV memory it has used rather than the whole budget from the start. Not np.zeros: numpy advises
        # huge pages for large arrays, and the first token then mapped a 2 MiB page for each layer's K
        # and V (120 MiB of RSS for SmolLM2 where 4 KiB pages map 240 KiB).
        nbytes = math.prod(shape) * dtype.itemsize
        return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8).view(dtype).view(shape)

    @torch.inference_mode()
    def execute(self, scheduled: list[tuple[Sequence, int]]) -> RunnerOutput:
        """Run the scheduled tokens; return logits of sequences that reached their last token (and prompt rows)."""
        # Decodes first: the PyTorch attention path batches them and handles prompt chunks one by one.
        batch = sorted(scheduled, key=lambda item: item[1] > 1)
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        prefills: list[PrefillChunk] = []
        tables: list[list[int]] = []  # each scheduled sequence's block table
        row_seqs: list[int] = []  # each token's index into tables
        prompt_rows: list[tuple[Sequence, int, int, int]] = []  # seq, first position, first row, rows
        for seq, n in batch:
            start = seq.num_computed_tokens
            query_start = len(input_ids)
            input_ids += seq.token_ids[start : start + n]
            positions += range(start, start + n)
            slots += [seq.block_table[p // self.block_size] * self.block_size + p % self.block_size
                      for p in range(start, start + n)]
            row_seqs += [len(tables)] * n
            tables.append(seq.block_table)
            if n > 1:
                prefills.append(PrefillChunk(query_start, n, start + n))
            if start + n == seq.num_tokens:
                sample_rows.append(len(input_ids) - 1)
                sample_seqs.append(seq)
            last_prompt_row = min(start + n, seq.num_prompt_tokens - 1)
            if seq.params.prompt_logprobs is not None and start < last_prompt_row:
                prompt_rows.append((seq, start, query_start, last_prompt_row - start))
        # Built once per step rather than in each layer; padding points at block 0, past every row's keys.
        width = max(len(t) for t in tables)
        padded = self._tensor([t + [0] * (width - len(t)) for t in tables]).view(len(tables), width)
        position_ids = self._tensor(positions)
        metadata = AttentionMetadata(
            slot_mapping=self._tensor(slots),
            row_tables=padded.index_select(0, self._tensor(row_seqs)),
            row_lens=position_ids + 1,
            block_size=self.block_size,
            num_decodes=sum(n == 1 for _, n in batch),
            prefills=prefills,
        )
        with attention_metadata(metadata):
            hidden = self.model(self._tensor(input_ids), position_ids)
        logits = self.model.compute_logits(hidden[self._tensor(sample_rows)]).float()
        prompt_logits = [
            (seq, start, self.model.compute_logits(hidden[row : row + count]).float())
            for seq, start, row, count in prompt_rows
        ]
        return RunnerOutput(sample_seqs, logits, prompt_logits)

    def _tensor(self, values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)


def _allocate(model: nn.Module, device: torch.device) -> None:
    """Give each meta parameter and buffer uninitialized storage on device, as Module.to_empty does.

    to_empty's empty_like runs torch's Python reference op on meta tensors, which imports sympy and
    about 480 other modules: 0.33 s of load, and int8's peak memory fell 26 MiB without them.
    """
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            empty = torch.empty(param.shape, dtype=param.dtype, device=device)
            setattr(module, name, nn.Parameter(empty, requires_grad=param.requires_grad))
        for name, buffer in module.named_buffers(recurse=False):
            setattr(module, name, torch.empty(buffer.shape, dtype=buffer.dtype, device=device))


def _return_freed_heap() -> None:
    """Hand the load's freed heap back to the OS, which glibc otherwise keeps for reuse (6 MiB for SmolLM2)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
