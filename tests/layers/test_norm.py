"""RMSNorm with the residual add: the C++ op agrees with PyTorch's add and rms_norm, and returns the new residual."""

import pytest
import torch
import torch.nn.functional as F

from tokenmill import ops
from tokenmill.layers.norm import RMSNorm


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fused_add_rms_norm_matches_add_then_rms_norm(dtype, tolerance):
    assert ops.available(), "the C++ ops must build on the test machine"
    norm = RMSNorm(96, eps=1e-5).to(dtype)
    norm.weight.data = torch.rand(96).to(dtype) + 0.5
    x, residual = torch.randn(5, 96).to(dtype), torch.randn(5, 96).to(dtype)
    expected_residual = x.float() + residual.float()
    expected = F.rms_norm(expected_residual, (96,), norm.weight.float(), 1e-5)
    with torch.inference_mode():
        out, new_residual = norm(x.clone(), residual.clone())
    torch.testing.assert_close(new_residual.float(), expected_residual, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(out.float(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_rms_norm_of_strided_head_slices_matches_pytorch_in_place_or_not(dtype, tolerance):
    assert ops.available(), "the C++ ops must build on the test machine"
    norm = RMSNorm(32, eps=1e-6).to(dtype)
    norm.weight.data = torch.rand(32).to(dtype) + 0.5
    # Query heads sliced out of rows that also hold key heads, as the q/k norms see them.
    qk = torch.randn(7, 5, 32).to(dtype)
    heads, keys = qk[:, :3], qk[:, 3:].clone()
    rows = torch.randn(4, 32).to(dtype)
    with torch.inference_mode():
        for x in (heads, rows):
            out = norm(x)
            expected = F.rms_norm(x.float(), (32,), norm.weight.float(), 1e-6)
            assert out.is_contiguous() and out.shape == x.shape
            torch.testing.assert_close(out.float(), expected, rtol=tolerance, atol=tolerance)
        expected = F.rms_norm(heads.float(), (32,), norm.weight.float(), 1e-6)
        norm.normalize_(heads)
    torch.testing.assert_close(qk[:, :3].float(), expected, rtol=tolerance, atol=tolerance)
    assert torch.equal(qk[:, 3:], keys)  # the other heads are left alone
