"""Weight-only quantized linear and embedding layers: int8 and int4, with a step and offset per group."""

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.errors import ModelLoadError
from tokenmill import ops

# Dequantized weight rows per tile on the large-batch path: 8 MiB of float32, cache-sized.
_TILE_ELEMENTS = 1 << 21


class QuantizedLinear(nn.Module):
    """y = x @ W.T + b with W stored quantized; the kernel is chosen by batch size and device."""

    # Rows at or above which dequantizing tiles and calling the float32 GEMM beats the
    # quantized kernel; each subclass sets its own from measurements in docs/benchmarks.md.
    large_batch: int
    # The kernels dequantize 16 bytes of a group at a time.
    group_multiple: int

    def __init__(
        self, in_features: int, out_features: int, group_size: int, bias: bool = False, device: torch.device | None = None
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size = _checked_group(group_size, self.group_multiple, in_features)
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None
        self.register_buffer("qweight", self._empty_levels(device))
        # One (step, offset) pair per group: w = step * q + offset.
        self.register_buffer("scale", torch.empty(out_features, in_features // group_size, 2, device=device))

    def load_rows(self, rows: slice, weight: torch.Tensor, name: str) -> None:
        """Quantize float weight rows into rows [rows] of this layer (a checkpoint shard, or all of it)."""
        start, stop, _ = rows.indices(self.out_features)
        if tuple(weight.shape) != (stop - start, self.in_features):
            raise ModelLoadError(
                f"checkpoint tensor {name} has shape {tuple(weight.shape)}, expected {(stop - start, self.in_features)}"
            )
        weight = weight.to(self.qweight.device)
        for chunk in _row_chunks(stop - start, self.in_features):  # bounds the float temporaries
            self._quantize(start + chunk.start, weight[chunk].float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Runs 121 times a step for SmolLM2: the model's 2-D input skips the reshape and view, about
        # 2 us of a 20 us call on a 576 x 576 layer.
        flat = x.dim() == 2
        rows = x if flat else x.reshape(-1, self.in_features)
        if x.device.type != "cpu" or x.dtype != torch.float32:
            out = F.linear(rows, self.dequantize(0, self.out_features).to(x.dtype))
        elif len(rows) < self.large_batch:
            out = rows.new_empty(len(rows), self.out_features)
            self._kernel(rows.contiguous(), out)
        else:
            out = self._tiled(rows)
        if self.bias is not None:
            out += self.bias
        return out if flat else out.view(*x.shape[:-1], self.out_features)

    def _tiled(self, rows: torch.Tensor) -> torch.Tensor:
        # Tiles keep the dequantized weight in cache and bound the extra memory to one tile.
        out = torch.empty(rows.shape[0], self.out_features)
        for tile in _row_chunks(self.out_features, self.in_features):
            torch.mm(rows, self.dequantize(tile.start, tile.stop).T, out=out[:, tile])
        return out

    def dequantize(self, start: int, end: int) -> torch.Tensor:
        """Float32 weight rows [start, end)."""
        raise NotImplementedError

    def _empty_levels(self, device: torch.device | None) -> torch.Tensor:
        raise NotImplementedError

    def _quantize(self, start: int, w: torch.Tensor) -> None:
        raise NotImplementedError

    def _kernel(self, x: torch.Tensor, out: torch.Tensor) -> None:
        raise NotImplementedError


class Int8Linear(QuantizedLinear):
    """int8 weights in groups along the input, each with a float32 step and offset: w = step * q + offset."""

    # 121 SmolLM2 layers, cache-cold: the kernel beats float32 `linear` 2.9x at 1 row and 1.7x at 16;
    # they meet near 32, where tiles and the float32 GEMM take over (docs/benchmarks.md).
    large_batch = 32
    group_multiple = 16

    def _empty_levels(self, device: torch.device | None) -> torch.Tensor:
        return torch.empty(self.out_features, self.in_features, dtype=torch.int8, device=device)

    def _quantize(self, start: int, w: torch.Tensor) -> None:
        # Per group, the closer of two grids: symmetric (step absmax / 127, GGUF Q8_0's) and min-max
        # (256 levels from min to max, which hold GGUF Q4_1's 16: q8 = 17 * q4). Weights read from
        # such a file are reproduced exactly, so int8 adds no error to a Q8_0/Q4_1 model; one scale
        # per output row instead parted greedy output from float32 within 32 tokens on 7 of 8
        # prompts (docs/benchmarks.md).
        w = w.reshape(len(w), -1, self.group_size)
        tiny = torch.finfo(torch.float32).tiny
        sym_step = (w.abs().amax(-1) / 127).clamp(min=tiny)
        sym_q = torch.round(w / sym_step[..., None]).clamp(-127, 127)
        mm_q, mm_step, low = _min_max_grid(w, 255)
        mm_q, mm_offset = mm_q - 128, low + 128 * mm_step  # centred on int8's range
        sym_error = (sym_q * sym_step[..., None] - w).abs().amax(-1)
        mm_error = (mm_q * mm_step[..., None] + mm_offset[..., None] - w).abs().amax(-1)
        symmetric = sym_error <= mm_error
        rows = slice(start, start + len(w))
        self.qweight[rows] = torch.where(symmetric[..., None], sym_q, mm_q).to(torch.int8).view(len(w), -1)
        self.scale[rows] = torch.stack(
            [torch.where(symmetric, sym_step, mm_step), torch.where(symmetric, 0.0, mm_offset)], dim=-1
        )

    def dequantize(self, start: int, end: int) -> torch.Tensor:
        if self.qweight.device.type != "cpu":
            return _dequantize_groups(self.qweight[start:end].float(), self.scale[start:end])
        out = torch.empty(end - start, self.in_features)
        ops.require().int8_dequantize(self.qweight, self.scale, start, out)
        return out

    def _kernel(self, x: torch.Tensor, out: torch.Tensor) -> None:
        ops.require().int8_matmul(x, self.qweight, self.scale, out)


class Int4Linear(QuantizedLinear):
    """4-bit weights in groups along the input, each with a float32 scale and minimum (as GGUF Q4_1)."""

    # It unpacks nibbles again for every 2 input rows, so it loses to tiles sooner than int8 (1.2x
    # float32 at 16 rows, 0.7x at 32).
    large_batch = 16
    # 16 bytes hold 32 weights: one 16-byte chunk is a group's low nibbles and high nibbles.
    group_multiple = 32

    def _empty_levels(self, device: torch.device | None) -> torch.Tensor:
        # Two weights per byte, kept as int32 words (the kernel reads bytes).
        return torch.empty(self.out_features, self.in_features // 8, dtype=torch.int32, device=device)

    def _quantize(self, start: int, w: torch.Tensor) -> None:
        q, step, low = _min_max_grid(w.view(len(w), -1, self.group_size), 15)
        q = q.to(torch.uint8)
        half = self.group_size // 2
        packed = (q[..., :half] | (q[..., half:] << 4)).reshape(len(w), -1)
        self.qweight[start : start + len(w)] = packed.view(torch.int32)
        self.scale[start : start + len(w)] = torch.stack([step, low], dim=-1)

    def dequantize(self, start: int, end: int) -> torch.Tensor:
        if self.qweight.device.type != "cpu":
            q = self.qweight[start:end].view(torch.uint8).view(end - start, -1, self.group_size // 2)
            return _dequantize_groups(torch.cat([q & 15, q >> 4], dim=-1).float(), self.scale[start:end])
        out = torch.empty(end - start, self.in_features)
        ops.require().int4_dequantize(self.qweight, self.scale, start, out)
        return out

    def _kernel(self, x: torch.Tensor, out: torch.Tensor) -> None:
        ops.require().int4_matmul(x, self.qweight, self.scale, out)


def _checked_group(group_size: int, multiple: int, in_features: int) -> int:
    if group_size % multiple or in_features % group_size:
        raise ValueError(
            f"group size {group_size} must be a multiple of {multiple} dividing the input width {in_features}"
        )
    return group_size


def _min_max_grid(w: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each group's weights on levels + 1 evenly spaced values from its min to its max: (q, step, min)."""
    low = w.amin(-1)
    step = ((w.amax(-1) - low) / levels).clamp(min=torch.finfo(torch.float32).tiny)
    return torch.round((w - low[..., None]) / step[..., None]).clamp(0, levels), step, low


def _dequantize_groups(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # q: float levels [rows, in] or [rows, groups, group]; scale [rows, groups, 2] (step, offset).
    grouped = q.reshape(*scale.shape[:2], -1)
    return (grouped * scale[..., :1] + scale[..., 1:]).reshape(len(q), -1)


def _row_chunks(rows: int, width: int) -> list[slice]:
    step = max(1, _TILE_ELEMENTS // width)
    return [slice(start, min(rows, start + step)) for start in range(0, rows, step)]


class Int8Embedding(nn.Module):
    """Token embedding read from an Int8Linear's rows, so a tied LM head and embedding share one copy."""

    def __init__(self, table: Int8Linear, dtype: torch.dtype) -> None:
        super().__init__()
        # Borrowed, not a submodule: the LM head owns the rows, so they are loaded and moved once.
        self.__dict__["table"] = table
        self.dtype = dtype

    def load_rows(self, rows: slice, weight: torch.Tensor, name: str) -> None:
        """Quantize embedding rows into the shared table."""
        self.table.load_rows(rows, weight, name)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = _dequantize_groups(self.table.qweight[flat].float(), self.table.scale[flat])
        return rows.view(*ids.shape, -1).to(self.dtype)
