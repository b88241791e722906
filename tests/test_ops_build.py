"""Building the C++ ops: a lock left by a build that was killed is removed; one of a build under way stays."""

import os
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
