"""Paged attention on GPU as a Triton kernel: every query row reads its own block table in the KV pool, in place."""

import contextlib

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, out_ptr, tables_ptr, lens_ptr,
    scale, window, max_blocks,
    q_stride_t, q_stride_h, o_stride_t, o_stride_h,
    kv_stride_b, kv_stride_s, kv_stride_h, scale_stride_b, scale_stride_s,
    GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    INT8: tl.constexpr,
):
    # One program per (query row, query head): the same job as the C++ op, so decodes, prompt chunks and chunks
    # after a cached prefix are all rows of one launch, with no gather of K/V into a contiguous copy.
    row, head = tl.program_id(0), tl.program_id(1)
    kv_head = head // GROUP
    dims = tl.arange(0, DIM_PAD)
    dim_ok = dims < HEAD_DIM
    q = tl.load(q_ptr + row * q_stride_t + head * q_stride_h + dims, mask=dim_ok, other=0.0).to(tl.float32)
    num_keys = tl.load(lens_ptr + row)  # the row's position + 1: it sees keys [first, num_keys)
    first = tl.where(window > 0, tl.maximum(num_keys - window, 0), 0)
    slots = tl.arange(0, BLOCK_SIZE)
    # Running max, normalizer and weighted sum of the online softmax.
    m = tl.full((), float("-inf"), tl.float32)
    total = tl.full((), 0.0, tl.float32)
    acc = tl.zeros((DIM_PAD,), tl.float32)
    for j in range(first // BLOCK_SIZE, tl.cdiv(num_keys, BLOCK_SIZE)):
        block = tl.load(tables_ptr + row * max_blocks + j).to(tl.int64)
        keys = j * BLOCK_SIZE + slots
        seen = (keys >= first) & (keys < num_keys)
        offsets = block * kv_stride_b + slots[:, None] * kv_stride_s + kv_head * kv_stride_h + dims[None, :]
        both = seen[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + offsets, mask=both, other=0.0).to(tl.float32)
        if INT8:
            # An int8 pool keeps a float16 scale per token and head: widened here, so no copy of the pool is made.
            scale_offsets = block * scale_stride_b + slots * scale_stride_s + kv_head
            k *= tl.load(k_scale_ptr + scale_offsets, mask=seen, other=0.0).to(tl.float32)[:, None]
        scores = tl.where(seen, tl.sum(k * q[None, :], 1) * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 0))
        p = tl.exp(scores - m_new)
        correction = tl.exp(m - m_new)
        v = tl.load(v_ptr + offsets, mask=both, other=0.0).to(tl.float32)
        if INT8:
            v *= tl.load(v_scale_ptr + scale_offsets, mask=seen, other=0.0).to(tl.float32)[:, None]
        acc = acc * correction + tl.sum(p[:, None] * v, 0)
        total = total * correction + tl.sum(p, 0)
        m = m_new
    out = acc / total
    tl.store(out_ptr + row * o_stride_t + head * o_stride_h + dims, out.to(out_ptr.dtype.element_ty), mask=dim_ok)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, row_tables: torch.Tensor,
                    row_lens: torch.Tensor, scale: float, window: int | None,
                    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of q [tokens, heads, head_dim] over the pool [blocks, block_size, kv_heads, head_dim] (an int8
    one with its float16 scales [blocks, block_size, kv_heads]), row by row."""
    tokens, heads, head_dim = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    if tokens == 0:
        return out
    tables = row_tables.contiguous()
    int8 = k_scale is not None and v_scale is not None
    if int8:
        assert k_scale.stride() == v_scale.stride() and k_scale.stride(2) == 1, "scales laid out as the runner's pool"
    else:
        k_scale = v_scale = k_cache  # unread: the kernel takes pointers either way
    # Triton launches on the thread's current device, not the tensors': on cuda:1 it failed ("cannot be accessed").
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _paged_attention_kernel[(tokens, heads)](
            q, k_cache, v_cache, k_scale, v_scale, out, tables, row_lens.contiguous(),
            scale, window or 0, tables.shape[1],
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_scale.stride(0), k_scale.stride(1),
            GROUP=heads // kv_heads, BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
            DIM_PAD=triton.next_power_of_2(head_dim), INT8=int8,
        )
    return out
