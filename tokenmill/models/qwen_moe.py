"""Qwen2-MoE and Qwen3-MoE: the Llama (Qwen2) and Qwen3 decoders with sparse mixtures of experts as feed-forwards."""

from torch import nn

from tokenmill.layers.moe import SparseMoE
from tokenmill.models.llama import LlamaDecoderLayer, LlamaForCausalLM


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    """Qwen2-MoE: routed experts plus a shared expert on the sparse layers, a dense MLP on the others."""

    def _decoder_layer(self, layer: int) -> nn.Module:
        c = self.config
        mlp = None  # dense: the layers in mlp_only_layers, or off the decoder_sparse_step
        if c.moe_layer(layer):
            mlp = SparseMoE(c.hidden_size, c.moe_intermediate_size, c.num_experts, c.num_experts_per_tok,
                            c.norm_topk_prob, c.shared_expert_intermediate_size)
        return LlamaDecoderLayer(c, layer, self.qk_norm, mlp)


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    """Qwen3-MoE: Qwen3's per-head query/key norms, routed experts and no shared expert."""

    qk_norm = True
