"""Replace a loaded model's linear layers (and a tied embedding) with quantized ones, in place."""

import logging

import numba
import torch
from torch import nn

from tokenmill.errors import ModelLoadError
from tokenmill.quant.linear import Int4Linear, Int8Embedding, Int8Linear, QuantizedLinear

logger = logging.getLogger(__name__)


def quantize_model(model: nn.Module, method: str, group_size: int) -> None:
    """Quantize every nn.Linear: int8 per row, or int4 in groups with the LM head kept int8."""
    if method == "none":
        return
    # The kernels run on numba's thread pool; give it the threads torch was given.
    numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    # The LM head stays int8 under int4: its errors land directly on the logits, and it is the
    # one matrix an int8 kernel reads as fast as an int4 one here (docs/benchmarks.md).
    embeddings = {id(m.weight): (name, m) for name, m in model.named_modules() if isinstance(m, nn.Embedding)}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        if method == "int8" or name.endswith("lm_head"):
            quantized: QuantizedLinear = Int8Linear(module.weight, module.bias)
        else:
            try:
                quantized = Int4Linear(module.weight, group_size, module.bias)
            except ValueError as e:
                raise ModelLoadError(f"{name}: {e}") from None
        tied = embeddings.get(id(module.weight))
        if tied is not None and isinstance(quantized, Int8Linear):
            # A tied embedding reads the LM head's int8 rows rather than keeping a float copy.
            _replace(model, tied[0], Int8Embedding(quantized, module.weight.dtype))
        _replace(model, name, quantized)
    logger.info("quantized linear layers to %s%s", method, f" (group size {group_size})" if method == "int4" else "")


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
