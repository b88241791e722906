"""Numba CPU kernels for weight-only int8 and int4 matmuls at small batch, and dequantization.

Why numba: on this CPU class (AVX2, no VNNI) PyTorch's stock weight-only ops and compiled
dequantize-then-matmul run 2-9x slower than the float32 matmul at batch 1, while these loops,
which widen int8 to float32 inside an FMA reduction, read the 49152x576 LM head in about 1 ms
(float32: 9 ms). A C++ extension would need a compiler on every user's machine; numba ships
as a wheel. Measurements are in docs/benchmarks.md.
"""

import numpy as np
from numba import njit, prange

# Output rows each int4 task unpacks into a float32 buffer before dotting with every input row.
_INT4_ROWS = 16


@njit(parallel=True, fastmath=True, cache=True)
def int8_matmul(x: np.ndarray, q: np.ndarray, scale: np.ndarray, out: np.ndarray) -> None:
    """out = x @ dequantized(q).T; q int8 [N, K], scale float32 [N, groups, 2] (step, offset)."""
    rows, k_dim = x.shape
    groups = scale.shape[1]
    group = k_dim // groups
    # w = step * q + offset, so each group's dot is step * (x . q) + offset * sum(x): the sums are
    # shared by every output row. Loops index base + k from 0: LLVM left range(start, stop) scalar
    # here, 6x slower.
    x_sums = np.empty((rows, groups), np.float32)
    for m in range(rows):
        for g in range(groups):
            x_sums[m, g] = x[m, g * group : (g + 1) * group].sum()
    for n in prange(q.shape[0]):
        w, s = q[n], scale[n]
        for m in range(rows):
            xm, xs = x[m], x_sums[m]
            total = np.float32(0.0)
            for g in range(groups):
                acc = np.float32(0.0)
                base = g * group
                for k in range(group):
                    acc += xm[base + k] * np.float32(w[base + k])
                total += acc * s[g, 0] + xs[g] * s[g, 1]
            out[m, n] = total


@njit(parallel=True, fastmath=True, cache=True)
def int8_dequantize(q: np.ndarray, scale: np.ndarray, start: int, out: np.ndarray) -> None:
    """out[i] = dequantized row start + i, for as many rows as out has."""
    groups = scale.shape[1]
    group = out.shape[1] // groups
    for i in prange(out.shape[0]):
        w, s, o = q[start + i], scale[start + i], out[i]
        for g in range(groups):
            step, offset, base = s[g, 0], s[g, 1], g * group
            for k in range(group):
                o[base + k] = np.float32(w[base + k]) * step + offset


@njit(fastmath=True, cache=True)
def _unpack_int4_row(
    packed: np.ndarray, scale: np.ndarray, low: np.ndarray, high: np.ndarray, out: np.ndarray
) -> None:
    # packed: one row as uint32 words; byte j of group g holds element j (low nibble) and
    # element j + group/2 (high nibble). Masking whole words keeps the unpacking vectorized;
    # low and high are the caller's scratch words, so no row allocates.
    for i in range(packed.shape[0]):
        low[i] = packed[i] & np.uint32(0x0F0F0F0F)
        high[i] = (packed[i] >> np.uint32(4)) & np.uint32(0x0F0F0F0F)
    low8, high8 = low.view(np.uint8), high.view(np.uint8)
    groups = scale.shape[0]
    group = out.shape[0] // groups
    half = group // 2
    for g in range(groups):
        s, mn = scale[g, 0], scale[g, 1]
        lo, hi = low8[g * half : (g + 1) * half], high8[g * half : (g + 1) * half]
        out_lo, out_hi = out[g * group : g * group + half], out[g * group + half : (g + 1) * group]
        for j in range(half):
            out_lo[j] = np.float32(lo[j]) * s + mn
            out_hi[j] = np.float32(hi[j]) * s + mn


@njit(parallel=True, fastmath=True, cache=True)
def int4_matmul(x: np.ndarray, packed: np.ndarray, scale: np.ndarray, out: np.ndarray) -> None:
    """out = x @ dequantized(packed).T; packed uint32 [N, K/8], scale float32 [N, groups, 2] (scale, min)."""
    rows, k_dim = x.shape
    n_dim = packed.shape[0]
    for task in prange((n_dim + _INT4_ROWS - 1) // _INT4_ROWS):
        low, high = np.empty(packed.shape[1], np.uint32), np.empty(packed.shape[1], np.uint32)
        w = np.empty(k_dim, np.float32)
        for n in range(task * _INT4_ROWS, min(n_dim, (task + 1) * _INT4_ROWS)):
            _unpack_int4_row(packed[n], scale[n], low, high, w)
            for m in range(rows):
                xm = x[m]
                acc = np.float32(0.0)
                for k in range(k_dim):
                    acc += xm[k] * w[k]
                out[m, n] = acc


@njit(parallel=True, fastmath=True, cache=True)
def int4_dequantize(packed: np.ndarray, scale: np.ndarray, start: int, out: np.ndarray) -> None:
    """out[i] = dequantized row start + i, for as many rows as out has."""
    for i in prange(out.shape[0]):
        low, high = np.empty(packed.shape[1], np.uint32), np.empty(packed.shape[1], np.uint32)
        _unpack_int4_row(packed[start + i], scale[start + i], low, high, out[i])


def warm_up(int4: bool) -> None:
    """Compile the int8 (and int4) kernels, or load them from numba's disk cache, so no request waits on the JIT."""
    # Only what the model uses: each loaded kernel holds tens of MiB of LLVM state.
    x, out = np.zeros((1, 8), np.float32), np.zeros((1, 8), np.float32)
    q8, q4, scale = np.zeros((8, 8), np.int8), np.zeros((8, 1), np.uint32), np.zeros((8, 1, 2), np.float32)
    int8_matmul(x, q8, scale, out)
    int8_dequantize(q8, scale, 0, out)
    if int4:
        int4_matmul(x, q4, scale, out)
        int4_dequantize(q4, scale, 0, out)
