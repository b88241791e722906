"""Gated activations over a fused gate/up projection: SwiGLU (Llama) and GeGLU (Gemma)."""

import torch
import torch.nn.functional as F

from tokenmill import ops


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, for gate_up: [tokens, 2 * dim] holding gate then up."""
    dim = gate_up.shape[-1] // 2
    if gate_up.device.type == "cpu" and gate_up.dim() == 2 and dim % ops.LANES == 0 and ops.available():
        out = gate_up.new_empty(gate_up.shape[0], dim)
        torch.ops.tokenmill.silu_and_mul(gate_up, out)
        return out
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gelu(gate) * up with GELU's tanh approximation (Gemma's gelu_pytorch_tanh), for gate_up as above."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up
