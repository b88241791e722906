"""tokenmill's C++ CPU ops (tokenmill/csrc), built on first use for this CPU and cached by torch.

Why C++: decode reads every weight once per step, so the int8/int4 matmuls must run at memory
bandwidth (PyTorch's stock weight-only ops ran 2-20x slower than float32 `linear` at batch 1 on
these CPUs, numba's loops a quarter of bandwidth), and at batch 1 a step is otherwise dominated by
small eager ops (docs/benchmarks.md). Built with -march=native for the machine it runs on, and
against torch's own OpenMP runtime, so the ops share torch's thread pool rather than waking a
second one. Where no compiler is found, layers fall back to PyTorch; int8/int4 cannot.
"""

import logging
from pathlib import Path

import torch

from tokenmill.errors import ModelLoadError

logger = logging.getLogger(__name__)

_SOURCES = sorted(str(p) for p in (Path(__file__).parent / "csrc").glob("*.cpp"))
_FLAGS = [
    "-O3", "-march=native",
    # Contract a * b + c into FMAs (ISO C++ mode turns contraction off) and use 512-bit registers
    # where the CPU has them (gcc otherwise prefers 256-bit on AVX-512 machines).
    "-ffp-contract=fast", "-mprefer-vector-width=512",
    "-fopenmp",  # at::parallel_for is an OpenMP region compiled into the caller
]
# The ops work on 16 float32 lanes at a time: a row, head or group they take must be a multiple of it.
LANES = 16
# Decode attention keeps one key in registers: head_dim up to 16 vectors of them.
MAX_HEAD_DIM = 256
_built: bool | None = None  # None until the first call tries


def available() -> bool:
    """True once torch.ops.tokenmill is built and loaded; False, logged once, where it cannot be built."""
    global _built
    if _built is None:
        from torch.utils.cpp_extension import load

        try:
            load("tokenmill_cpu_ops", _SOURCES, extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"], is_python_module=False)
            _built = True
        except (OSError, RuntimeError) as e:
            logger.warning("tokenmill's C++ CPU ops could not be built (%s); using PyTorch fallbacks", e)
            _built = False
    return _built


def fast_quantized_matmul() -> bool:
    """True where the int8/int4 matmul has its AVX512-VNNI kernel; elsewhere it runs portable loops, slowly."""
    return available() and torch.ops.tokenmill.quantized_matmul_is_fast()


def require() -> object:
    """torch.ops.tokenmill, for callers with no fallback; a ModelLoadError where it cannot be built."""
    if not available():
        raise ModelLoadError(
            "int8/int4 on CPU runs C++ kernels compiled at first use, and they could not be built (see the "
            "warning above); install a C++ compiler (g++) or run with --quantization none"
        )
    return torch.ops.tokenmill
