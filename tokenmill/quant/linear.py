"""Weight-only quantized linear and embedding layers: int8 and int4, with a step and offset per group."""

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.errors import ModelLoadError
from tokenmill import ops
from tokenmill.layers.base import Layer
from tokenmill.quant.levels import LevelRows, dequantize_groups

# The largest |weight| whose group's float16 step and offset stay finite: int8's offset is -128 steps of absmax / 127.
_QUANTIZABLE = 127 * 65504 / 128


class QuantizedLinear(Layer):
    """y = x @ W.T + b with W stored quantized: the C++ kernel on CPU in float32, dequantized elsewhere.

    Weights are unsigned levels in groups along the input, each group with a float16 step and
    offset: w = step * level + offset. They are stored for the CPU kernels (tokenmill/csrc/
    quant_kernel.h), which multiply 16-bit integer inputs into 16 output rows per vector: in
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
        layout = ops.quant_layout()
        self.block_rows = layout.block_rows
        blocks = -(-out_features // self.block_rows)
        # A chunk holds 4 bytes of each of the block's rows: 4 int8 levels or 8 int4 ones.
        chunks = in_features * self.bits // 32
        self.register_buffer("qweight", torch.empty(blocks, chunks, layout.chunk_bytes, dtype=torch.uint8, device=device))
        groups = in_features // group_size
        self.register_buffer("scale", torch.empty(blocks, groups, 2, self.block_rows, dtype=torch.float16, device=device))

    def load_rows(self, rows: slice, weight: torch.Tensor | LevelRows, name: str) -> None:
        """Quantize weight rows into rows [rows] of this layer (a checkpoint shard, or all of it).

        Rows already on this layer's grid (GGUF's 4-bit blocks in int4, those up to 8 bits in int8, groups of 32) go
        in unchanged: the file's own levels, without dequantizing 134M SmolLM2 weights to float and quantizing them
        again.
        """
        start, stop, _ = rows.indices(self.out_features)
        if tuple(weight.shape) != (stop - start, self.in_features):
            raise ModelLoadError(
                f"checkpoint tensor {name} has shape {tuple(weight.shape)}, expected {(stop - start, self.in_features)}"
            )
        # CPU ops (tokenmill/csrc/quantize_weights.cpp): layers for another device are loaded on CPU first.
        if isinstance(weight, LevelRows):
            if weight.bits <= self.bits and weight.group == self.group_size:
                ops.require().pack_weight_rows(weight.levels, weight.step, weight.offset, self.bits, self.qweight,
                                               self.scale, start)
                return
            weight = weight.dequantize()
        weight = weight.float().contiguous()
        if not bool(weight.abs().max() <= _QUANTIZABLE):  # NaN fails this too
            raise ModelLoadError(f"checkpoint tensor {name} holds weights past what int{self.bits}'s float16 scales "
                                 f"can express (|w| up to {_QUANTIZABLE:.0f}); load it with --quantization none")
        ops.require().quantize_weight_rows(weight, self.bits, self.qweight, self.scale, start)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Runs 121 times a step for SmolLM2: the model's 2-D input skips the reshape and view, about
        # 2 us of a 20 us call on a 576 x 576 layer.
        flat = x.dim() == 2
        rows = x if flat else x.reshape(-1, self.in_features)
        if x.is_cpu and x.dtype == torch.float32:
            # Every batch size, so a row's result never depends on its batch: with AMX tiles from 6 rows
            # on it also beats the dequantized tiles + float32 GEMM it replaced, at SmolLM2's 512-token
            # prefill 1815 against 1350 tok/s (docs/benchmarks.md).
            out = rows.new_empty(rows.shape[0], self.out_features)
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
        block, lane = ids // self.block_rows, ids % self.block_rows
        packed = self._lanes()[block, :, lane]  # [rows, chunks, 4]
        if self.bits == 4:
            packed = torch.stack([packed & 15, packed >> 4], dim=2)  # inputs 8c..8c+3, then 8c+4..8c+7
        scale = self.scale[block, :, :, lane].float()  # [rows, groups, (step, offset)]
        return dequantize_groups(packed.reshape(len(ids), -1), scale[..., 0], scale[..., 1])

    def _lanes(self) -> torch.Tensor:
        # [blocks, chunks, row in block, 4 bytes]
        return self.qweight.view(*self.qweight.shape[:2], self.block_rows, 4)


class Int8Linear(QuantizedLinear):
    """int8 weights: 256 levels per group, on the closer of a symmetric and a min-max grid (or a GGUF file's own)."""

    bits = 8


class Int4Linear(QuantizedLinear):
    """4-bit weights: 16 levels per group from its min to its max (or a GGUF Q4_0 or Q4_1 file's own)."""

    bits = 4


def _checked_group(group_size: int, multiple: int, in_features: int) -> int:
    if group_size % multiple:
        raise ValueError(f"group size {group_size} must be a multiple of {multiple}")
    if in_features % multiple:
        # One message said the group size must be a multiple of 32 when it was: the width is what does not fit.
        raise ValueError(f"needs input widths in multiples of {multiple}, and this one is {in_features}; load the "
                         "model with --quantization none")
    if in_features % group_size:
        fits = max(g for g in range(multiple, group_size, multiple) if in_features % g == 0)
        raise ValueError(f"group size {group_size} does not divide the input width {in_features}; "
                         f"--quant-group-size {fits} does")
    return group_size


class Int8Embedding(Layer):
    """Token embedding read from an Int8Linear's rows, so a tied LM head and embedding share one copy."""

    def __init__(self, table: Int8Linear, dtype: torch.dtype) -> None:
        super().__init__()
        # Borrowed, not a submodule: the LM head owns the rows, so they are loaded and moved once.
        self.__dict__["table"] = table
        self.dtype = dtype

    @property
    def out_features(self) -> int:
        """Rows of the table: the vocabulary."""
        return self.table.out_features

    def load_rows(self, rows: slice, weight: torch.Tensor | LevelRows, name: str) -> None:
        """Quantize embedding rows into the shared table."""
        self.table.load_rows(rows, weight, name)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.rows(ids.reshape(-1)).view(*ids.shape, -1).to(self.dtype)
