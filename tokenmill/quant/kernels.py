"""The C++ int8 / int4 CPU kernels (tokenmill/csrc/quant_kernels.cpp), built on first use for this CPU.

Why C++: decode reads every weight once per step, so the kernel must run at memory bandwidth.
PyTorch's stock weight-only ops ran 2-20x slower than the float32 matmul at batch 1 on these CPUs,
and numba's loops (the previous kernels) were compute-bound at about a quarter of bandwidth; these
read int8 weights 2.9x faster than float32 `linear` reads float32 ones (docs/benchmarks.md). Built
with -march=native for the machine it runs on, and with torch's own OpenMP runtime, so the kernels
share torch's thread pool rather than waking a second one.
"""

import logging
from pathlib import Path

import torch

from tokenmill.errors import ModelLoadError

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).parents[1] / "csrc" / "quant_kernels.cpp"
_FLAGS = [
    "-O3", "-march=native",
    # Contract w * x + acc into FMAs (ISO C++ mode turns contraction off) and use 512-bit registers
    # where the CPU has them (gcc otherwise prefers 256-bit on AVX-512 machines).
    "-ffp-contract=fast", "-mprefer-vector-width=512",
    "-fopenmp",  # at::parallel_for is an OpenMP region compiled into the caller
]
_loaded = False


def ops() -> object:
    """torch.ops.tokenmill, with the kernels built (once per source version, cached by torch) and loaded."""
    global _loaded
    if not _loaded:
        from torch.utils.cpp_extension import load

        try:
            load("tokenmill_quant_kernels", [str(_SOURCE)], extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"],
                 is_python_module=False)
        except (OSError, RuntimeError) as e:
            raise ModelLoadError(
                f"int8/int4 on CPU compiles its kernels at first use and that failed ({e}); "
                "install a C++ compiler (g++) or run with --quantization none"
            ) from None
        _loaded = True
        logger.info("int8/int4 CPU kernels loaded")
    return torch.ops.tokenmill
