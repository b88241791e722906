"""Mixtral: Llama's attention with a sparse mixture of SwiGLU experts as every layer's feed-forward."""

from torch import nn

from tokenmill.config import ModelConfig
from tokenmill.layers.moe import SparseMoE
from tokenmill.layers.norm import RMSNorm
from tokenmill.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM


class MixtralDecoderLayer(LlamaDecoderLayer):
    """Llama's pre-norm layer with the experts under Mixtral's checkpoint name, block_sparse_moe."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        nn.Module.__init__(self)  # Llama's dense MLP is not built only to be left out
        self.self_attn = LlamaAttention(config, layer)
        # Mixtral always rescales the top-k routing weights to sum to 1.
        self.block_sparse_moe = SparseMoE(config.hidden_size, config.intermediate_size, config.num_experts,
                                          config.num_experts_per_tok, normalize=True)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    @property
    def mlp(self) -> nn.Module:
        """The experts, where Llama's layer forward looks for its feed-forward."""
        return self.block_sparse_moe


class MixtralForCausalLM(LlamaForCausalLM):
    """Mixtral over a flat batch of tokens, loaded with Llama's weight loading."""

    # Mixtral's checkpoints name each expert's projections w1 (gate), w3 (up) and w2 (down); w2 is a
    # one-shard "fusion", i.e. a rename, so errors about it still name the checkpoint's tensor.
    stacked_params = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "w1": ("gate_up_proj", 0),
        "w3": ("gate_up_proj", 1),
        "w2": ("down_proj", 0),
    }
    fused_shards = {"qkv_proj": 3, "gate_up_proj": 2, "down_proj": 1}

    def _decoder_layer(self, layer: int) -> nn.Module:
        return MixtralDecoderLayer(self.config, layer)
