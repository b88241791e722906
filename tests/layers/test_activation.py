"""SwiGLU's activation: the C++ op (with its own exp) agrees with PyTorch's silu times up."""

import pytest
import torch
import torch.nn.functional as F

from tokenmill import ops
from tokenmill.layers.activation import silu_and_mul


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_silu_and_mul_matches_silu_times_up(dtype, tolerance):
    assert ops.available(), "the C++ ops must build on the test machine"
    gate_up = (torch.randn(5, 64, generator=torch.Generator().manual_seed(0)) * 8).to(dtype)
    gate_up[0, :4] = torch.tensor([-200.0, -90.0, 90.0, 200.0]).to(dtype)  # past exp's clamps, both sides
    gate, up = gate_up.float().chunk(2, dim=-1)
    torch.testing.assert_close(silu_and_mul(gate_up).float(), F.silu(gate) * up, rtol=tolerance, atol=tolerance)
