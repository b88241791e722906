"""tokenmill's C++ CPU ops (tokenmill/csrc), built on first use for this CPU and cached by torch.

Why C++: decode reads every weight once per step, so the int8/int4 matmuls must run at memory
bandwidth (PyTorch's stock weight-only ops ran 2-20x slower than float32 `linear` at batch 1 on
these CPUs, numba's loops a quarter of bandwidth), and at batch 1 a step is otherwise dominated by
small eager ops (docs/benchmarks.md). Built with -march=native for the machine it runs on, and
against torch's own OpenMP runtime, so the ops share torch's thread pool rather than waking a
second one. Where no compiler is found, layers fall back to PyTorch; int8/int4 cannot.
"""

import fcntl
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import NamedTuple

import torch

from tokenmill.errors import ModelLoadError
from tokenmill.loader.catalog import tokenmill_home

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
# Kernels written for one CPU family live in csrc/arch/<family>/ (as llama.cpp's ggml-cpu/arch/); the
# rest, the portable int8/int4 loops among them, build on every CPU.
ARCH = {"x86_64": "x86", "AMD64": "x86", "aarch64": "arm", "arm64": "arm"}.get(platform.machine(), "other")
# The ops work on 16 float32 lanes at a time: a row, head or group they take must be a multiple of it.
LANES = 16
# The types the element-wise ops (norms, rotary, gated activations) take; float16 runs PyTorch's there.
ELEMENTWISE_DTYPES = (torch.float32, torch.bfloat16)
# The head sizes paged attention is built for: a head's accumulators stay in registers (2 to 16 vectors).
ATTENTION_HEAD_DIMS = (32, 64, 128, 256)
_built: bool | None = None  # None until the first call tries


def sources(arch: str = ARCH) -> list[str]:
    """The C++ files of the extension for a CPU family."""
    return sorted(str(p) for p in [*_CSRC.glob("*.cpp"), *(_CSRC / "arch" / arch).glob("*.cpp")])


def compile_flags(arch: str = ARCH, cpu: str = "native") -> list[str]:
    """Compiler flags: built for this machine's CPU (or another), against torch's OpenMP (at::parallel_for is one)."""
    # Contract a * b + c into FMAs (ISO C++ mode turns contraction off).
    flags = ["-O3", "-ffp-contract=fast", "-fopenmp"]
    if arch == "x86":
        # gcc otherwise prefers 256-bit registers on AVX-512 machines. The int8/int4 kernels for each
        # instruction set build whatever the CPU (target pragmas) and are picked at run time.
        return [*flags, f"-march={cpu}", "-mprefer-vector-width=512"]
    return [*flags, f"-mcpu={cpu}"] if arch == "arm" else flags


def _cpu_tag() -> str:
    """A short name for this CPU's instruction sets: torch caches a build by name and sources, not by CPU.

    Without it a home directory shared between machines, or a disk moved to another CPU family, reuses a
    -march=native build that the new CPU cannot run.
    """
    try:
        info = Path("/proc/cpuinfo").read_text()
        features = next((line for line in info.splitlines() if line.startswith(("flags", "Features"))), "")
    except OSError:
        features = platform.processor()
    return hashlib.sha1(f"{platform.machine()} {features}".encode()).hexdigest()[:10]


def _stamp() -> Path:
    """Where a build of these exact sources, flags, versions and CPU records its library, once loaded."""
    key = hashlib.sha1()
    for path in sorted(_CSRC.rglob("*")):
        if path.is_file():
            key.update(path.relative_to(_CSRC).as_posix().encode() + b"\0" + path.read_bytes())
    key.update(" ".join([*compile_flags(), _cpu_tag(), torch.__version__, sys.version,
                         os.environ.get("TORCH_EXTENSIONS_DIR", "")]).encode())
    return tokenmill_home() / "ops" / f"{key.hexdigest()[:16]}.json"


def _stamped_library(stamp: Path) -> str | None:
    """The library a stamp names, if it is still the file that was loaded then and no build is rewriting it."""
    try:
        record = json.loads(stamp.read_text())
        library = Path(record["library"])
        st = library.stat()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    unchanged = [st.st_mtime_ns, st.st_size] == [record.get("mtime_ns"), record.get("size")]
    return str(library) if unchanged and not (library.parent / "lock").exists() else None


