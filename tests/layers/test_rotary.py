"""Rotary angles, and in-place rotary on the fused QKV output: the C++ op matches apply_rotary, V columns untouched."""

import math

import pytest
import torch

from tokenmill import ops
from tokenmill.errors import ModelLoadError
from tokenmill.layers.rotary import RotaryEmbedding, apply_rotary, apply_rotary_


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_in_place_rotary_on_qkv_view_matches_apply_rotary(dtype, tolerance):
    assert ops.available(), "the C++ ops must build on the test machine"
    rotary = RotaryEmbedding(head_dim=32, theta=10000.0)
    positions = torch.tensor([0, 7, 63, 5])
    cos, sin = rotary.cos_sin(positions, dtype)
    qkv = torch.randn(4, 6 * 32).to(dtype)  # 3 query heads, 1 key head, 2 value heads
    qk = qkv[:, : 4 * 32].view(4, 4, 32)
    expected = apply_rotary(qk.clone(), cos, sin)
    untouched = qkv[:, 4 * 32 :].clone()
    apply_rotary_(qk, cos, sin)
    torch.testing.assert_close(qk, expected, rtol=tolerance, atol=tolerance)
    assert torch.equal(qkv[:, 4 * 32 :], untouched)


def test_angles_are_float64_products_rounded_once_to_float32():
    rotary = RotaryEmbedding(head_dim=8, theta=10000.0)
    positions = torch.tensor([0, 3, 8191, 100_000])  # far past any table: computed, not looked up
    cos, sin = rotary.cos_sin(positions, torch.float32)
    assert cos.shape == sin.shape == (4, 1, 4)
    for row, position in enumerate(positions.tolist()):
        for i in range(4):
            angle = position * (1.0 / 10000.0 ** (2 * i / 8))
            # float32 angles would be off by up to 0.004 radians at position 100,000
            assert cos[row, 0, i].item() == torch.tensor(math.cos(angle)).float().item()
            assert sin[row, 0, i].item() == torch.tensor(math.sin(angle)).float().item()


@pytest.mark.parametrize("scaling, freq_factors, message", [
    ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}, None,
     "llama3 rope scaling without low_freq_factor, high_freq_factor"),
    (None, torch.ones(5), "rope_freqs holds 5 factors; a head_dim of 64 rotates 32 frequencies"),
])
def test_rope_settings_that_do_not_fit_are_load_errors(scaling, freq_factors, message):
    with pytest.raises(ModelLoadError, match=message):
        RotaryEmbedding(64, 10_000.0, scaling, freq_factors)
