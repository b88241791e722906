"""Weight-only quantized linear and embedding layers: int8 and int4, with a step and offset per group."""

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.errors import ModelLoadError
from tokenmill import ops

# Weight elements quantized at a time while loading. int8's two grids make about ten float32
# temporaries of this size: at 2M elements they raised int8's load peak by 22 MiB, at 256K by 4.
_LOAD_ELEMENTS = 1 << 18


class QuantizedLinear(nn.Module):
    """y = x @ W.T + b with W stored quantized: the C++ kernel on CPU in float32, dequantized elsewhere.

    Weights are unsigned levels in groups along the input, each group with a float16 step and
    offset: w = step * level + offset. They are stored for the CPU kernel (tokenmill/csrc/
    quant_kernels.cpp), which multiplies 16-bit integer inputs into 16 output rows per vector: in
    blocks of 16 rows, qweight [blocks, chunks, 64] where each 64-byte chunk holds 4 inputs (int8)
    or 8 (int4, low nibbles then high) of each row; scale [blocks, groups, 2, 16].
    """

    bits: int
    # The kernel reads the inputs in blocks of 32.
    group_multiple = 32

    def __init__(
        self, in_features: int, out_features: int, group_size: int, bias: bool = False, device: torch.device | None = None
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size = _checked_group(group_size, self.group_multiple, in_features)
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None
        blocks = -(-out_features // _BLOCK_ROWS)
        chunks = in_features * self.bits // 32
        self.register_buffer("qweight", torch.empty(blocks, chunks, 64, dtype=torch.uint8, device=device))
        groups = in_features // group_size
        self.register_buffer("scale", torch.empty(blocks, groups, 2, _BLOCK_ROWS, dtype=torch.float16, device=device))

    def load_rows(self, rows: slice, weight: torch.Tensor, name: str) -> None:
        """Quantize float weight rows into rows [rows] of this layer (a checkpoint shard, or all of it)."""
        start, stop, _ = rows.indices(self.out_features)
        if tuple(weight.shape) != (stop - start, self.in_features):
            raise ModelLoadError(
                f"checkpoint tensor {name} has shape {tuple(weight.shape)}, expected {(stop - start, self.in_features)}"
            )
        weight = weight.to(self.qweight.device)
        for chunk in _row_chunks(stop - start, self.in_features):  # bounds the float temporaries
            w = weight[chunk].float().view(-1, self.in_features // self.group_size, self.group_size)
            levels, step, offset = self._quantize(w)
            self._store(start + chunk.start, levels.view(len(w), -1), step, offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Runs 121 times a step for SmolLM2: the model's 2-D input skips the reshape and view, about
        # 2 us of a 20 us call on a 576 x 576 layer.
        flat = x.dim() == 2
        rows = x if flat else x.reshape(-1, self.in_features)
        if x.device.type == "cpu" and x.dtype == torch.float32:
            # Every batch size, so a row's result never depends on its batch: with AMX tiles from 6 rows
            # on it also beats the dequantized tiles + float32 GEMM it replaced, at SmolLM2's 512-token
            # prefill 1815 against 1350 tok/s (docs/benchmarks.md).
            out = rows.new_empty(len(rows), self.out_features)
            ops.require().quantized_matmul(rows.contiguous(), self.qweight, self.scale, self.bits, out)
        else:
            out = F.linear(rows, self.dequantize().to(x.dtype))
        if self.bias is not None:
            out += self.bias
        return out if flat else out.view(*x.shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [out, in]."""
        return self.rows(torch.arange(self.out_features, device=self.qweight.device))

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Float32 weight rows [ids] (any order, repeats allowed), in plain tensor ops."""
        block, lane = ids // _BLOCK_ROWS, ids % _BLOCK_ROWS
        packed = self._lanes()[block, :, lane]  # [rows, chunks, 4]
        if self.bits == 4:
            packed = torch.stack([packed & 15, packed >> 4], dim=2)  # inputs 8c..8c+3, then 8c+4..8c+7
        scale = self.scale[block, :, :, lane].float()  # [rows, groups, (step, offset)]
        return _dequantize_groups(packed.reshape(len(ids), -1).float(), scale)

    def _store(self, start: int, levels: torch.Tensor, step: torch.Tensor, offset: torch.Tensor) -> None:
        # levels: [rows, in] integers in [0, 2 ** bits); step, offset: [rows, groups] on the float16 grid.
        n = len(levels)
        levels = levels.to(torch.uint8)
        if self.bits == 4:
            quads = levels.view(n, -1, 2, 4)
            levels = quads[:, :, 0] | (quads[:, :, 1] << 4)
        ids = torch.arange(start, start + n, device=levels.device)
        block, lane = ids // _BLOCK_ROWS, ids % _BLOCK_ROWS
        self._lanes()[block, :, lane] = levels.view(n, -1, 4)
        self.scale[block, :, :, lane] = torch.stack([step, offset], -1).half()

    def _lanes(self) -> torch.Tensor:
        # [blocks, chunks, row in block, 4 bytes]
        return self.qweight.view(*self.qweight.shape[:2], _BLOCK_ROWS, 4)

    def _quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Levels, step and offset for weight groups w: [rows, groups, group]."""
        raise NotImplementedError


class Int8Linear(QuantizedLinear):
    """int8 weights: 256 levels per group."""

    bits = 8

    def _quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Per group, the closer of two grids: symmetric (step absmax / 127, GGUF Q8_0's) and min-max
        # (256 levels from min to max, which hold GGUF Q4_1's 16: level = 17 * q4). Weights read from a
        # Q8_0 file are reproduced exactly, a Q4_1 file's up to float16 rounding of step / 17; one scale
        # per output row instead parted greedy output from float32 within 32 tokens on 7 of 8 prompts
        # (docs/benchmarks.md).
        sym_step = _half(w.abs().amax(-1) / 127)
        sym = torch.round(w / sym_step[..., None]).clamp(-127, 127) + 128
        sym_offset = -128 * sym_step
        mm, mm_step, low = _min_max_grid(w, 255)
        sym_error = (sym * sym_step[..., None] + sym_offset[..., None] - w).abs().amax(-1)
        mm_error = (mm * mm_step[..., None] + low[..., None] - w).abs().amax(-1)
        symmetric = sym_error <= mm_error
        levels = torch.where(symmetric[..., None], sym, mm)
        return levels, torch.where(symmetric, sym_step, mm_step), torch.where(symmetric, sym_offset, low)


class Int4Linear(QuantizedLinear):
    """4-bit weights: 16 levels per group from its min to its max (as GGUF Q4_1)."""

    bits = 4

    def _quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _min_max_grid(w, 15)


# Output rows the layout interleaves: one per lane of a 512-bit int32 vector.
_BLOCK_ROWS = 16


def _checked_group(group_size: int, multiple: int, in_features: int) -> int:
    if group_size % multiple or in_features % group_size:
        raise ValueError(
            f"group size {group_size} must be a multiple of {multiple} dividing the input width {in_features}"
        )
    return group_size


def _min_max_grid(w: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each group's weights on levels + 1 evenly spaced values from its min to its max: (levels, step, min)."""
    # Levels are fitted to the float16 step and min that are stored: a GGUF block's come back exactly.
    low = _half(w.amin(-1), tiny=False)
    step = _half((w.amax(-1) - low) / levels)
    return torch.round((w - low[..., None]) / step[..., None]).clamp(0, levels), step, low


def _half(t: torch.Tensor, tiny: bool = True) -> torch.Tensor:
    """t rounded to float16 (kept float32); with tiny, at least float16's smallest normal, a usable step."""
    t = t.clamp(min=torch.finfo(torch.float16).tiny) if tiny else t
    return t.half().float()


def _dequantize_groups(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # q: float levels [rows, in] or [rows, groups, group]; scale [rows, groups, 2] (step, offset).
    grouped = q.reshape(*scale.shape[:2], -1)
    return (grouped * scale[..., :1] + scale[..., 1:]).reshape(len(q), -1)


def _row_chunks(rows: int, width: int) -> list[slice]:
    step = max(1, _LOAD_ELEMENTS // width)
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
        return self.table.rows(ids.reshape(-1)).view(*ids.shape, -1).to(self.dtype)
