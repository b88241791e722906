"""The paged KV pool: one preallocated tensor for every layer's keys and values, sized from a memory budget."""

import logging
import math
import mmap
import os

import torch
from torch import nn

from tokenmill.config import EngineConfig, ModelConfig
from tokenmill.dtypes import DTYPES, resolve_kv_cache_dtype
from tokenmill.errors import InvalidRequestError
from tokenmill.layers.attention import Attention

logger = logging.getLogger(__name__)

_GIB = 1 << 30


class KVCache:
    """Holds the pool [2, layers, blocks, block_size, kv_heads, head_dim] and hands each Attention layer its views.

    A model with sliding-window layers releases the blocks that fall out of the window (engine/block_manager.py);
    where full-attention layers keep every block (Gemma 3), the sliding layers get a second pool, sized for the
    windows they hold, and the memory saved goes to the full layers' pool.
    """

    def __init__(
        self, config: EngineConfig, model_config: ModelConfig, model: nn.Module, num_blocks: int | None = None,
        shared_block_bytes: int = 0,
    ) -> None:
        self.config = config
        # What a block costs in another pool that takes the same block ids from this budget (a draft model's).
        self.shared_block_bytes = shared_block_bytes
        self.model_config = model_config
        self.device = torch.device(config.device)
        self.dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, self.device, DTYPES[config.dtype])
        self.block_size = config.block_size
        layers = [m for m in model.modules() if isinstance(m, Attention)]
        sliding = [layer for layer in layers if layer.sliding_window is not None]
        full = [layer for layer in layers if layer.sliding_window is None]
        # NOTE: a draft model's pool (num_blocks given: the target's count, tokenmill/spec_decode/model_proposer.py)
        # and a target with a draft model keep every block: the draft model reads the target's block_table
        # over its own layers, which may not slide.
        spec = config.speculative_config
        releases = bool(sliding) and num_blocks is None and (spec is None or spec.method != "draft_model")
        # Keys the sliding layers read; None: no block is ever released.
        self.sliding_window = sliding[0].sliding_window if releases else None
        assert len({layer.sliding_window for layer in sliding}) <= 1, "one window for every sliding layer"
        # Blocks of the sliding layers' own pool (None: they share the main pool, as when every layer slides).
        self.num_sliding_blocks: int | None = None
        # What the budget holds without releasing: the figure the saving is counted against.
        self.num_blocks_without_release = self._num_blocks() if num_blocks is None else num_blocks
        self.num_blocks = self.num_blocks_without_release
        if self.sliding_window is not None and full:
            self._split(len(full), len(sliding))
        main = full if self.num_sliding_blocks is not None else layers
        self.pool, self.scales = self._pool(main, self.num_blocks)
        self.sliding_pool, self.sliding_scales = (None, None)
        if self.num_sliding_blocks is not None:
            self.sliding_pool, self.sliding_scales = self._pool(sliding, self.num_sliding_blocks)
        tensors = (self.pool, self.scales, self.sliding_pool, self.sliding_scales)
        nbytes = sum(t.nbytes for t in tensors if t is not None)
        logger.info(
            "KV pool: %d blocks of %d tokens = %d tokens (%.2f GiB of %s)", self.num_blocks, self.block_size,
            self.num_blocks * self.block_size, nbytes / _GIB, str(self.dtype).removeprefix("torch."),
        )
        if self.sliding_window is not None:
            logger.info("%s", self.saving())

    @property
    def max_window_blocks(self) -> int:
        """Most blocks a sliding layer holds per sequence between steps (BlockManager.max_window_blocks)."""
        return -(-(self.sliding_window - 1) // self.block_size) + 1

    def saving(self) -> str:
        """What releasing out-of-window blocks buys, in words."""
        held = (f"sliding-window layers hold at most {self.max_window_blocks} blocks per sequence "
                f"(window {self.sliding_window})")
        tokens, before = self.num_blocks * self.block_size, self.num_blocks_without_release * self.block_size
        if self.num_sliding_blocks is not None:
            return (f"{held} in a pool of {self.num_sliding_blocks} blocks; KV budget fits {tokens} tokens "
                    f"instead of {before}")
        return (f"{held}; KV budget fits {tokens} tokens of windows, each sequence of any length taking at most "
                f"{self.max_window_blocks * self.block_size}, instead of {before} tokens of context")

    @property
    def block_bytes(self) -> int:
        """Bytes of one KV block of every layer: what a block costs without a sliding pool."""
        return self.model_config.num_layers * self.layer_block_bytes()

    def layer_block_bytes(self) -> int:
        """Bytes of one KV block of one layer: keys and values (int8: with their scales)."""
        return layer_block_bytes(self.model_config, self.dtype, self.block_size)

    def _budget_bytes(self) -> int:
        budget = self.config.kv_cache_memory
        if budget is None and self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = free * self.config.kv_cache_fraction / _GIB
        if budget is None:  # the 1 GiB default maps lazily: a machine with less starts and uses what it writes
            return _GIB
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        if self.device.type == "cpu" and budget * _GIB > ram:
            # Else mmap's bare ENOMEM, an OverflowError past 8e9 GiB, or (where memory is overcommitted) a pool
            # the OOM killer ends once it fills.
            raise InvalidRequestError(f"kv_cache_memory={budget} GiB is more than this machine's "
                                      f"{ram / _GIB:.1f} GiB of memory", param="kv_cache_memory")
        return int(budget * _GIB)

    def _num_blocks(self) -> int:
        budget, block = self._budget_bytes(), self.block_bytes + self.shared_block_bytes
        if budget < block:  # one block regardless would take more memory than given, and hold one block of context
            raise InvalidRequestError(f"the KV cache budget ({budget:,} bytes) is below one KV block ({block:,} "
                                      "bytes, every layer's keys and values); raise --kv-cache-memory",
                                      param="kv_cache_memory")
        return budget // block

    def _split(self, num_full: int, num_sliding: int) -> None:
        """Size the sliding layers' pool for the windows of max_num_seqs sequences and one step's new tokens;
        the rest of the budget goes to the full layers' pool."""
        c = self.config
        # Between steps a sequence holds max_window_blocks; a step's new tokens add at most one block per
        # sequence beyond their own count (a partly filled block).
        needed = c.max_num_seqs * (self.max_window_blocks + 1) + -(-c.max_num_batched_tokens // self.block_size)
        self.num_sliding_blocks = min(needed, self.num_blocks_without_release)
        left = self._budget_bytes() - self.num_sliding_blocks * num_sliding * self.layer_block_bytes()
        self.num_blocks = max(self.num_blocks_without_release, left // (num_full * self.layer_block_bytes()))

    def _pool(self, layers: list[Attention], num_blocks: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Values [2, layers, blocks, block_size, kv_heads, head_dim] (and int8's scales), viewed by each layer."""
        shape = (2, len(layers), num_blocks, self.block_size, self.model_config.num_kv_heads)
        values = self._zeros((*shape, self.model_config.head_dim), self.dtype)
        scales = self._zeros(shape, torch.float16) if self.dtype == torch.int8 else None
        for i, layer in enumerate(layers):
            layer.k_cache, layer.v_cache = values[0, i], values[1, i]
            if scales is not None:
                layer.k_scale, layer.v_scale = scales[0, i], scales[1, i]
        return values, scales

    def _zeros(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if self.device.type != "cpu":
            return torch.zeros(shape, dtype=dtype, device=self.device)
        # Anonymous pages stay unmapped until a block is first written, so the process holds only the
        # KV memory it has used rather than the whole budget from the start. Not np.zeros: numpy advises
        # huge pages for large arrays, and the first token then mapped a 2 MiB page for each layer's K
        # and V (120 MiB of RSS for SmolLM2 where 4 KiB pages map 240 KiB).
        nbytes = math.prod(shape) * dtype.itemsize
        return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8).view(dtype).view(shape)


def layer_block_bytes(model_config: ModelConfig, dtype: torch.dtype, block_size: int) -> int:
    """Bytes of one KV block of one layer of a model: keys and values (int8: with their scales)."""
    # int8 keeps a float16 scale per token and head beside its head_dim levels.
    token_head_bytes = model_config.head_dim * dtype.itemsize + (2 if dtype == torch.int8 else 0)
    return 2 * block_size * model_config.num_kv_heads * token_head_bytes


def model_block_bytes(config: EngineConfig, model_config: ModelConfig) -> int:
    """Bytes of one KV block of every layer of a model under config, before it is loaded."""
    dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, torch.device(config.device), DTYPES[config.dtype])
    return model_config.num_layers * layer_block_bytes(model_config, dtype, config.block_size)
