"""Gemma 3 decoder: sliding-window and global layers interleaved, query/key norms, norms around each block."""

from itertools import islice

import torch
from torch import nn

from tokenmill.config import ModelConfig
from tokenmill.layers.activation import gelu_tanh_and_mul
from tokenmill.layers.base import Layer
from tokenmill.layers.norm import RMSNorm
from tokenmill.layers.rotary import RotaryEmbedding
from tokenmill.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP


class Gemma3DecoderLayer(Layer):
    """Attention and MLP, each between a pre-norm and a post-norm, with the residual carried between them."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.sliding = config.layer_window(layer) is not None
        self.self_attn = LlamaAttention(config, layer, qk_norm=True)  # Qwen3's q/k norms, Gemma's scale
        self.mlp = LlamaMLP(config, gelu_tanh_and_mul)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # x is the previous block's output, not yet added to the residual stream.
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.post_attention_layernorm(self.self_attn(x, cos, sin))
        x, residual = self.pre_feedforward_layernorm(x, residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


class Gemma3ForCausalLM(LlamaForCausalLM):
    """Token ids and positions of a flat batch in, hidden states out; Llama's weight loading and LM head."""

    # Its residual stream overflows float16: every logit came out NaN (vLLM refuses float16 for it too).
    fits_float16 = False

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        # Gemma scales the embeddings by sqrt(hidden); the tied LM head reads them unscaled.
        self.embed_scale = config.hidden_size**0.5
        self.local_rotary: RotaryEmbedding | None = None

    def _decoder_layer(self, layer: int) -> nn.Module:
        return Gemma3DecoderLayer(self.config, layer)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, num_layers: int | None = None) -> torch.Tensor:
        # input_ids, positions: [tokens]; returns hidden states [tokens, hidden] after the first num_layers
        # layers (all by default; fewer to draft by early exit) and the final norm
        x = self.embed_tokens(input_ids) * self.embed_scale
        angles = {False: self.rotary.cos_sin(positions, x.dtype), True: self.local_rotary.cos_sin(positions, x.dtype)}
        residual = None
        for layer in islice(self.layers, num_layers):  # slicing a ModuleList builds a new one: 85 us
            x, residual = layer(x, residual, *angles[layer.sliding])
        x, _ = self.norm(x, residual)
        return x

    def load_weights(self, weights) -> None:
        """Llama's loading, then Gemma's norm convention and the sliding layers' rotary base."""
        super().load_weights(weights)
        # transformers rounds the embedding scale to the model's type (the 270M's sqrt(640) is 25.25 in bfloat16).
        self.embed_scale = torch.tensor(self.embed_scale, dtype=self.norm.weight.dtype).item()
        # Gemma's RMSNorm scales by 1 + weight: folding the 1 in once lets the shared RMSNorm run as is. In
        # float32, as transformers computes it: 1 + w rounded to bfloat16 is off by up to 0.4% a channel.
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.weight = nn.Parameter(module.weight.detach().float() + 1, requires_grad=False)
        c = self.config
        self.local_rotary = RotaryEmbedding(c.head_dim, c.rope_local_theta or c.rope_theta)
        self.local_rotary.to(self.norm.weight.device)
