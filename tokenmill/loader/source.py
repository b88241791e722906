"""Resolve a model name or path to its config, tokenizer and weight stream."""

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from tokenmill.config import ModelConfig
from tokenmill.errors import InvalidRequestError, ModelNotFoundError, UnsupportedArchitectureError
from tokenmill.loader import catalog
from tokenmill.loader.gguf import GGUFFile
from tokenmill.loader.hf import HFDirectory
from tokenmill.loader.tokenizer import Tokenizer
from tokenmill.models.registry import model_class
from tokenmill.quant.levels import LevelRows
from tokenmill.sampling import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class ModelSource:
    """Everything needed to build a model, before any weight is read."""

    name: str
    path: Path
    config: ModelConfig
    tokenizer: Tokenizer
    files: GGUFFile | HFDirectory
    # The model's recommended sampling settings (generation_config.json, a GGUF's general.sampling.*), by
    # SamplingParams' names: requests that leave a setting unset get these, as in vLLM and llama.cpp.
    sampling_defaults: dict[str, float]

    def weights(self, dtype: torch.dtype, levels: bool = False) -> Iterator[tuple[str, slice, torch.Tensor | LevelRows]]:
        """Stream (Hugging Face name, rows, tensor) in the given dtype: rows of the named tensor, often all.

        With levels, a GGUF file's Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 tensors come as their own levels (for int4 and
        int8 layers).
        """
        return self.files.weights(self.config, dtype, levels)


def check_named(name_or_path: str) -> None:
    """Raise ModelNotFoundError unless a file, a directory or a catalog model has this name: for commands that load
    several models, so that a mistake in the last is not found after the others loaded."""
    if Path(name_or_path).expanduser().exists():
        return
    if "/" in name_or_path or name_or_path.endswith(".gguf"):
        raise ModelNotFoundError(f"no such file or directory: {name_or_path}")
    catalog.entry_for(name_or_path)  # raises ModelNotFoundError listing the known names


def open_model(name_or_path: str, pull_if_missing: bool = True) -> ModelSource:
    """Open a catalog name (pulling it if needed), a .gguf file, or a Hugging Face directory."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a directory without config.json; not a Hugging Face model")
        files = HFDirectory(path)
        if files.raw_config.get("model_type") == "bert":
            raise UnsupportedArchitectureError(
                f"{name_or_path} is a sentence-embedding model (BERT): it generates no text; `tokenmill serve "
                f"--model {name_or_path}` answers /v1/embeddings with it")
        model_class(files.architecture)  # fail on an unsupported model before reading anything else
        config = files.model_config()
        tokenizer = Tokenizer.from_hf_dir(path, config.eos_token_ids)
        return ModelSource(path.name, path, config, tokenizer, files, _sampling_defaults(files))
    if path.is_file():
        gguf = GGUFFile(path)
        model_class(gguf.architecture)
        config = gguf.model_config()
        tokenizer = Tokenizer.from_gguf(gguf, config.eos_token_ids)
        return ModelSource(path.stem, path, config, tokenizer, gguf, _sampling_defaults(gguf))
    check_named(name_or_path)
    if not catalog.is_pulled(name_or_path) and not pull_if_missing:
        raise ModelNotFoundError(f"{name_or_path} is not pulled yet; run `tokenmill pull {name_or_path}`")
    source = open_model(str(catalog.pull(name_or_path)))
    source.name = name_or_path
    return source


def _sampling_defaults(files: GGUFFile | HFDirectory) -> dict[str, float]:
    """The file's recommended sampling settings that SamplingParams takes; any other is left out with a warning (it
    would fail every request that relies on it, and the model serves fine without it)."""
    usable = {}
    for name, value in files.sampling_defaults().items():
        if isinstance(value, bool) or not isinstance(value, int | float):  # SamplingParams would take True as 1
            logger.warning("%s recommends %s=%r, not a number; sampling leaves it out", files.path, name, value)
            continue
        if isinstance(value, float) and value.is_integer() and name == "top_k":
            value = int(value)  # 20.0, as some generation_config.json files write it
        elif isinstance(value, float):
            value = float(f"{value:.7g}")  # a GGUF's float32 0.6 reads 0.6000000238: the same 0.6 as JSON's
        try:
            SamplingParams(**{name: value})
        except (InvalidRequestError, TypeError) as exc:
            logger.warning("%s recommends %s=%r, which cannot be used; sampling leaves it out (%s)",
                           files.path, name, value, exc)
            continue
        usable[name] = value
    return usable
