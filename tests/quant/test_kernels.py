"""Every int8/int4 matmul kernel this CPU runs gives the portable loops' bits (quant_kernel.h's NOTE)."""

from pathlib import Path

import pytest
import torch

from tokenmill import ops
from tokenmill.quant.linear import Int4Linear, Int8Linear

# Every vector kernel the build holds, on any x86 machine that runs it: an AVX-512 CPU checks the AVX2
# paths too. A kernel this CPU lacks is not in quantized_matmul_kernels() and is not parametrized.
_KERNELS = [k for k in ops.quantized_matmul_kernels() if k != "portable"]


def _layer(cls, in_features: int, out_features: int, group: int):
    layer = cls(in_features, out_features, group)
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0))
    layer.load_rows(slice(None), weight, "w")
    return layer


def _run(kernel: str, layer, x: torch.Tensor) -> torch.Tensor:
    out = torch.empty(len(x), layer.out_features)
    torch.ops.tokenmill.quantized_matmul_with(kernel, x, layer.qweight, layer.scale, layer.bits, out)
    return out


def test_the_kernels_offered_are_those_the_cpu_reports():
    # The dispatch's own feature checks against what Linux reports for this machine, whichever it is.
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    expected = ["portable"]
    if ops.ARCH == "x86" and {"avx2", "fma", "f16c"} <= flags:
        expected.insert(0, "avx2")
        if "avx_vnni" in flags:
            expected.insert(0, "avx_vnni")
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"} <= flags:
            expected.insert(0, "avx512_vnni")
            if {"amx_tile", "amx_int8"} <= flags:
                expected.insert(0, "amx")
    assert ops.quantized_matmul_kernels() == expected
    assert ops.fast_quantized_matmul() == (expected != ["portable"])


@pytest.mark.parametrize("kernel", _KERNELS)
@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
# 1 row; 3 (the AVX-512 kernel's rows of one block at a time, up to 4); 5, 6 and 7 (its tiles of 4 rows over
# two blocks, with 1, 2 or 3 left; the 256-bit kernels' tiles of 2 with one row left or none; 7 is one AMX
# tile, int8); 23 (two AMX tiles, whole tiles and a rest, int8); 71 (int4's AMX tiles, from 64 rows: five of 15 rows,
# the last holding 11).
@pytest.mark.parametrize("rows", [1, 3, 5, 6, 7, 23, 71])
# The last block of 16 output rows holds 3 of 99, so the second half of a 256-bit kernel's block is empty;
# 13 of 109, so that half holds 5; 5 of 117, the eighth block, which ends a pair in the AVX-512 kernel.
@pytest.mark.parametrize("out_features", [99, 109, 117])
def test_kernel_gives_the_portable_loops_bits(kernel, cls, rows, out_features):
    layer = _layer(cls, 128, out_features, 64)
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows)) * 3
    assert torch.equal(_run(kernel, layer, x), _run("portable", layer, x))


@pytest.mark.parametrize("kernel", _KERNELS)
def test_kernel_holds_extreme_inputs_and_levels_exactly(kernel):
    # Inputs at the largest level in both signs and weights spanning a wide group: the int16 sums of the
    # AVX2 kernel come closest to saturating here.
    for cls in (Int8Linear, Int4Linear):
        layer = _layer(cls, 256, 40, 256)
        x = torch.where(torch.arange(256) % 3 == 0, -1.0, 1.0).repeat(5, 1)
        x[1] = -x[1]
        x[2, ::2] = 0.0
        assert torch.equal(_run(kernel, layer, x), _run("portable", layer, x))


@pytest.mark.parametrize("kernel", ["portable", *_KERNELS])
def test_a_block_of_inputs_too_small_to_scale_counts_as_zero(kernel):
    # 32639 / max|x| overflows float below about 1e-34 (SiLU of gates near -90 gets there): the block's products
    # are far below float's resolution, and every kernel must treat it as the all-zero block. Alone in its row, so
    # that what the overflow made of it is not lost in the rounding of larger products.
    for cls in (Int8Linear, Int4Linear):
        layer = _layer(cls, 128, 40, 64)
        x = torch.zeros(3, 128)
        x[:, 32:64] = torch.where(torch.arange(32) % 2 == 0, 1e-36, -3e-37)
        assert torch.equal(_run(kernel, layer, x), torch.zeros(3, 40))


@pytest.mark.parametrize("kernel", ["portable", *_KERNELS])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_row_holding_an_infinity_or_nan_comes_out_nan_and_its_neighbours_unchanged(kernel, bad):
    # As a float matmul's, a NaN shows: it was left out of the block's maximum and converted to a level (undefined),
    # which made a large finite number that differed between kernels.
    for cls in (Int8Linear, Int4Linear):
        layer = _layer(cls, 128, 40, 64)
        x = torch.randn(6, 128, generator=torch.Generator().manual_seed(1))
        clean = _run(kernel, layer, x)
        x[2, 70] = bad
        out = _run(kernel, layer, x)
        assert out[2].isnan().all()
        assert torch.equal(out[[0, 1, 3, 4, 5]], clean[[0, 1, 3, 4, 5]])


def test_the_layer_runs_the_fastest_kernel():
    layer = _layer(Int4Linear, 128, 99, 32)
    x = torch.randn(5, 128)
    assert torch.equal(layer(x), _run(ops.quantized_matmul_kernels()[0], layer, x))


def test_an_unknown_kernel_is_refused():
    layer = _layer(Int8Linear, 64, 16, 32)
    with pytest.raises(RuntimeError, match="does not run on this CPU"):
        _run("sve2", layer, torch.randn(1, 64))
