"""RMSNorm with an optional fused residual add."""

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill import ops
from tokenmill.layers.base import Layer


class RMSNorm(Layer):
    """Root-mean-square layer norm; with a residual, adds it first and returns the new residual too."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        fused = self._fused(x)
        if residual is None:
            if fused:
                out = torch.empty_like(x, memory_format=torch.contiguous_format)
                torch.ops.tokenmill.rms_norm(x, self.weight, self.eps, out)
                return out
            return self._norm(x)
        if fused:
            # NOTE: in place on both, so neither may be a tensor the caller still reads: x is a
            # layer's fresh output and the residual stream is only ever the one from the previous norm.
            torch.ops.tokenmill.fused_add_rms_norm(x, residual, self.weight, self.eps)
            return x, residual
        x = x + residual
        return self._norm(x), x

    def normalize_(self, x: torch.Tensor) -> None:
        """Normalize x in place (rows of heads sliced out of a wider tensor, as the query/key norms see them)."""
        if self._fused(x):
            torch.ops.tokenmill.rms_norm(x, self.weight, self.eps, x)
        else:
            x.copy_(self._norm(x))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # A float32 weight over narrower activations (Gemma's) scales in float32 and rounds once, as transformers
        # does. NOTE: the C++ op takes one type for both, so Gemma 3 in bfloat16 on CPU runs PyTorch's norm.
        if x.dtype == self.weight.dtype:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)

    def _fused(self, x: torch.Tensor) -> bool:
        # Gemma 3 runs 73 plain norms a decode step (query/key, post-attention, post-MLP): PyTorch's five
        # ops for each were 15% of its step.
        return (x.is_cpu and x.shape[-1] % ops.LANES == 0 and x.dim() in (2, 3)
                and x.stride(-1) == 1 and x.dtype == self.weight.dtype and x.dtype in ops.ELEMENTWISE_DTYPES
                and ops.available())
