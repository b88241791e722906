"""ModelRunner: loads the model, owns the KV pool, turns a schedule into a flat batch and logits."""

import ctypes
import logging
import math
import mmap
from dataclasses import dataclass

import torch
from torch import nn

from tokenmill import ops
from tokenmill.config import DTYPES, EngineConfig
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
        self.kv_dtype = self.dtype if config.kv_cache_dtype == "auto" else DTYPES[config.kv_cache_dtype]
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

    def _num_kv_blocks(self) -> int:
        c = self.model_config
        bytes_per_block = 2 * c.num_layers * self.block_size * c.num_kv_heads * c.head_dim * self.kv_dtype.itemsize
        budget = self.config.kv_cache_memory
        if budget is None and self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = free * self.config.kv_cache_fraction / _GIB
        return max(1, int((budget if budget is not None else 1.0) * _GIB // bytes_per_block))

    def _allocate_kv_pool(self) -> None:
        c = self.model_config
        shape = (2, c.num_layers, self.num_blocks, self.block_size, c.num_kv_heads, c.head_dim)
        if self.device.type == "cpu":
            # Anonymous pages stay unmapped until a block is first written, so the process holds only
            # the KV memory it has used rather than the whole budget from the start. Not np.zeros: numpy
            # advises huge pages for large arrays, and the first token then mapped a 2 MiB page for
            # each layer's K and V (120 MiB of RSS for SmolLM2 where 4 KiB pages map 240 KiB).
            nbytes = math.prod(shape) * self.kv_dtype.itemsize
            self.kv_pool = torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8).view(self.kv_dtype).view(shape)
        else:
            self.kv_pool = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        for i, layer in enumerate(layers):
            layer.k_cache, layer.v_cache = self.kv_pool[0, i], self.kv_pool[1, i]
        logger.info(
            "KV pool: %d blocks of %d tokens = %d tokens (%.2f GiB of %s)",
            self.num_blocks, self.block_size, self.num_blocks * self.block_size,
            self.kv_pool.numel() * self.kv_dtype.itemsize / _GIB, str(self.kv_dtype).removeprefix("torch."),
        )

    @torch.inference_mode()
    def execute(self, scheduled: list[tuple[Sequence, int]]) -> RunnerOutput:
        """Run the scheduled tokens; return logits of sequences that reached their last token (and prompt rows)."""
        # Decodes first: the attention layer batches them and handles prompt chunks one by one.
        batch = sorted(scheduled, key=lambda item: item[1] > 1)
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        prefills: list[PrefillChunk] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prompt_rows: list[tuple[Sequence, int, int, int]] = []  # seq, first position, first row, rows
        for seq, n in batch:
            start = seq.num_computed_tokens
            query_start = len(input_ids)
            input_ids += seq.token_ids[start : start + n]
            positions += range(start, start + n)
            slots += [seq.block_table[p // self.block_size] * self.block_size + p % self.block_size
                      for p in range(start, start + n)]
            if n == 1:
                decode_tables.append(seq.block_table)
                decode_lens.append(start + 1)
            else:
                table = torch.tensor(seq.block_table, dtype=torch.long, device=self.device)
                prefills.append(PrefillChunk(query_start, n, start + n, table))
            if start + n == seq.num_tokens:
                sample_rows.append(len(input_ids) - 1)
                sample_seqs.append(seq)
            last_prompt_row = min(start + n, seq.num_prompt_tokens - 1)
            if seq.params.prompt_logprobs is not None and start < last_prompt_row:
                prompt_rows.append((seq, start, query_start, last_prompt_row - start))
        decode_tables_padded, decode_mask = self._decode_gather(decode_tables, decode_lens)
        metadata = AttentionMetadata(
            slot_mapping=self._tensor(slots),
            num_decodes=len(decode_lens),
            decode_tables=decode_tables_padded,
            decode_lens=self._tensor(decode_lens),
            decode_mask=decode_mask,
            prefills=prefills,
        )
        with attention_metadata(metadata):
            hidden = self.model(self._tensor(input_ids), self._tensor(positions))
        logits = self.model.compute_logits(hidden[self._tensor(sample_rows)]).float()
        prompt_logits = [
            (seq, start, self.model.compute_logits(hidden[row : row + count]).float())
            for seq, start, row, count in prompt_rows
        ]
        return RunnerOutput(sample_seqs, logits, prompt_logits)

    def _decode_gather(self, tables: list[list[int]], lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The decodes' block tables padded to one width, and the mask of real keys."""
        # Built once per step rather than in each layer. Padding points at block 0; the mask keeps
        # those keys, and any past a sequence's length, out of attention.
        width = max((len(t) for t in tables), default=0)
        blocks = self._tensor([t + [0] * (width - len(t)) for t in tables]).view(len(tables), width)
        keys = torch.arange(width * self.block_size, device=self.device)
        return blocks, (keys < self._tensor(lens)[:, None])[:, None, None, :]

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