def _write_stamp(stamp: Path, library: str) -> None:
    """Record the loaded library; written whole (a rename), since several processes may start at once."""
    try:
        st = Path(library).stat()
        stamp.parent.mkdir(parents=True, exist_ok=True)
        part = stamp.with_suffix(f".{os.getpid()}")
        part.write_text(json.dumps({"library": library, "mtime_ns": st.st_mtime_ns, "size": st.st_size}))
        os.replace(part, stamp)
    except OSError as e:  # a read-only home: every start then asks torch, as without the stamp
        logger.debug("could not record the C++ ops' build in %s: %s", stamp, e)


def _build_and_load() -> str:
    """Build the ops with torch's JIT (a no-op check when its build is current), load them, return the library."""
    return locked_build(f"tokenmill_cpu_ops_{_cpu_tag()}", sources(), compile_flags())


def locked_build(name: str, files: list[str], cflags: list[str]) -> str:
    """torch's JIT build (and load) of files as library `name`, one process at a time; the library's path.

    torch's build lock is a file: a build killed partway (docker stop, the OOM killer, a test run stopped) leaves it,
    and every later load waited on it forever without a word. A kernel lock (flock) around the build ends with its
    holder, and whoever holds it knows a torch lock file is such a leftover.
    """
    from torch.utils.cpp_extension import _get_build_directory, load

    build_dir = Path(_get_build_directory(name, verbose=False))
    with open(build_dir.with_name(f"{name}.flock"), "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        if (build_dir / "lock").exists():
            logger.warning("removing %s, left by a build of the C++ ops that did not finish", build_dir / "lock")
            (build_dir / "lock").unlink(missing_ok=True)
        return load(name, files, extra_cflags=cflags, extra_ldflags=["-fopenmp"], is_python_module=False)


def available() -> bool:
    """True once torch.ops.tokenmill is built and loaded; False, logged once, where it cannot be built."""
    global _built
    if _built is None:
        # A process that finds its build stamped loads the library directly: torch's JIT check imports
        # torch.utils.cpp_extension (setuptools among it: 4.4 MiB and 0.1 s) and runs ninja.
        stamp = _stamp()
        library = _stamped_library(stamp)
        try:
            if library is not None:
                torch.ops.load_library(library)
            else:
                _write_stamp(stamp, _build_and_load())
            _built = True
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:  # the last: a compiler failing its check
            logger.warning("tokenmill's C++ CPU ops could not be built (%s); using PyTorch fallbacks", _why(e))
            logger.debug("the failed build's output: %s", e)
            _built = False
    return _built


def _why(error: Exception) -> str:
    """A failed build in one line: torch's message holds every compiler command, 40 lines with the cause within."""
    lines = str(error).splitlines() or [type(error).__name__]
    cause = next((line.strip() for line in lines[1:] if "error" in line.lower() or "not found" in line), None)
    head = lines[0].split(": [")[0]
    return f"{head}: {cause}" if cause else head


def quantized_matmul_kernels() -> list[str]:
    """The int8/int4 matmul kernels this CPU runs, fastest (the one used) first; empty without the ops."""
    return list(torch.ops.tokenmill.quantized_matmul_kernels()) if available() else []


def quantized_matmul_kernel() -> str | None:
    """The kernel quantized layers run: the fastest, or the one $TOKENMILL_QUANT_KERNEL names; None without the ops."""
    if not available():
        return None
    try:
        return str(torch.ops.tokenmill.quantized_matmul_kernel())
    except RuntimeError as e:  # an unknown or unrunnable name in the variable
        raise ModelLoadError(f"TOKENMILL_QUANT_KERNEL={os.environ.get('TOKENMILL_QUANT_KERNEL')}: {e}".split("\n")[0]) from None


def fast_quantized_matmul() -> bool:
    """True where the int8/int4 matmul runs a vector kernel; the portable loops are slow."""
    return quantized_matmul_kernel() not in (None, "portable")


class QuantLayout(NamedTuple):
    """The int8/int4 weight layout's constants, as the C++ kernels define them (csrc/quant_kernel.h)."""

    block_rows: int  # output rows interleaved per block
    chunk_bytes: int
    input_block: int  # inputs per quantized input block


@cache
def quant_layout() -> QuantLayout:
    """The layout constants, read from the built ops."""
    return QuantLayout(*require().quant_layout())


def require() -> object:
    """torch.ops.tokenmill, for callers with no fallback; a ModelLoadError where it cannot be built."""
    if not available():
        raise ModelLoadError(
            "int8/int4 on CPU runs C++ kernels compiled at first use, and they could not be built (see the "
            "warning above); install a C++ compiler (g++) or run with --quantization none"
        )
    return torch.ops.tokenmill
