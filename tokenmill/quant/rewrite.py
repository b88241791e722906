"""Replace a loaded model's linear layers (and a tied embedding) with quantized ones, in place."""

import logging

from torch import nn

from tokenmill.errors import ModelLoadError
from tokenmill.quant.linear import Int4Linear, Int8Embedding, Int8Linear, QuantizedLinear

logger = logging.getLogger(__name__)


def quantize_model(model: nn.Module, method: str, group_size: int) -> None:
    """Quantize every nn.Linear to int8 or int4 in groups along the input, with the LM head kept int8.

    On a model built on the meta device this only swaps in empty quantized layers, which load
    their rows as the checkpoint streams in; otherwise the current weights are quantized.
    """
    if method == "none":
        return
    # The LM head stays int8 under int4: its errors land directly on the logits, and it is the
    # one matrix an int8 kernel reads as fast as an int4 one here (docs/benchmarks.md).
    embeddings = {id(m.weight): (name, m) for name, m in model.named_modules() if isinstance(m, nn.Embedding)}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        shape, bias, device = (module.in_features, module.out_features), module.bias is not None, module.weight.device
        layer = Int8Linear if method == "int8" or name.endswith("lm_head") else Int4Linear
        try:
            quantized: QuantizedLinear = layer(*shape, group_size, bias, device)
        except ValueError as e:
            raise ModelLoadError(f"{name}: {method} {e}") from None
        if not module.weight.is_meta:
            quantized.load_rows(slice(None), module.weight.detach(), name)
            if bias:
                quantized.bias.copy_(module.bias.detach())
        tied = embeddings.get(id(module.weight))
        if tied is not None and isinstance(quantized, Int8Linear):
            # A tied embedding reads the LM head's int8 rows rather than keeping a float copy.
            model.set_submodule(tied[0], Int8Embedding(quantized, module.weight.dtype))
        model.set_submodule(name, quantized)
    logger.info("quantized linear layers to %s (group size %d)", method, group_size)

