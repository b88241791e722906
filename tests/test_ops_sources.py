"""The C++ sources compile for aarch64, and the x86 kernel files for any x86 CPU (tests/layers/test_cpu_builds.py
builds and runs the ops for x86 CPUs other than this one)."""

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
from torch.utils.cpp_extension import include_paths

from tokenmill import ops

_CROSS = "aarch64-linux-gnu-g++"


def _syntax_errors(compiler: str, flags: list[str], sources: list[str]) -> list[str]:
    """Each source checked with -fsyntax-only against torch's headers; the compiler's errors, if any."""
    command = [compiler, "-fsyntax-only", "-std=c++17", *flags, *(f"-I{p}" for p in include_paths())]
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        runs = pool.map(lambda s: subprocess.run([*command, s], capture_output=True, text=True), sources)
    return [f"{run.args[-1]}:\n{run.stderr}" for run in runs if run.returncode != 0]


@pytest.mark.skipif(shutil.which(_CROSS) is None and not os.environ.get("CI"),
                    reason=f"{_CROSS} is not installed here (.ci/run installs it, so CI always runs this)")
def test_sources_compile_for_aarch64():
    # No x86 header or intrinsic outside csrc/arch/x86/, which an aarch64 build does not take.
    sources = ops.sources("arm")
    assert not any("/arch/x86/" in s for s in sources)
    assert _syntax_errors(_CROSS, ["-march=armv8-a", "-fopenmp"], sources) == []


@pytest.mark.skipif(ops.ARCH != "x86" or shutil.which("nm") is None, reason="checks the x86 kernels' objects")
def test_x86_kernel_files_share_no_code_built_for_their_target(tmp_path):
    # A weak symbol (an inline function or template instantiation shared across files) built under a
    # kernel file's AVX-512 target could be the copy the linker keeps for every file, and then run on a CPU
    # without it. Only the header's functions, defined before the target pragma, may be shared.
    for source in (s for s in ops.sources("x86") if "/arch/x86/" in s):
        obj = tmp_path / "kernel.o"
        subprocess.run(["g++", "-c", "-O3", "-std=c++17", "-march=x86-64", source, "-o", str(obj)], check=True)
        symbols = subprocess.run(["nm", "-C", str(obj)], capture_output=True, text=True, check=True).stdout
        defined = [line.split(None, 2) for line in symbols.splitlines() if not line.startswith(" ")]
        weak = {name for _, kind, name in defined if kind in ("W", "V", "u")}
        assert weak <= {"tokenmill::rows_as_given(long)"}, (source, weak)
