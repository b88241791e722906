"""The paged KV pool: one preallocated tensor for every layer's keys and values, sized from a memory budget."""

import logging
import math
import mmap

import torch
from torch import nn

from tokenmill.config import EngineConfig, ModelConfig
from tokenmill.dtypes import DTYPES, resolve_kv_cache_dtype
from tokenmill.layers.attention import Attention

logger = logging.getLogger(__name__)

_GIB = 1 << 30


class KVCache:
    """Holds the pool [2, layers, blocks, block_size, kv_heads, head_dim] and hands each Attention layer its views."""

    def __init__(
        self, config: EngineConfig, model_config: ModelConfig, model: nn.Module, num_blocks: int | None = None
    ) -> None:
        self.config = config
        self.model_config = model_config
        self.device = torch.device(config.device)
        self.dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, self.device, DTYPES[config.dtype])
        self.block_size = config.block_size
        # A draft model's pool takes the target's block count (tokenmill/spec_decode/model_proposer.py).
        self.num_blocks = self._num_blocks() if num_blocks is None else num_blocks
        c = model_config
        shape = (2, c.num_layers, self.num_blocks, self.block_size, c.num_kv_heads)
        self.pool = self._zeros((*shape, c.head_dim), self.dtype)
        self.scales = self._zeros(shape, torch.float32) if self.dtype == torch.int8 else None
        layers = [m for m in model.modules() if isinstance(m, Attention)]
        for i, layer in enumerate(layers):
            layer.k_cache, layer.v_cache = self.pool[0, i], self.pool[1, i]
            if self.scales is not None:
                layer.k_scale, layer.v_scale = self.scales[0, i], self.scales[1, i]
        nbytes = self.pool.nbytes + (self.scales.nbytes if self.scales is not None else 0)
        logger.info(
            "KV pool: %d blocks of %d tokens = %d tokens (%.2f GiB of %s)", self.num_blocks, self.block_size,
            self.num_blocks * self.block_size, nbytes / _GIB, str(self.dtype).removeprefix("torch."),
        )

    @property
    def block_bytes(self) -> int:
        """Bytes of one KV block: keys and values of every layer (int8: with their scales)."""
        c = self.model_config
        # int8 keeps a float32 scale per token and head beside its head_dim levels.
        token_head_bytes = c.head_dim * self.dtype.itemsize + (4 if self.dtype == torch.int8 else 0)
        return 2 * c.num_layers * self.block_size * c.num_kv_heads * token_head_bytes

    def _num_blocks(self) -> int:
        budget = self.config.kv_cache_memory
        if budget is None and self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = free * self.config.kv_cache_fraction / _GIB
        return max(1, int((budget if budget is not None else 1.0) * _GIB // self.block_bytes))

    def _zeros(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if self.device.type != "cpu":
            return torch.zeros(shape, dtype=dtype, device=self.device)
        # Anonymous pages stay unmapped until a block is first written, so the process holds only the
        # KV memory it has used rather than the whole budget from the start. Not np.zeros: numpy advises
        # huge pages for large arrays, and the first token then mapped a 2 MiB page for each layer's K
        # and V (120 MiB of RSS for SmolLM2 where 4 KiB pages map 240 KiB).
        nbytes = math.prod(shape) * dtype.itemsize
        return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8).view(dtype).view(shape)
