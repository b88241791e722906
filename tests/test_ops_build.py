"""Building the C++ ops: a lock left by a build that was killed is removed; one of a build under way stays; a
process that finds its build stamped loads it without torch's JIT."""

import json
import os
import subprocess
import sys
import time

from tokenmill import ops


def _lock(tmp_path, monkeypatch, age: float):
    """Extension "ext"'s build lock under tmp_path, last touched age seconds ago."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "ext" / "lock"
    lock.parent.mkdir()
    lock.touch()
    os.utime(lock, (time.time() - age,) * 2)
    return lock


def test_a_lock_older_than_any_build_is_removed_with_a_warning(tmp_path, monkeypatch, caplog):
    lock = _lock(tmp_path, monkeypatch, ops.STALE_LOCK_SECONDS + 60)
    ops._remove_stale_lock("ext")
    assert not lock.exists()
    assert f"removing {lock}" in caplog.text and "did not finish" in caplog.text


def test_the_lock_of_a_build_under_way_stays(tmp_path, monkeypatch):
    lock = _lock(tmp_path, monkeypatch, 5)
    ops._remove_stale_lock("ext")
    assert lock.exists()


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
