"""Gated activations over a fused gate/up projection: SwiGLU (Llama) and GeGLU (Gemma)."""

import torch
import torch.nn.functional as F

from tokenmill import ops


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, for gate_up: [tokens, 2 * dim] holding gate then up."""
    if _fused(gate_up):
        return _run(torch.ops.tokenmill.silu_and_mul, gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gelu(gate) * up with GELU's tanh approximation (Gemma's gelu_pytorch_tanh), for gate_up as above."""
    if _fused(gate_up):
        return _run(torch.ops.tokenmill.gelu_tanh_and_mul, gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def _fused(gate_up: torch.Tensor) -> bool:
    return gate_up.is_cpu and gate_up.dim() == 2 and gate_up.shape[-1] // 2 % ops.LANES == 0 \
        and gate_up.dtype in ops.ELEMENTWISE_DTYPES and ops.available()


def _run(op, gate_up: torch.Tensor) -> torch.Tensor:
    out = gate_up.new_empty(gate_up.shape[0], gate_up.shape[-1] // 2)
    op(gate_up, out)
    return out
