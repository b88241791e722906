"""Paged decode attention: the C++ op reads the pool in place and agrees with the gather + SDPA path."""

import pytest
import torch

from tokenmill import ops
from tokenmill.layers.attention import Attention, AttentionMetadata, attention_metadata

BLOCK_SIZE = 4


def _layer(dtype: torch.dtype, num_blocks: int = 16, kv_dtype: torch.dtype | None = None) -> Attention:
    layer = Attention(num_heads=6, num_kv_heads=2, head_dim=32)
    gen = torch.Generator().manual_seed(0)
    layer.k_cache = torch.randn(num_blocks, BLOCK_SIZE, 2, 32, generator=gen).to(kv_dtype or dtype)
    layer.v_cache = torch.randn(num_blocks, BLOCK_SIZE, 2, 32, generator=gen).to(kv_dtype or dtype)
    return layer


def _decode_metadata(tables: list[list[int]], lens: list[int]) -> AttentionMetadata:
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    keys = torch.arange(width * BLOCK_SIZE)
    lens_t = torch.tensor(lens)
    # Each decode's new token goes to its last position.
    slots = [t[(n - 1) // BLOCK_SIZE] * BLOCK_SIZE + (n - 1) % BLOCK_SIZE for t, n in zip(tables, lens)]
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots), num_decodes=len(lens), decode_tables=padded, decode_lens=lens_t,
        decode_mask=(keys < lens_t[:, None])[:, None, None, :], prefills=[],
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_decode_attention_matches_gather_and_sdpa(dtype):
    assert ops.available(), "the C++ ops must build on the test machine"
    layer = _layer(dtype)
    # Scattered, out-of-order blocks; lengths that end mid-block, a single token, and one past two
    # 16-key vectors of scores.
    meta = _decode_metadata([[3, 9, 1], [12], [5, 0, 14, 7, 2, 4, 6, 8, 10]], [11, 1, 35])
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(3, 6, 32, generator=gen).to(dtype)
    k, v = torch.randn(3, 2, 32, generator=gen).to(dtype), torch.randn(3, 2, 32, generator=gen).to(dtype)
    with attention_metadata(meta):
        out = layer(q, k, v)
    expected = layer._decode(q, meta)  # the PyTorch path, over the cache the forward just wrote
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float16])
def test_cpp_decode_attention_reads_a_16_bit_cache_as_the_pytorch_path_does(kv_dtype):
    layer = _layer(torch.float32, kv_dtype=kv_dtype)
    meta = _decode_metadata([[3, 9, 1], [12], [5, 0, 14, 7, 2, 4, 6, 8, 10]], [11, 1, 35])
    gen = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(3, 6, 32, generator=gen), torch.randn(3, 2, 32, generator=gen), torch.randn(3, 2, 32, generator=gen)
    with attention_metadata(meta):
        out = layer(q, k, v)
    # The new keys were rounded into the cache the way a tensor conversion rounds them.
    assert torch.equal(layer.k_cache[1, 2], k[0].to(kv_dtype)) and torch.equal(layer.v_cache[12, 0], v[1].to(kv_dtype))
    torch.testing.assert_close(out, layer._decode(q, meta), rtol=1e-5, atol=1e-5)
    assert out.dtype == torch.float32


def test_cpp_decode_attention_ignores_keys_past_each_length():
    layer = _layer(torch.float32)
    meta = _decode_metadata([[2, 4]], [5])
    q = torch.randn(1, 6, 32)
    k, v = torch.randn(1, 2, 32), torch.randn(1, 2, 32)
    with attention_metadata(meta):
        before = layer(q, k, v)
    layer.k_cache[4, 1:] = 1e4  # past position 5: must not be read
    layer.v_cache[4, 1:] = 1e4
    with attention_metadata(meta):
        after = layer(q, k, v)
    torch.testing.assert_close(before, after, rtol=0, atol=0)


def test_forward_stores_each_token_in_its_slot():
    layer = _layer(torch.float32)
    meta = _decode_metadata([[3, 9, 1], [12]], [11, 1])  # slots 1 * 4 + 2 and 12 * 4 + 0
    qkv = torch.randn(2, 10 * 32)  # k and v as views into a fused row, as the model passes them
    q, k, v = qkv[:, : 6 * 32].view(2, 6, 32), qkv[:, 6 * 32 : 8 * 32].view(2, 2, 32), qkv[:, 8 * 32 :].view(2, 2, 32)
    with attention_metadata(meta):
        layer(q, k, v)
    assert torch.equal(layer.k_cache[1, 2], k[0]) and torch.equal(layer.v_cache[1, 2], v[0])
    assert torch.equal(layer.k_cache[12, 0], k[1]) and torch.equal(layer.v_cache[12, 0], v[1])
