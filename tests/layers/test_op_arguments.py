"""The C++ ops refuse arguments that disagree in shape, rather than reading or writing past a tensor."""

import pytest
import torch

from tokenmill import ops

pytestmark = pytest.mark.skipif(not ops.available(), reason="the C++ ops are not built on this machine")


def _kv(tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    k, v = torch.randn(tokens, 2, 32), torch.randn(tokens, 2, 32)
    return k, v, torch.zeros(8, 4, 2, 32), torch.zeros(8, 4, 2, 32)


def test_store_kv_refuses_fewer_slots_than_tokens():
    k, v, k_cache, v_cache = _kv(3)
    slots = torch.tensor([5, 9, 17])[:1]  # tokens 1 and 2 went to slots 9 and 17, never given
    with pytest.raises(RuntimeError, match="disagree in shape"):
        torch.ops.tokenmill.store_kv(k, v, k_cache, v_cache, slots, None, None)
    assert k_cache.abs().sum() == 0


def test_store_kv_refuses_v_with_other_tokens_or_rows_than_k():
    k, v, k_cache, v_cache = _kv(3)
    with pytest.raises(RuntimeError, match="disagree in shape"):
        torch.ops.tokenmill.store_kv(k, v[:1], k_cache, v_cache, torch.tensor([0, 1, 2]), None, None)
    with pytest.raises(RuntimeError, match="disagree in shape"):  # 4 heads of 16 where the caches hold 2 of 32
        torch.ops.tokenmill.store_kv(k.view(3, 4, 16), v.view(3, 4, 16), k_cache, v_cache, torch.tensor([0, 1, 2]),
                                     None, None)


def test_fused_add_rms_norm_refuses_a_short_weight_as_rms_norm_does():
    x, residual, weight = torch.randn(2, 32), torch.randn(2, 32), torch.ones(64)[:16]
    with pytest.raises(RuntimeError):
        torch.ops.tokenmill.rms_norm(x, weight, 1e-6, torch.empty_like(x))
    with pytest.raises(RuntimeError):
        torch.ops.tokenmill.fused_add_rms_norm(x, residual, weight, 1e-6)


def test_rotary_refuses_a_sin_shorter_than_its_cos():
    x, cos, sin = torch.randn(4, 2, 32), torch.ones(4, 1, 16), torch.zeros(64)[:16].view(1, 1, 16)
    with pytest.raises(RuntimeError):
        torch.ops.tokenmill.rotary_(x, cos, sin)
