"""The portable int8/int4 loops, built without AVX-512, against the kernel this CPU runs: the same bits."""

from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import load

import tokenmill
from tokenmill import ops
from tokenmill.quant.linear import Int4Linear, Int8Linear

_SOURCE = Path(tokenmill.__file__).parent / "csrc" / "quant_kernels.cpp"


@pytest.fixture(scope="module")
def portable():
    """quant_kernels.cpp for a CPU without AVX-512, its ops registered as torch.ops.tokenmill_portable."""
    ops.require()
    flags = ["-O2", "-march=haswell", "-fopenmp", "-Dtokenmill=tokenmill_portable"]
    load("tokenmill_portable_ops", [str(_SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"], is_python_module=False)
    return torch.ops.tokenmill_portable


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
@pytest.mark.parametrize("rows", [1, 7, 23])  # the VNNI kernel, one AMX tile, two AMX tiles
def test_portable_loops_give_the_fast_kernels_bits(portable, cls, rows):
    assert not portable.quantized_matmul_is_fast()
    layer = cls(128, 99, 64)
    layer.load_rows(slice(None), torch.randn(99, 128, generator=torch.Generator().manual_seed(0)), "w")
    x = torch.randn(rows, 128)
    out = torch.empty(rows, 99)
    portable.quantized_matmul(x, layer.qweight, layer.scale, layer.bits, out)
    assert torch.equal(out, layer(x))
