"""The C++ sources compile for aarch64, and the x86 kernel files for any x86 CPU (tests/layers/test_cpu_builds.py
builds and runs the ops for x86 CPUs other than this one).

The compiler runs take about 30 s: tests/conftest.py runs this file as a script when the suite starts, at the lowest
CPU priority, and the tests read what it found.
"""

import json
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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


def _weak_symbols(source: str) -> list[str]:
    """The weak symbols (inline functions, template instantiations) a kernel file's object defines, built for x86-64."""
    with tempfile.TemporaryDirectory() as tmp:
        obj = Path(tmp) / "kernel.o"
        subprocess.run(["g++", "-c", "-O3", "-std=c++17", "-march=x86-64", source, "-o", str(obj)], check=True)
        symbols = subprocess.run(["nm", "-C", str(obj)], capture_output=True, text=True, check=True).stdout
    defined = [line.split(None, 2) for line in symbols.splitlines() if not line.startswith(" ")]
    return sorted({name for _, kind, name in defined if kind in ("W", "V", "u")})


def _findings() -> dict:
    """What both tests check: the aarch64 syntax errors (None without the cross compiler), each x86 kernel file's weak
    symbols (None off x86 or without nm)."""
    # No x86 header or intrinsic outside csrc/arch/x86/, which an aarch64 build does not take.
    arm = ops.sources("arm")
    kernels = [s for s in ops.sources("x86") if "/arch/x86/" in s]
    return {
        "arm_sources": arm,
        "aarch64_errors": _syntax_errors(_CROSS, ["-march=armv8-a", "-fopenmp"], arm) if shutil.which(_CROSS) else None,
        "weak": {s: _weak_symbols(s) for s in kernels} if ops.ARCH == "x86" and shutil.which("nm") else None,
    }


@pytest.fixture(scope="module")
def findings(early_output) -> dict:
    """This file's _findings(), from its run as a script."""
    return early_output(Path(__file__))


@pytest.mark.skipif(shutil.which(_CROSS) is None and not os.environ.get("CI"),
                    reason=f"{_CROSS} is not installed here (.ci/run installs it, so CI always runs this)")
def test_sources_compile_for_aarch64(findings):
    assert not any("/arch/x86/" in s for s in findings["arm_sources"])
    assert findings["aarch64_errors"] is not None, f"{_CROSS} is not installed"
    assert findings["aarch64_errors"] == []


@pytest.mark.skipif(ops.ARCH != "x86" or shutil.which("nm") is None, reason="checks the x86 kernels' objects")
def test_x86_kernel_files_share_no_code_built_for_their_target(findings):
    # A weak symbol (an inline function or template instantiation shared across files) built under a
    # kernel file's AVX-512 target could be the copy the linker keeps for every file, and then run on a CPU
    # without it. Only the header's functions, defined before the target pragma, may be shared.
    assert findings["weak"], "no x86 kernel file was checked"
    for source, weak in findings["weak"].items():
        assert set(weak) <= {"tokenmill::rows_as_given(long)"}, (source, weak)


if __name__ == "__main__":
    print(json.dumps(_findings()))
