"""`tokenmill env`: what this machine's CPU has, which kernel each op runs, and what `auto` picks and why."""

import platform
from pathlib import Path

import torch

from tokenmill import ops
from tokenmill.config import EngineConfig
from tokenmill.dtypes import DTYPES, resolve_kv_cache_dtype
from tokenmill.layers.packed_linear import can_pack
from tokenmill.quant.policy import choose_quantization

# The instruction sets the kernels and torch's own ops care about, as Linux names them.
_FEATURES = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni",
             "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "sve", "i8mm", "bf16")


def cpu_features() -> tuple[str, list[str]]:
    """The CPU's model name and which of the features above it reports (empty where /proc/cpuinfo is absent)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine(), []
    field = lambda key: next((line.split(":", 1)[1].strip() for line in lines if line.startswith(key)), "")
    flags = set((field("flags") or field("Features")).split())
    return field("model name") or platform.machine(), [f for f in _FEATURES if f in flags]


def report(config: EngineConfig) -> list[tuple[str, str]]:
    """(label, value) lines for `tokenmill env`, for an engine built with config."""
    config.check_device()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    name, features = cpu_features()
    lines = [
        ("cpu", f"{name} ({platform.machine()}, {ops.ARCH} kernels), {torch.get_num_threads()} torch threads"),
        ("features", " ".join(features) or "none of the ones tokenmill uses"),
        ("torch", torch.__version__),
    ]
    if not ops.available():
        lines.append(("kernels", "C++ ops not built (no compiler?): PyTorch fallbacks, no int8/int4"))
    else:
        kernels = ops.quantized_matmul_kernels()
        lines.append(("int8/int4", f"{ops.quantized_matmul_kernel()} kernel (this CPU runs: {', '.join(kernels)}; "
                                   "TOKENMILL_QUANT_KERNEL picks one)"))
        lines.append(("other ops", "attention, norm, rotary, activation: C++ built with " + " ".join(ops.compile_flags())))
    model, dtype = config.model, config.dtype
    device, torch_dtype = torch.device(config.device), DTYPES[dtype]
    packed = "packs linears for oneDNN here" if can_pack(device, torch.bfloat16) else "runs unpacked here"
    lines.append(("dtype", f"{dtype} (--dtype bfloat16 {packed})"))
    kv = resolve_kv_cache_dtype(config.kv_cache_dtype, device, torch_dtype)
    lines.append(("kv cache", f"{config.kv_cache_dtype}: {str(kv).removeprefix('torch.')} for {dtype} on {device}"))
    native, pulled = _native_quantization(model)
    label = "auto" if config.quantization == "auto" else "quantization"
    choice = choose_quantization(config.quantization, native, device, torch_dtype, config.quant_group_size)
    lines.append((label, f"{model}{'' if pulled else ' (not pulled yet)'}: quantization {choice.method} "
                         f"({choice.reason})"))
    return lines


def _native_quantization(model: str) -> tuple[str, bool]:
    """How the model stores its linear layers, and whether that was read from its files (nothing is downloaded)."""
    from tokenmill.loader import catalog
    from tokenmill.loader.source import open_model

    entry = catalog.CATALOG.get(model)
    # A catalog embedding model is no generative model to open: it runs as stored, in float.
    if entry is not None and (entry.kind == "embed" or not catalog.is_pulled(model)):
        return entry.quantization, catalog.is_pulled(model)
    return open_model(model, pull_if_missing=False).files.native_quantization(), True


def main(config: EngineConfig) -> None:
    """Print the report."""
    for label, value in report(config):
        print(f"{label:10} {value}")
