"""Build a model from a source: the quantization policy's choice, weights streamed in, packed for the CPU."""

import ctypes
import logging
import sys

import torch
from torch import nn

from tokenmill import ops
from tokenmill.config import EngineConfig
from tokenmill.dtypes import DTYPES
from tokenmill.errors import ModelLoadError
from tokenmill.heap import return_freed_heap
from tokenmill.layers.packed_linear import can_pack, pack_linears
from tokenmill.loader.source import ModelSource
from tokenmill.models.registry import model_class
from tokenmill.quant import quantize_model
from tokenmill.quant.linear import QuantizedLinear
from tokenmill.quant.policy import choose_quantization

logger = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
# Linux's madvise advice value (asm-generic/mman-common.h).
_MADV_HUGEPAGE = 14


def load_model(config: EngineConfig, source: ModelSource) -> tuple[nn.Module, str]:
    """The model on config.device in eval mode, and the quantization it runs with (none, int8 or int4)."""
    device, dtype = torch.device(config.device), DTYPES[config.dtype]
    model_cls = model_class(source.config.architecture, source.config.num_experts > 0)
    if dtype == torch.float16 and not model_cls.fits_float16:
        raise ModelLoadError(f"{source.config.architecture} overflows float16 (every logit NaN); use --dtype bfloat16 "
                             "or float32")
    choice = choose_quantization(config.quantization, source.files.native_quantization(), device, dtype,
                                 config.quant_group_size)
    (logger.warning if choice.slow else logger.info)("quantization %s (%s)", choice.method, choice.reason)
    # Built on the meta device, so no weight is initialized only to be overwritten and a layer
    # to be quantized never holds a float copy: each takes its rows as they stream in.
    with torch.device("meta"):
        model = model_cls(source.config).to(dtype)
        quantize_model(model, choice.method, config.quant_group_size)
    # Quantized layers are filled by CPU ops (quantize_weight_rows, pack_weight_rows): they load on CPU and move after.
    _allocate(model, torch.device("cpu") if choice.method != "none" else device, huge_pages=device.type == "cpu")
    model.load_weights(source.weights(dtype, levels=choice.method != "none"))
    model.to(device).eval()
    if choice.method == "none" and can_pack(device, dtype):
        pack_linears(model)
    # The C++ ops' first build compiles for seconds: at load, not in a client's first request (a
    # quantized model's load has built them already).
    if device.type == "cpu":
        ops.available()
    return_freed_heap()  # what the load freed: 6 MiB for SmolLM2
    return model, choice.method


def _allocate(model: nn.Module, device: torch.device, huge_pages: bool) -> None:
    """Give each meta parameter and buffer uninitialized storage on device, as Module.to_empty does.

    to_empty's empty_like runs torch's Python reference op on meta tensors, which imports sympy and
    about 480 other modules: 0.33 s of load, and int8's peak memory fell 26 MiB without them.
    With huge_pages, quantized layers' weights share one block in 2 MiB pages (see _in_huge_pages).
    """
    quantized: list[tuple[nn.Module, str, torch.Tensor]] = []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            empty = torch.empty(param.shape, dtype=param.dtype, device=device)
            setattr(module, name, nn.Parameter(empty, requires_grad=param.requires_grad))
        for name, buffer in module.named_buffers(recurse=False):
            if huge_pages and isinstance(module, QuantizedLinear):
                quantized.append((module, name, buffer))
            else:
                setattr(module, name, torch.empty(buffer.shape, dtype=buffer.dtype, device=device))
    if quantized:
        _in_huge_pages(quantized)


def _in_huge_pages(buffers: list[tuple[nn.Module, str, torch.Tensor]]) -> None:
    """Set each (module, name, meta buffer) to a view of one CPU block that Linux backs with 2 MiB pages.

    Every decode step streams all of a quantized model's weights from memory. In 4 KiB pages that is
    a TLB miss every 4 KiB (24,000 a token for SmolLM2); in 2 MiB pages its 1-row matmuls ran 10-25%
    faster and single-stream decode about 5% (docs/benchmarks.md). Single buffers are mostly under
    2 MiB, too small for a huge page of their own. Elsewhere the block is plain memory.
    """
    # Offsets a multiple of 64 bytes: every view is aligned for its dtype and for the kernels' loads.
    sizes = [-(-buffer.numel() * buffer.element_size() // 64) * 64 for _, _, buffer in buffers]
    block = torch.empty(sum(sizes) + HUGE_PAGE, dtype=torch.uint8)
    offset = -block.data_ptr() % HUGE_PAGE
    _advise_huge_pages(block.data_ptr() + offset, sum(sizes))
    for (module, name, buffer), size in zip(buffers, sizes):
        nbytes = buffer.numel() * buffer.element_size()
        setattr(module, name, block[offset : offset + nbytes].view(buffer.dtype).view(buffer.shape))
        offset += size


def _advise_huge_pages(address: int, length: int) -> None:
    """Ask Linux for transparent huge pages over a range not yet touched; a no-op where it cannot."""
    if not sys.platform.startswith("linux"):
        return
    try:
        madvise = ctypes.CDLL(None).madvise
    except (OSError, AttributeError):
        return
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    # Fails (EINVAL) where transparent huge pages are compiled out: the block stays in 4 KiB pages.
    madvise(address, length, _MADV_HUGEPAGE)
