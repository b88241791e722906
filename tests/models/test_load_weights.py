"""LlamaForCausalLM.load_weights: checkpoint tensors whole or in pieces of rows, and bad shapes."""

import pytest
import torch

from tokenmill.config import ModelConfig
from tokenmill.errors import ModelLoadError
from tokenmill.models.llama import LlamaForCausalLM

_CONFIG = ModelConfig(architecture="llama", vocab_size=40, hidden_size=32, intermediate_size=48, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
                      max_position_embeddings=64, tie_word_embeddings=True)


def _checkpoint() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (40, 32), "model.norm.weight": (32,)}
    prefix = "model.layers.0."
    shapes |= {prefix + n: s for n, s in [("input_layernorm.weight", (32,)), ("post_attention_layernorm.weight", (32,)),
                                          ("self_attn.q_proj.weight", (32, 32)), ("self_attn.k_proj.weight", (16, 32)),
                                          ("self_attn.v_proj.weight", (16, 32)), ("self_attn.o_proj.weight", (32, 32)),
                                          ("mlp.gate_proj.weight", (48, 32)), ("mlp.up_proj.weight", (48, 32)),
                                          ("mlp.down_proj.weight", (32, 48))]}
    return {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}


def _loaded(stream) -> LlamaForCausalLM:
    with torch.device("meta"):
        model = LlamaForCausalLM(_CONFIG)
    model.to_empty(device="cpu").load_weights(stream)
    return model


def test_tensors_in_pieces_of_rows_load_as_whole_ones():
    checkpoint = _checkpoint()
    whole = _loaded((name, slice(None), t) for name, t in checkpoint.items())
    pieces = _loaded(
        (name, slice(start, min(start + 7, len(t))), t[start : start + 7]) if t.dim() == 2 else (name, slice(None), t)
        for name, t in checkpoint.items()
        for start in (range(0, len(t), 7) if t.dim() == 2 else [0])
    )
    for (name, a), (_, b) in zip(whole.state_dict().items(), pieces.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(whole.layers[0].mlp.gate_up_proj.weight[48:], checkpoint["model.layers.0.mlp.up_proj.weight"])


def test_a_piece_past_its_shard_of_a_fused_layer_is_a_load_error_naming_it():
    checkpoint = _checkpoint()
    gate = torch.randn(50, 32)  # two rows more than intermediate_size: they would land in up_proj's rows
    stream = [(n, slice(None), t) for n, t in checkpoint.items() if "gate_proj" not in n]
    stream.append(("model.layers.0.mlp.gate_proj.weight", slice(40, 50), gate[40:]))
    with pytest.raises(ModelLoadError, match="gate_proj"):
        _loaded(stream)
