"""A Llama model's decoder layers as one C++ op on CPU (csrc/llama_layers.cpp), where each layer can run there."""

from collections.abc import Sequence

import torch
from torch import nn

from tokenmill import ops
from tokenmill.layers.activation import silu_and_mul
from tokenmill.layers.attention import current_metadata
from tokenmill.quant.linear import QuantizedLinear


def _linears(layer: nn.Module) -> list[nn.Module]:
    """A decoder layer's projections in the op's order: QKV, O, gate/up, down."""
    return [layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj]


class FusedLlamaLayers:
    """Decoder layers run by torch.ops.tokenmill.llama_layers: their own kernels in their order, nothing between."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        attn = layers[0].self_attn
        self.layers = layers
        self.heads, self.kv_heads, self.scale = attn.num_heads, attn.num_kv_heads, attn.attn.scale
        self.eps = layers[0].input_layernorm.eps
        self.bits = [linear.bits for layer in layers for linear in _linears(layer)]
        self._tensors: list[torch.Tensor] = []
        self._k_cache: torch.Tensor | None = None  # the first layer's cache when _tensors was gathered

    @classmethod
    def of(cls, layers: Sequence[nn.Module]) -> "FusedLlamaLayers | None":
        """The fused stack where every layer is a plain Llama layer the op runs as the layer would; else None."""
        from tokenmill.models.llama import LlamaDecoderLayer, LlamaMLP  # llama.py imports this module

        def runs(layer: nn.Module) -> bool:
            if type(layer) is not LlamaDecoderLayer or type(layer.mlp) is not LlamaMLP:
                return False
            attn, mlp = layer.self_attn, layer.mlp
            sizes = (attn.head_dim % (2 * ops.LANES), layer.input_layernorm.weight.shape[0] % ops.LANES,
                     mlp.down_proj.in_features % ops.LANES)
            # Each condition is one under which a layer's own forward leaves the C++ ops or adds a step.
            return (mlp.gate_and_mul is silu_and_mul and attn.q_norm is None and attn.attn.sliding_window is None
                    and attn.attn.native_shape and layer.input_layernorm.weight.dtype == torch.float32
                    and all(isinstance(p, QuantizedLinear) and p.bias is None for p in _linears(layer))
                    and not any(sizes))

        return cls(layers) if len(layers) and all(runs(layer) for layer in layers) and ops.available() else None

    def __call__(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_layers: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first num_layers layers (all by default, at least one) over x: their output and the residual stream."""
        n = len(self.layers) if num_layers is None else num_layers
        tensors = self._layer_tensors()
        per_layer = len(tensors) // len(self.layers)
        meta = current_metadata()
        out = torch.ops.tokenmill.llama_layers(
            x, cos, sin, tensors[: n * per_layer], self.bits[: 4 * n], self.heads, self.kv_heads, self.eps,
            self.scale, meta.slot_mapping, meta.row_tables, meta.row_lens,
        )
        return out, x  # the op leaves the residual stream in x

    def _layer_tensors(self) -> list[torch.Tensor]:
        # Gathered again only when the runner binds new caches: SmolLM2's 30 layers' tensors take 85 us to gather.
        k_cache = self.layers[0].self_attn.attn.k_cache
        if k_cache is not self._k_cache:
            self._tensors = [t for layer in self.layers for t in _tensors_of(layer)]
            self._k_cache = k_cache
        return self._tensors


def _tensors_of(layer: nn.Module) -> list[torch.Tensor]:
    """One layer's tensors in the op's order (csrc/llama_layers.cpp)."""
    attn = layer.self_attn.attn
    qkv, o, gate_up, down = _linears(layer)
    tensors = [layer.input_layernorm.weight, qkv.qweight, qkv.scale, o.qweight, o.scale,
               layer.post_attention_layernorm.weight, gate_up.qweight, gate_up.scale, down.qweight, down.scale,
               attn.k_cache, attn.v_cache]
    return tensors + [attn.k_scale, attn.v_scale] if attn.k_scale is not None else tensors
