"""Rotary position embedding (half-split layout, as Hugging Face), with linear and Llama 3 scaling."""

import math

import torch
from torch import nn

from tokenmill import ops
from tokenmill.errors import ModelLoadError


class RotaryEmbedding(nn.Module):
    """cos/sin of each position's rotary angles, computed per step from the frequencies."""

    def __init__(
        self,
        head_dim: int,
        theta: float,
        scaling: dict | None = None,
        freq_factors: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        if freq_factors is not None:  # GGUF's rope_freqs tensor: per-frequency divisors (Llama 3.1)
            if freq_factors.numel() != inv_freq.numel():
                raise ModelLoadError(f"rope_freqs holds {freq_factors.numel()} factors; a head_dim of {head_dim} "
                                     f"rotates {inv_freq.numel()} frequencies")
            inv_freq = inv_freq / freq_factors.to(torch.float64)
        self.register_buffer("inv_freq", _scale(inv_freq, scaling), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for these positions, shaped [tokens, 1, head_dim // 2] to broadcast over heads."""
        # Computed, not looked up: tables for every position a model allows held 2 MiB for SmolLM2 and 64 MiB for
        # Gemma 3, to save 11-26 us a step. In float64, then float32: the bits such tables held.
        angles = positions.to(torch.float64)[:, None] * self.inv_freq
        return angles.cos().float().unsqueeze(1).to(dtype), angles.sin().float().unsqueeze(1).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x: [tokens, heads, head_dim] by the angles in cos/sin: [tokens, 1, head_dim // 2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def apply_rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate x: [tokens, heads, head_dim], a view whose heads lie side by side, in place."""
    if x.is_cpu and x.shape[-1] % (2 * ops.LANES) == 0 and x.dtype in ops.ELEMENTWISE_DTYPES and ops.available():
        torch.ops.tokenmill.rotary_(x, cos, sin)
    else:
        x.copy_(apply_rotary(x, cos, sin))


def _scale(inv_freq: torch.Tensor, scaling: dict | None) -> torch.Tensor:
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type")
    if kind in (None, "default"):
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        if missing := [key for key in keys if key not in scaling]:
            raise ModelLoadError(f"llama3 rope scaling without {', '.join(missing)}")
        factor, low, high, old_len = (scaling[key] for key in keys)
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_len / wavelen) - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    raise ModelLoadError(f"unsupported rope scaling {kind!r}; supported: linear, llama3")
