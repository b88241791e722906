"""Gemma 3 decoder: sliding-window and global layers interleaved, query/key norms, norms around each block."""

import torch
from torch import nn

from tokenmill.config import ModelConfig
from tokenmill.layers.activation import gelu_tanh_and_mul
from tokenmill.layers.attention import Attention
from tokenmill.layers.norm import RMSNorm
from tokenmill.layers.rotary import RotaryEmbedding, apply_rotary_
from tokenmill.models.llama import LlamaForCausalLM


class Gemma3Attention(nn.Module):
    """Grouped-query attention with RMSNorm over each query and key head before rotary."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, config.layer_window(layer),
                              config.attention_scale)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split_with_sizes([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.view(-1, self.num_heads, self.head_dim))
        k = self.k_norm(k.view(-1, self.num_kv_heads, self.head_dim))
        apply_rotary_(q, cos, sin)
        apply_rotary_(k, cos, sin)
        o = self.attn(q, k, v.view(-1, self.num_kv_heads, self.head_dim))
        return self.o_proj(o.view(-1, self.q_size))


class Gemma3MLP(nn.Module):
    """GeGLU feed-forward (tanh GELU) with a fused gate/up projection."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu_tanh_and_mul(self.gate_up_proj(x)))


class Gemma3DecoderLayer(nn.Module):
    """Attention and MLP, each between a pre-norm and a post-norm, with the residual carried between them."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.sliding = config.layer_window(layer) is not None
        self.self_attn = Gemma3Attention(config, layer)
        self.mlp = Gemma3MLP(config)
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

    def __init__(self, config: ModelConfig) -> None:
        nn.Module.__init__(self)  # Llama's layers are not built only to be replaced
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        # Gemma scales the embeddings by sqrt(hidden); the tied LM head reads them unscaled.
        self.embed_scale = config.hidden_size**0.5
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary: RotaryEmbedding | None = None
        self.local_rotary: RotaryEmbedding | None = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # input_ids, positions: [tokens]; returns hidden states [tokens, hidden]
        x = self.embed_tokens(input_ids) * self.embed_scale
        tables = {False: self.rotary.cos_sin(positions, x.dtype), True: self.local_rotary.cos_sin(positions, x.dtype)}
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, *tables[layer.sliding])
        x, _ = self.norm(x, residual)
        return x

    def load_weights(self, weights) -> None:
        """Llama's loading, then Gemma's norm convention and the sliding layers' rotary tables."""
        super().load_weights(weights)
        # Gemma's RMSNorm scales by 1 + weight: folding the 1 in once lets the shared RMSNorm run as is.
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, RMSNorm):
                    module.weight += 1
        c = self.config
        self.local_rotary = RotaryEmbedding(c.head_dim, c.max_position_embeddings, c.rope_local_theta or c.rope_theta)
        self.local_rotary.to(self.norm.weight.device)
