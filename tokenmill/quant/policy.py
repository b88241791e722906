"""What `--quantization auto` means on this machine, and why: one decision for the runner and `tokenmill env`."""

from typing import NamedTuple

import torch

from tokenmill import ops


# The groups a checkpoint stored "int4" holds its levels in (GGUF Q4_1's blocks of 32 weights).
NATIVE_INT4_GROUP = 32


class Choice(NamedTuple):
    """The quantization the engine runs and the reason, as the start-up log line and `tokenmill env` say it."""

    method: str
    reason: str
    slow: bool = False  # asked for int8/int4 where only the portable loops or a dequantizing fallback run


def choose_quantization(requested: str, native: str, device: torch.device, dtype: torch.dtype,
                        group_size: int = NATIVE_INT4_GROUP) -> Choice:
    """Resolve `requested` (auto, none, int8 or int4) for a checkpoint whose layers are stored as `native`."""
    kernel = ops.quantized_matmul_kernel() if device.type == "cpu" else None
    fast = device.type == "cpu" and dtype == torch.float32 and ops.fast_quantized_matmul()
    dtype_name = str(dtype).removeprefix("torch.")
    if requested != "auto":
        if requested != "none" and not fast:
            return Choice(requested, f"asked for; no vector int8/int4 kernel runs here for {device.type} {dtype_name}",
                          slow=True)
        return Choice(requested, "asked for" + (f", {kernel} kernel" if requested != "none" else ""))
    if not fast:
        why = "not on CPU" if device.type != "cpu" else (
            f"{dtype_name} activations" if dtype != torch.float32 else f"only the {kernel or 'PyTorch'} path runs here")
        return Choice("none", f"auto: {why}, so quantized layers would dequantize or run portable loops")
    if native == "none":
        return Choice("none", "auto: the checkpoint's linear layers are float")
    if native == "int4" and group_size != NATIVE_INT4_GROUP:
        # Its 16 levels per 32 weights, regrouped, would be rounded to 16 levels per wider group (perplexity +42%
        # for SmolLM2 at 64); int8 keeps each weight within a step of the file's.
        return Choice("int8", f"auto: the checkpoint's int4 blocks of {NATIVE_INT4_GROUP} do not fit groups of "
                              f"{group_size}, and the {kernel} kernel runs int8")
    # int8/int4 on a vector kernel read a quarter or an eighth of float32's bytes per weight, and decode
    # reads every weight once a step: faster than float32 on every kernel measured (docs/benchmarks.md).
    return Choice(native, f"auto: the checkpoint stores its layers as {native}, and the {kernel} kernel runs them")
