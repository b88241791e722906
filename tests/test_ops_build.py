"""Building the C++ ops: builds take turns under a kernel lock, which clears a lock file a killed build left; a
failed build is one line and falls back; a process that finds its build stamped loads it without torch's JIT."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tokenmill import ops


def test_a_lock_a_killed_build_left_is_removed_under_a_kernel_lock_before_building(tmp_path, monkeypatch, caplog):
    # torch's lock file outlives a build killed seconds ago (a stopped container), and its load then waited forever.
    import fcntl

    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    name = f"tokenmill_cpu_ops_{ops._cpu_tag()}"
    build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    (build_dir / "lock").touch()
    seen = {}

    def load(name, *args, **kwargs):
        seen["lock left"] = (build_dir / "lock").exists()
        with open(build_dir.with_name(f"{name}.flock")) as other:  # another process's start waits on the build
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                seen["held"] = True
        return "ext.so"

    monkeypatch.setattr(cpp_extension, "load", load)
    assert ops._build_and_load() == "ext.so"
    assert seen == {"lock left": False, "held": True}
    assert f"removing {build_dir / 'lock'}" in caplog.text and "did not finish" in caplog.text


def test_a_compiler_that_fails_its_version_check_falls_back_in_one_line(tmp_path):
    # torch raises CalledProcessError there, which escaped: env, serve, even --quantization none died on it.
    code = "import logging; logging.basicConfig(); from tokenmill import ops; print(ops.available())"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "CXX": "/bin/false", "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"),
                              "TOKENMILL_HOME": str(tmp_path / "home")})
    assert run.returncode == 0 and run.stdout.strip() == "False", run.stderr[-800:]
    warning = next(line for line in run.stderr.splitlines() if "could not be built" in line)
    assert warning.endswith("using PyTorch fallbacks") and "Traceback" not in run.stderr


def test_a_build_that_fails_is_one_line_with_its_cause():
    # torch's message holds every compiler command line (40 lines, the cause among them).
    error = RuntimeError("Error building extension 'x': [1/9] c++ -MMD -c a.cpp\nFAILED: a.o\nc++ -O3 a.cpp\n"
                         "/bin/sh: 1: c++: not found\nninja: build stopped: subcommand failed.")
    assert ops._why(error) == "Error building extension 'x': /bin/sh: 1: c++: not found"


def _stamp(tmp_path, library):
    """A stamp naming library as it is now."""
    st = library.stat()
    stamp = tmp_path / "stamp.json"
    stamp.write_text(json.dumps({"library": str(library), "mtime_ns": st.st_mtime_ns, "size": st.st_size}))
    return stamp


def test_a_stamp_names_its_library_only_while_the_file_is_unchanged_and_no_build_runs(tmp_path):
    library = tmp_path / "ext" / "ext.so"
    library.parent.mkdir()
    library.write_bytes(b"built")
    stamp = _stamp(tmp_path, library)
    assert ops._stamped_library(stamp) == str(library)
    (library.parent / "lock").touch()  # another build of the same name is rewriting it
    assert ops._stamped_library(stamp) is None
    (library.parent / "lock").unlink()
    library.write_bytes(b"built again")  # rebuilt since, from other sources
    assert ops._stamped_library(stamp) is None
    stamp.write_text("{")  # a stamp cut short
    assert ops._stamped_library(stamp) is None
    assert ops._stamped_library(tmp_path / "none.json") is None


def test_a_process_that_finds_its_build_stamped_loads_it_without_torch_s_jit():
    assert ops.available(), "the C++ ops must build on the test machine"
    # torch.utils.cpp_extension (setuptools and distutils with it) is 4.4 MiB of every process that loads it.
    code = ("import sys; from tokenmill import ops; assert ops.available(); "
            "print('torch.utils.cpp_extension' in sys.modules, tuple(ops.quant_layout()))")
    # The first process stamps the build if no process did yet; the second finds the stamp.
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
            for _ in range(2)]
    assert ops._stamped_library(ops._stamp()) is not None
    assert runs[1][0] == "False" and "".join(runs[1][1:]) == str(tuple(ops.quant_layout())).replace(" ", "")
