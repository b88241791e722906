"""Paged decode attention: the C++ op reads the pool in place and agrees with the gather + SDPA path."""

import platform

import pytest
import torch

from tokenmill import ops
from tokenmill.layers import attention
from tokenmill.layers.attention import Attention, AttentionMetadata, PrefillChunk, _narrow, _widen, attention_metadata

BLOCK_SIZE = 4


def _layer(
    dtype: torch.dtype, num_blocks: int = 16, kv_dtype: torch.dtype | None = None, num_heads: int = 6,
    num_kv_heads: int = 2, head_dim: int = 32,
) -> Attention:
    layer = Attention(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
    gen = torch.Generator().manual_seed(0)
    kv_dtype = kv_dtype or dtype
    for name in ("k", "v"):
        values = torch.randn(num_blocks, BLOCK_SIZE, num_kv_heads, head_dim, generator=gen)
        if kv_dtype == torch.int8:
            levels, scale = _narrow(values, torch.int8)
            setattr(layer, f"{name}_cache", levels)
            setattr(layer, f"{name}_scale", scale)
        else:
            setattr(layer, f"{name}_cache", values.to(kv_dtype))
    return layer


def _decode_metadata(tables: list[list[int]], lens: list[int]) -> AttentionMetadata:
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    # Each decode's new token goes to its last position.
    slots = [t[(n - 1) // BLOCK_SIZE] * BLOCK_SIZE + (n - 1) % BLOCK_SIZE for t, n in zip(tables, lens)]
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots), row_tables=padded, row_lens=torch.tensor(lens), block_size=BLOCK_SIZE,
        num_decodes=len(lens), prefills=[],
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


# The op takes a KV head's query heads in chunks (up to 4, held in registers or read from memory by head size):
# groups of 1 to 8 split into one or several chunks, with and without a last short one.
@pytest.mark.parametrize("head_dim, num_heads, num_kv_heads", [
    (64, 9, 3), (64, 14, 2), (128, 8, 1), (128, 6, 2), (256, 8, 1), (256, 4, 4),
])
def test_cpp_decode_attention_matches_sdpa_for_each_head_size_and_group(head_dim, num_heads, num_kv_heads):
    layer = _layer(torch.float32, kv_dtype=torch.float16, num_heads=num_heads, num_kv_heads=num_kv_heads,
                   head_dim=head_dim)
    meta = _decode_metadata([[3, 9, 1], [12], [5, 0, 14, 7, 2, 4, 6, 8, 10]], [11, 1, 35])
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(3, num_heads, head_dim, generator=gen)
    k, v = torch.randn(2, 3, num_kv_heads, head_dim, generator=gen)
    with attention_metadata(meta):
        out = layer(q, k, v)
    torch.testing.assert_close(out, layer._decode(q, meta), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float16, torch.int8])
def test_cpp_decode_attention_reads_a_narrow_cache_as_the_pytorch_path_does(kv_dtype):
    layer = _layer(torch.float32, kv_dtype=kv_dtype)
    meta = _decode_metadata([[3, 9, 1], [12], [5, 0, 14, 7, 2, 4, 6, 8, 10]], [11, 1, 35])
    gen = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(3, 6, 32, generator=gen), torch.randn(3, 2, 32, generator=gen), torch.randn(3, 2, 32, generator=gen)
    with attention_metadata(meta):
        out = layer(q, k, v)
    # The new keys were rounded into the cache as the PyTorch path rounds them (int8: levels and scale).
    levels, scale = _narrow(k[0], kv_dtype)
    assert torch.equal(layer.k_cache[1, 2], levels)
    if scale is not None:
        assert torch.equal(layer.k_scale[1, 2], scale)
    # int8 applies each scale to a dot product, the PyTorch path to each element: rounding apart.
    torch.testing.assert_close(out, layer._decode(q, meta), rtol=1e-5, atol=1e-5 if scale is None else 1e-4)
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


def test_int8_cache_keeps_each_value_within_half_a_step_and_stores_zeros_exactly():
    x = torch.randn(5, 2, 32)
    x[1, 0] = 0.0  # a head of zeros: scale 0, levels 0, no division by zero
    levels, scale = _narrow(x, torch.int8)
    assert levels.dtype == torch.int8 and scale.shape == (5, 2)
    assert torch.equal(levels[1, 0], torch.zeros(32, dtype=torch.int8)) and scale[1, 0] == 0
    assert levels.abs().amax() == 127  # each head's largest value takes the top level
    assert ((levels.float() * scale.float()[..., None] - x).abs() <= scale.float()[..., None] / 2 + 1e-7).all()


@pytest.mark.parametrize("size", [1e-2, 1e-5, 1e-9, 1e7])
def test_int8_cache_scales_in_float16_keep_levels_in_range_at_any_size(size):
    # Scales of 2e-4 (float16's normal range), 2e-7 and 2e-11 (below it: coarse or underflowing) are rounded up,
    # so levels from the rounded scale never pass 127 and each value stays within half a step; past float16's
    # largest scale (values over 8e6) the levels clamp and keep their sign.
    x = torch.randn(64, 2, 32, generator=torch.Generator().manual_seed(0)) * size
    levels, scale = _narrow(x, torch.int8)
    assert scale.dtype == torch.float16 and torch.isfinite(scale).all() and (scale > 0).all()
    assert levels.abs().amax() <= 127 and (levels.sign() * x.sign() >= 0).all()
    error = (levels.float() * scale.float()[..., None] - x).abs()
    if size < 1e6:
        assert (error <= scale.float()[..., None] / 2).all()


def _prompt_metadata(table: list[int], start: int, stop: int) -> AttentionMetadata:
    """Metadata for prompt positions [start, stop) of one sequence, as the runner builds it."""
    positions = torch.arange(start, stop)
    slots = torch.tensor([table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(start, stop)])
    chunk = PrefillChunk(0, stop - start, stop)
    return AttentionMetadata(
        slot_mapping=slots, row_tables=torch.tensor([table] * (stop - start)), row_lens=positions + 1,
        block_size=BLOCK_SIZE, num_decodes=0, prefills=[chunk],
    )


# The C++ op takes a prompt's rows 4 at a time where it can (not with head_dim 128), one at a time otherwise:
# rows 4-7 are one tile of the whole prompt and three chunks' rows alone.
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16, torch.int8])
@pytest.mark.parametrize("head_dim, num_heads, num_kv_heads", [(32, 6, 2), (64, 9, 3), (128, 8, 2), (256, 4, 1)])
def test_prompt_rows_are_the_same_bits_whole_or_in_chunks(kv_dtype, head_dim, num_heads, num_kv_heads):
    table, n = [3, 9, 1, 12, 5], 18
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(n, num_heads, head_dim, generator=gen)
    k, v = torch.randn(2, n, num_kv_heads, head_dim, generator=gen)
    shape = {"num_heads": num_heads, "num_kv_heads": num_kv_heads, "head_dim": head_dim}
    whole_layer = _layer(torch.float32, kv_dtype=kv_dtype, **shape)
    chunked_layer = _layer(torch.float32, kv_dtype=kv_dtype, **shape)
    with attention_metadata(_prompt_metadata(table, 0, n)):
        whole = whole_layer(q, k, v)
    chunks = []
    for start, stop in [(0, 7), (7, 8), (8, 18)]:
        with attention_metadata(_prompt_metadata(table, start, stop)):
            chunks.append(chunked_layer(q[start:stop], k[start:stop], v[start:stop]))
    assert torch.equal(whole, torch.cat(chunks))
    # And it is causal attention: the PyTorch path's SDPA over the same cached keys and values.
    with attention_metadata(_prompt_metadata(table, 0, n)):
        reference = whole_layer._forward_pytorch(q, k, v, attention.current_metadata())
    torch.testing.assert_close(whole, reference, rtol=1e-4, atol=1e-4)


