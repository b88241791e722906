"""Weight-only quantized linear and embedding layers: int8 per output row, int4 per group."""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.quant import kernels

# Dequantized weight rows per tile on the large-batch path: 8 MiB of float32, cache-sized.
_TILE_ELEMENTS = 1 << 21


class QuantizedLinear(nn.Module):
    """y = x @ W.T + b with W stored quantized; the kernel is chosen by batch size and device."""

    # Rows at or above which dequantizing tiles and calling the float32 GEMM beats the
    # quantized kernel (measured on the 2-core AVX2 machine, docs/benchmarks.md).
    large_batch: int

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if x.device.type != "cpu" or x.dtype != torch.float32:
            out = F.linear(rows, self.dequantize(0, self.out_features).to(x.dtype))
        elif rows.shape[0] < self.large_batch:
            out = torch.empty(rows.shape[0], self.out_features)
            self._kernel(rows.contiguous().numpy(), out.numpy())
        else:
            out = self._tiled(rows)
        if self.bias is not None:
            out += self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def _tiled(self, rows: torch.Tensor) -> torch.Tensor:
        # Tiles keep the dequantized weight in cache and bound the extra memory to one tile.
        out = torch.empty(rows.shape[0], self.out_features)
        for tile in _row_chunks(self.out_features, self.in_features):
            torch.mm(rows, self.dequantize(tile.start, tile.stop).T, out=out[:, tile])
        return out

    def dequantize(self, start: int, end: int) -> torch.Tensor:
        """Float32 weight rows [start, end)."""
        raise NotImplementedError

    def _kernel(self, x: np.ndarray, out: np.ndarray) -> None:
        raise NotImplementedError


class Int8Linear(QuantizedLinear):
    """int8 weights with one float32 scale per output row (symmetric, absmax / 127)."""

    large_batch = 32

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias)
        self.register_buffer("qweight", torch.empty(weight.shape, dtype=torch.int8, device=weight.device))
        self.register_buffer("scale", torch.empty(self.out_features, device=weight.device))
        for rows in _row_chunks(self.out_features, self.in_features):  # bounds the float temporaries
            w = weight[rows].detach().float()
            scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
            self.qweight[rows] = torch.round(w / scale[:, None]).clamp(-127, 127)
            self.scale[rows] = scale

    def dequantize(self, start: int, end: int) -> torch.Tensor:
        if self.qweight.device.type != "cpu":
            return self.qweight[start:end].float() * self.scale[start:end, None]
        out = torch.empty(end - start, self.in_features)
        kernels.int8_dequantize(self.qweight.numpy(), self.scale.numpy(), start, out.numpy())
        return out

    def _kernel(self, x: np.ndarray, out: np.ndarray) -> None:
        kernels.int8_matmul(x, self.qweight.numpy(), self.scale.numpy(), out)


class Int4Linear(QuantizedLinear):
    """4-bit weights in groups along the input, each with a float32 scale and minimum (as GGUF Q4_1)."""

    large_batch = 8

    def __init__(self, weight: torch.Tensor, group_size: int, bias: torch.Tensor | None = None) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias)
        if group_size % 8 or self.in_features % group_size:
            raise ValueError(
                f"int4 group size {group_size} must be a multiple of 8 dividing the input width {self.in_features}"
            )
        self.group_size = group_size
        w = weight.detach().float().view(self.out_features, -1, group_size)
        low, high = w.amin(dim=-1), w.amax(dim=-1)
        step = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
        q = torch.round((w - low[..., None]) / step[..., None]).clamp(0, 15).to(torch.uint8)
        half = group_size // 2
        packed = (q[..., :half] | (q[..., half:] << 4)).reshape(self.out_features, -1)
        self.register_buffer("qweight", packed.view(torch.int32))  # uint32 words for the kernel
        self.register_buffer("scale", torch.stack([step, low], dim=-1))  # [out, groups, 2]

    def dequantize(self, start: int, end: int) -> torch.Tensor:
        if self.qweight.device.type != "cpu":
            q = self.qweight[start:end].view(torch.uint8).view(end - start, -1, self.group_size // 2)
            q = torch.cat([q & 15, q >> 4], dim=-1).float()
            s = self.scale[start:end]
            return (q * s[..., :1] + s[..., 1:]).view(end - start, self.in_features)
        out = torch.empty(end - start, self.in_features)
        kernels.int4_dequantize(self._words(), self.scale.numpy(), start, out.numpy())
        return out

    def _kernel(self, x: np.ndarray, out: np.ndarray) -> None:
        kernels.int4_matmul(x, self._words(), self.scale.numpy(), out)

    def _words(self) -> np.ndarray:
        return self.qweight.numpy().view("uint32")


def _row_chunks(rows: int, width: int) -> list[slice]:
    step = max(1, _TILE_ELEMENTS // width)
    return [slice(start, min(rows, start + step)) for start in range(0, rows, step)]


class Int8Embedding(nn.Module):
    """Token embedding read from an Int8Linear's rows, so a tied LM head and embedding share one copy."""

    def __init__(self, table: Int8Linear, dtype: torch.dtype) -> None:
        super().__init__()
        self.table, self.dtype = table, dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.table.qweight[ids].float() * self.table.scale[ids, None]).to(self.dtype)
