"""The Triton paged-attention kernel, run by Triton's interpreter on CPU, agrees with the PyTorch path."""

import os

import pytest
import torch

# On a GPU the kernel is compiled and run there; elsewhere Triton's interpreter runs it on CPU. NOTE: read when a
# kernel is defined, so before the module with the kernel is imported (pytest imports every test file first).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tokenmill.layers.attention import Attention, AttentionMetadata, PrefillChunk, _narrow  # noqa: E402

# Triton ships wheels for Linux only (x86_64 and aarch64); the test extras install it there.
pytest.importorskip("triton", reason="Triton has no wheel for this platform")
from tokenmill.layers.triton_attention import paged_attention  # noqa: E402

BLOCK_SIZE = 4
HEADS, KV_HEADS = 6, 2


def _layer(head_dim: int, window: int | None) -> Attention:
    layer = Attention(HEADS, KV_HEADS, head_dim, sliding_window=window)
    gen = torch.Generator().manual_seed(0)
    layer.k_cache = torch.randn(16, BLOCK_SIZE, KV_HEADS, head_dim, generator=gen).to(DEVICE)
    layer.v_cache = torch.randn(16, BLOCK_SIZE, KV_HEADS, head_dim, generator=gen).to(DEVICE)
    return layer


def _mixed_batch() -> AttentionMetadata:
    """Two decodes (scattered blocks, one a single key), then a 5-token chunk after 6 cached tokens."""
    tables = [[3, 9, 1], [12], [5, 0, 14, 7]]
    rows = [tables[0], tables[1]] + [tables[2]] * 5
    lens = [11, 1] + list(range(7, 12))
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in rows])
    slots = torch.tensor([t[(n - 1) // BLOCK_SIZE] * BLOCK_SIZE + (n - 1) % BLOCK_SIZE for t, n in zip(rows, lens)])
    return AttentionMetadata(slot_mapping=slots.to(DEVICE), row_tables=padded.to(DEVICE),
                             row_lens=torch.tensor(lens, device=DEVICE), block_size=BLOCK_SIZE, num_decodes=2,
                             prefills=[PrefillChunk(2, 5, 11)])


# 48: a head size that is no power of two, so the kernel's padded lanes are exercised.
@pytest.mark.parametrize("head_dim", [32, 48])
@pytest.mark.parametrize("window", [None, 3])
def test_kernel_matches_the_pytorch_path_on_decodes_and_a_chunk_after_a_cached_prefix(head_dim, window):
    layer = _layer(head_dim, window)
    meta = _mixed_batch()
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(7, HEADS, head_dim, generator=gen).to(DEVICE)
    k, v = (torch.randn(7, KV_HEADS, head_dim, generator=gen).to(DEVICE) for _ in range(2))
    expected = layer._forward_pytorch(q, k, v, meta)  # also stores this step's keys and values in the pool
    out = paged_attention(q, layer.k_cache, layer.v_cache, meta.row_tables, meta.row_lens, layer.scale, window)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_kernel_reads_an_int8_pool_in_place_as_the_pytorch_path_widens_it():
    layer = _layer(32, None)
    (layer.k_cache, layer.k_scale), (layer.v_cache, layer.v_scale) = _narrow(layer.k_cache, torch.int8), _narrow(
        layer.v_cache, torch.int8)
    meta = _mixed_batch()
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(7, HEADS, 32, generator=gen).to(DEVICE)
    k, v = (torch.randn(7, KV_HEADS, 32, generator=gen).to(DEVICE) for _ in range(2))
    expected = layer._forward_pytorch(q, k, v, meta)
    out = paged_attention(q, layer.k_cache, layer.v_cache, meta.row_tables, meta.row_lens, layer.scale, None,
                          layer.k_scale, layer.v_scale)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # The scales are read: the same value levels with every value scale halved give half the output.
    halved = paged_attention(q, layer.k_cache, layer.v_cache, meta.row_tables, meta.row_lens, layer.scale, None,
                             layer.k_scale, layer.v_scale / 2)
    torch.testing.assert_close(halved, expected / 2, rtol=1e-5, atol=1e-5)


def test_kernel_reads_no_key_past_a_rows_length():
    layer = _layer(32, None)
    meta = _mixed_batch()
    q = torch.randn(7, HEADS, 32, device=DEVICE)
    before = paged_attention(q, layer.k_cache, layer.v_cache, meta.row_tables, meta.row_lens, layer.scale, None)
    layer.k_cache[1, 3:] = 1e4  # past the first decode's 11th key (block 1, slot 2): never read
    layer.v_cache[1, 3:] = 1e4
    layer.k_cache[12, 1:] = 1e4  # past the second decode's only key
    after = paged_attention(q, layer.k_cache, layer.v_cache, meta.row_tables, meta.row_lens, layer.scale, None)
    torch.testing.assert_close(before, after, rtol=0, atol=0)
