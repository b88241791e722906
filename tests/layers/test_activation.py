"""Gated activations: the C++ ops (with their own exp) agree with PyTorch's silu / tanh GELU times up."""

import pytest
import torch
import torch.nn.functional as F

from tokenmill import ops
from tokenmill.layers.activation import gelu_tanh_and_mul, silu_and_mul


def _gelu_tanh(gate: torch.Tensor) -> torch.Tensor:
    return F.gelu(gate, approximate="tanh")


@pytest.mark.parametrize(("fused", "reference"), [(silu_and_mul, F.silu), (gelu_tanh_and_mul, _gelu_tanh)])
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_fused_activation_matches_pytorch_times_up(fused, reference, dtype, tolerance):
    assert ops.available(), "the C++ ops must build on the test machine"
    gate_up = (torch.randn(5, 64, generator=torch.Generator().manual_seed(0)) * 8).to(dtype)
    gate_up[0, :4] = torch.tensor([-200.0, -90.0, 90.0, 200.0]).to(dtype)  # past exp's clamps, both sides
    gate, up = gate_up.float().chunk(2, dim=-1)
    torch.testing.assert_close(fused(gate_up).float(), reference(gate) * up, rtol=tolerance, atol=tolerance)
