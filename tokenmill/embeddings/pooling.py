"""Sentence-transformers pooling and normalization, as a model's modules.json and 1_Pooling/config.json ask."""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tokenmill.errors import ModelLoadError, UnsupportedArchitectureError

# Each mode's key in 1_Pooling/config.json, in sentence-transformers' order of concatenation.
_MODES = {"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens", "mean": "pooling_mode_mean_tokens",
          "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens"}
_UNSUPPORTED = ("pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")


@dataclass(frozen=True)
class Pooling:
    """How token states become one vector: the pooling modes (concatenated) and whether to L2-normalize."""

    modes: tuple[str, ...] = ("mean",)
    normalize: bool = False

    @classmethod
    def from_dir(cls, path: Path) -> "Pooling":
        """From modules.json and its Pooling module's config; mean pooling, unnormalized, when there is none."""
        modules_file = path / "modules.json"
        if not modules_file.is_file():
            return cls()  # sentence-transformers' choice for a plain Hugging Face model
        try:
            modules = json.loads(modules_file.read_text())
            types = {m["type"].rsplit(".", 1)[-1]: m for m in modules}
            pooling = types.get("Pooling")
            config = json.loads((path / pooling["path"] / "config.json").read_text()) if pooling else {}
        except (OSError, ValueError, KeyError, TypeError) as exc:  # ValueError: not UTF-8 or not JSON
            raise ModelLoadError(f"cannot read the sentence-transformers modules of {path}: {exc}") from exc
        unknown = set(types) - {"Transformer", "Pooling", "Normalize"}
        if unknown:
            raise UnsupportedArchitectureError(f"{path}/modules.json has modules {sorted(unknown)}; supported are "
                                               "Transformer, Pooling and Normalize")
        asked = [key for key in _UNSUPPORTED if config.get(key)]
        if asked:
            raise UnsupportedArchitectureError(f"{path}: {asked} is not supported; supported are "
                                               f"{list(_MODES.values())}")
        modes = tuple(mode for mode, key in _MODES.items() if config.get(key))
        return cls(modes or ("mean",), "Normalize" in types)

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """hidden [batch, seq, dim] and mask [batch, seq] (True on real tokens) → [batch, dim * len(modes)]."""
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        counts = weights.sum(1).clamp(min=1e-9)
        pooled = []
        for mode in self.modes:
            if mode == "cls":
                pooled.append(hidden[:, 0])
            elif mode == "max":
                pooled.append(hidden.masked_fill(~mask.unsqueeze(-1), torch.finfo(hidden.dtype).min).amax(1))
            else:
                summed = (hidden * weights).sum(1)
                pooled.append(summed / counts if mode == "mean" else summed / counts.sqrt())
        out = torch.cat(pooled, dim=-1) if len(pooled) > 1 else pooled[0]
        return F.normalize(out, dim=-1) if self.normalize else out
