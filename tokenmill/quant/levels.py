"""Weight rows already on a grid of levels, as a GGUF file's Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 blocks store them."""

from typing import NamedTuple

import torch


class LevelRows(NamedTuple):
    """Weight rows w = step * level + offset, per group of inputs: loaded into a layer of the same grid unchanged."""

    levels: torch.Tensor  # uint8 [rows, K], each below 2 ** bits
    step: torch.Tensor  # float16 [rows, groups]
    offset: torch.Tensor  # float16 [rows, groups]
    bits: int

    @property
    def shape(self) -> torch.Size:
        return self.levels.shape

    @property
    def group(self) -> int:
        """Inputs per group."""
        return self.levels.shape[1] // self.step.shape[1]

    def dequantize(self) -> torch.Tensor:
        """The float32 rows, for a layer on another grid or one kept in float."""
        return dequantize_groups(self.levels, self.step, self.offset)


def dequantize_groups(levels: torch.Tensor, step: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Float32 rows [rows, K] from levels [rows, K] and each group's step and offset [rows, groups]."""
    grouped = levels.float().reshape(*step.shape, -1)
    return (grouped * step.float()[..., None] + offset.float()[..., None]).reshape(len(levels), -1)