def test_rows_of_two_sequences_in_a_row_are_not_taken_as_one_prompt():
    # Sequence a's last two prompt rows (positions 5 and 6) and b's first two (7 and 8) share a cached first block:
    # four rows, each seeing one key more, but b's keys past that block are its own.
    layer = _layer(torch.float32, num_heads=9, num_kv_heads=3, head_dim=64)
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(4, 9, 64, generator=gen)
    tables, lens = torch.tensor([[3, 9, 1]] * 2 + [[3, 12, 5]] * 2), torch.tensor([6, 7, 8, 9])

    def attend(rows: slice) -> torch.Tensor:
        out = torch.empty_like(q[rows])
        torch.ops.tokenmill.paged_attention(q[rows], layer.k_cache, layer.v_cache, tables[rows].contiguous(),
                                            lens[rows].contiguous(), layer.scale, 0, out, None, None)
        return out

    assert ops.available(), "the C++ ops must build on the test machine"
    assert torch.equal(attend(slice(0, 4)), torch.cat([attend(slice(0, 2)), attend(slice(2, 4))]))


def _naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Causal attention of a whole prompt where query i sees keys i - window + 1 .. i (grouped heads)."""
    k, v = k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1)  # 6 heads over 2 KV heads
    i, j = torch.arange(len(q))[:, None], torch.arange(len(q))[None, :]
    scores = torch.einsum("qhd,khd->hqk", q, k) * 32**-0.5
    scores = scores.masked_fill(~((j <= i) & (j > i - window)), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("window", [1, 5, 16])
def test_sliding_window_prompt_rows_see_only_their_last_keys_on_both_paths(window):
    table, n = [3, 9, 1, 12, 5], 18
    gen = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(n, 6, 32, generator=gen), torch.randn(n, 2, 32, generator=gen), torch.randn(n, 2, 32, generator=gen)
    layer = _layer(torch.float32)
    layer.sliding_window = window
    expected = _naive(q, k, v, window)
    with attention_metadata(_prompt_metadata(table, 0, n)):
        torch.testing.assert_close(layer(q, k, v), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer._forward_pytorch(q, k, v, attention.current_metadata()), expected, rtol=1e-5, atol=1e-5)
    chunked = _layer(torch.float32)  # a chunk after cached rows takes the masked SDPA path
    chunked.sliding_window = window
    for start, stop in [(0, 7), (7, 18)]:
        with attention_metadata(_prompt_metadata(table, start, stop)):
            rows = chunked._forward_pytorch(q[start:stop], k[start:stop], v[start:stop], attention.current_metadata())
    torch.testing.assert_close(rows, expected[7:], rtol=1e-5, atol=1e-5)


def test_sliding_window_decodes_ignore_keys_before_the_window_on_both_paths():
    layer = _layer(torch.float32)
    layer.sliding_window = 6
    meta = _decode_metadata([[3, 9, 1], [12], [5, 0, 14, 7, 2, 4, 6, 8, 10]], [11, 1, 35])
    gen = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(3, 6, 32, generator=gen), torch.randn(3, 2, 32, generator=gen), torch.randn(3, 2, 32, generator=gen)
    with attention_metadata(meta):
        before = layer(q, k, v)
    torch.testing.assert_close(before, layer._decode(q, meta), rtol=1e-5, atol=1e-5)
    layer.k_cache[3], layer.k_cache[9, 0] = 1e4, 1e4  # positions 0-4 of the first row (its window: 5-10)
    layer.v_cache[3], layer.v_cache[9, 0] = 1e4, 1e4
    layer.k_cache[8, 0] = -1e4  # and position 28 of the third (its window: 29-34)
    with attention_metadata(meta):
        after = layer(q, k, v)
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    torch.testing.assert_close(after, layer._decode(q, meta), rtol=1e-5, atol=1e-5)


def _attend(layer: Attention, q: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, window: int = 0) -> torch.Tensor:
    out = torch.empty_like(q)
    torch.ops.tokenmill.paged_attention(q, layer.k_cache, layer.v_cache, tables, lens, layer.scale, window, out,
                                        None, None)
    return out


def test_subnormals_are_flushed_inside_the_op_and_kept_outside_it():
    # Values below float32's smallest normal (1.2e-38) read as zero inside the op (x86 slows to microcode on them);
    # the calling thread's own arithmetic keeps them after the op returns.
    assert ops.available(), "the C++ ops must build on the test machine"
    layer = _layer(torch.float32)
    layer.v_cache.fill_(1e-39)
    q = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(5))
    out = _attend(layer, q, torch.tensor([[3, 9, 1], [12, 0, 0]]), torch.tensor([11, 3]))
    if platform.machine() in ("x86_64", "AMD64"):
        assert torch.equal(out, torch.zeros_like(out))
    else:  # other CPUs keep their default mode: IEEE subnormals
        assert (out > 0).all()
    assert (torch.tensor([1e-38]) / 10).item() > 0


@pytest.mark.parametrize("tables, lens, window, message", [
    ([[3, 9, 1]], [13], 0, "row 0 sees 13 keys, outside 1 to 12"),
    ([[3, 9, 1]], [0], 0, "row 0 sees 0 keys"),
    ([[3, 16, 1]], [9], 0, "block 16 is outside the KV cache"),
    ([[-1, 9, 1]], [9], 0, "block -1 is outside the KV cache"),
    ([[-1, 9, 1]], [10], 4, None),  # under a window of 4, row 0 reads keys 6-9 only: block -1 is never read
])
def test_rows_that_would_read_outside_the_caches_are_refused(tables, lens, window, message):
    assert ops.available(), "the C++ ops must build on the test machine"
    layer = _layer(torch.float32)  # 16 blocks of 4
    q = torch.randn(1, 6, 32)
    if message is None:
        assert torch.isfinite(_attend(layer, q, torch.tensor(tables), torch.tensor(lens), window)).all()
    else:
        with pytest.raises(RuntimeError, match=message):
            _attend(layer, q, torch.tensor(tables), torch.tensor(lens), window)


@pytest.mark.parametrize(
    "q_shape, out_shape", [((1, 6, 64), (1, 6, 64)), ((1, 5, 32), (1, 5, 32)), ((1, 6, 32), (2, 6, 32))],
    ids=["head_dim", "heads", "out"],
)
def test_shapes_that_do_not_fit_the_caches_are_refused(q_shape, out_shape):
    assert ops.available(), "the C++ ops must build on the test machine"
    layer = _layer(torch.float32)  # 2 KV heads of 32
    with pytest.raises(RuntimeError, match="caches \\[blocks, block_size, kv_heads, D\\] alike"):
        torch.ops.tokenmill.paged_attention(torch.randn(q_shape), layer.k_cache, layer.v_cache, torch.tensor([[3, 9]]),
                                            torch.tensor([5]), layer.scale, 0, torch.empty(out_shape), None, None)

@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16, torch.int8])
@pytest.mark.parametrize("head_dim", [32, 64, 128, 256])
@pytest.mark.parametrize("window", [0, 700])
def test_a_long_decode_row_split_across_threads_is_the_same_bits_as_in_a_batch(kv_dtype, head_dim, window):
    # One row of one KV head over 1,000 keys leaves threads idle: its scores split over key ranges and its sums
    # over heads or halves of the lanes. In a batch of four the row is one task of its own.
    assert ops.available(), "the C++ ops must build on the test machine"
    layer = _layer(torch.float32, num_blocks=260, kv_dtype=kv_dtype, num_heads=3, num_kv_heads=1, head_dim=head_dim)
    gen = torch.Generator().manual_seed(6)
    table = torch.randperm(260, generator=gen)[:250]
    q = torch.randn(1, 3, head_dim, generator=gen)

    def attend(rows: int) -> torch.Tensor:
        out = torch.empty(rows, 3, head_dim)
        scales = (layer.k_scale, layer.v_scale) if kv_dtype == torch.int8 else (None, None)
        torch.ops.tokenmill.paged_attention(q.expand(rows, 3, head_dim).contiguous(), layer.k_cache, layer.v_cache,
                                            table.expand(rows, 250).contiguous(), torch.full((rows,), 1000),
                                            layer.scale, window, out, *scales)
        return out

    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        alone, batched = attend(1), attend(4)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone[0], batched[0])
    keys, values = (
        _widen(getattr(layer, f"{name}_cache"), getattr(layer, f"{name}_scale", None), torch.float32)[table]
        .flatten(0, 1)[window and -window:]
        for name in ("k", "v")
    )
    expected = torch.softmax(q[0] @ keys[:, 0].T * layer.scale, dim=-1) @ values[:, 0]
    torch.testing.assert_close(alone[0], expected, rtol=1e-4, atol=1e-4)
