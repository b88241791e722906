"""Build a model from a source: the quantization policy's choice, weights streamed in, packed for the CPU."""

import ctypes
import logging

import torch
from torch import nn

from tokenmill import ops
from tokenmill.config import EngineConfig
from tokenmill.dtypes import DTYPES
from tokenmill.layers.packed_linear import can_pack, pack_linears
from tokenmill.loader.source import ModelSource
from tokenmill.models.registry import model_class
from tokenmill.quant import quantize_model
from tokenmill.quant.policy import choose_quantization

logger = logging.getLogger(__name__)


def load_model(config: EngineConfig, source: ModelSource) -> tuple[nn.Module, str]:
    """The model on config.device in eval mode, and the quantization it runs with (none, int8 or int4)."""
    device, dtype = torch.device(config.device), DTYPES[config.dtype]
    choice = choose_quantization(config.quantization, source.files.native_quantization(), device, dtype)
    (logger.warning if choice.slow else logger.info)("quantization %s (%s)", choice.method, choice.reason)
    # Built on the meta device, so no weight is initialized only to be overwritten and a layer
    # to be quantized never holds a float copy: each takes its rows as they stream in.
    with torch.device("meta"):
        model = model_class(source.config.architecture, source.config.num_experts > 0)(source.config).to(dtype)
        quantize_model(model, choice.method, config.quant_group_size)
    # Quantized layers are filled by CPU ops (quantize_weight_rows, pack_weight_rows): they load on CPU and move after.
    _allocate(model, torch.device("cpu") if choice.method != "none" else device)
    model.load_weights(source.weights(dtype, levels=choice.method != "none"))
    model.to(device).eval()
    if choice.method == "none" and can_pack(device, dtype):
        pack_linears(model)
    # The C++ ops' first build compiles for seconds: at load, not in a client's first request (a
    # quantized model's load has built them already).
    if device.type == "cpu":
        ops.available()
    _return_freed_heap()
    return model, choice.method


def _allocate(model: nn.Module, device: torch.device) -> None:
    """Give each meta parameter and buffer uninitialized storage on device, as Module.to_empty does.

    to_empty's empty_like runs torch's Python reference op on meta tensors, which imports sympy and
    about 480 other modules: 0.33 s of load, and int8's peak memory fell 26 MiB without them.
    """
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            empty = torch.empty(param.shape, dtype=param.dtype, device=device)
            setattr(module, name, nn.Parameter(empty, requires_grad=param.requires_grad))
        for name, buffer in module.named_buffers(recurse=False):
            setattr(module, name, torch.empty(buffer.shape, dtype=buffer.dtype, device=device))


def _return_freed_heap() -> None:
    """Hand the load's freed heap back to the OS, which glibc otherwise keeps for reuse (6 MiB for SmolLM2)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
