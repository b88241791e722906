"""Mixtral, Qwen2-MoE and Qwen3-MoE from GGUF files laid out as llama.cpp's converter writes them: logits and greedy
tokens equal transformers' on the same weights."""

import copy
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers

# The dense families' prompts, tokens and probes, and the MoE families' tiny configs.
from test_families import EXACT, VOCAB, _byte_tokens, _generate, _greedy_alone, _max_logit_diff, _permute
from test_moe import _config, one_thread  # noqa: F401 (one_thread: an autouse fixture, one torch thread)
from tokenmill import LLM
from tokenmill.errors import ModelLoadError
from tokenmill.layers.moe import Gate, SparseMoE
from tokenmill.loader.gguf import GGUFFile
from tokenmill.models.mixtral import MixtralForCausalLM
from tokenmill.quant.linear import Int8Linear

_ARCHITECTURES = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}
# Hugging Face module paths to llama.cpp's per-layer tensor names.
_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate": "ffn_gate_inp", "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp", "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp",
}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}


def _random_model(family: str, float16: bool) -> transformers.PreTrainedModel:
    config = _config(family)
    config.mlp_only_layers = []  # llama.cpp's qwen2moe has experts in every layer (test_moe keeps one dense)
    torch.manual_seed(0)
    model = getattr(transformers, config.architectures[0])(config).eval()
    if float16:  # weights rounded to float16 values: the reference runs exactly what a float16 file holds
        with torch.no_grad():
            for param in model.parameters():  # not model.half(): that would round the rotary table too
                param.copy_(param.half())
    return model


def _gguf_tensors(model: transformers.PreTrainedModel, architecture: str) -> dict[str, np.ndarray]:
    """The model's tensors under llama.cpp's names, its experts stacked [experts, rows, columns] per projection."""
    c, tensors = model.config, {}
    for name, tensor in model.state_dict().items():
        array = tensor.float().numpy()
        if name in _GLOBAL_NAMES:
            tensors[_GLOBAL_NAMES[name]] = array
            continue
        layer, module, kind = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(\w+)", name).groups()
        prefix = f"blk.{layer}"
        if module == "mlp.experts" and kind == "gate_up_proj":  # [experts, 2 * width, hidden]: gate rows, then up
            gate, up = np.split(array, 2, axis=1)
            tensors[f"{prefix}.ffn_gate_exps.weight"], tensors[f"{prefix}.ffn_up_exps.weight"] = gate, up
        elif module == "mlp.experts" and kind == "down_proj":
            tensors[f"{prefix}.ffn_down_exps.weight"] = array
        else:
            if architecture == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = c.num_attention_heads if module.endswith("q_proj") else c.num_key_value_heads
                array = _permute(array, heads)
            if module == "mlp.shared_expert_gate":  # [1, hidden]; older converters squeezed it to [hidden]
                array = array[0]
            tensors[f"{prefix}.{_LAYER_NAMES[module]}.{kind}"] = array
    return tensors


# llama.cpp's linear layers, whose types a Q8_0 or F16 file changes (norms and routers stay float32).
_LINEAR_TENSORS = (".attn_q.", ".attn_k.", ".attn_v.", ".attn_output.", "_exps.", "_gate_shexp.", "_up_shexp.",
                   "_down_shexp.")


def _write_gguf(path: Path, model: transformers.PreTrainedModel, architecture: str, tensors: dict[str, np.ndarray],
                qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32) -> None:
    """A GGUF file with llama.cpp's metadata for the architecture, a byte-level vocabulary and the tensors, the
    linear layers' stored as qtype."""
    c = model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_expert_count(getattr(c, "num_local_experts", None) or c.num_experts)
    writer.add_expert_used_count(c.num_experts_per_tok)
    if architecture != "llama":  # Mixtral's experts are feed_forward_length wide
        writer.add_expert_feed_forward_length(c.moe_intermediate_size)
    if getattr(c, "shared_expert_intermediate_size", 0):
        writer.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(_byte_tokens())
    writer.add_token_types([gguf.TokenType.NORMAL] * VOCAB)
    for name, array in tensors.items():
        if any(part in name for part in _LINEAR_TENSORS) and qtype != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_moe_gguf_logits_and_greedy_tokens_match_transformers(family, tmp_path):
    float16 = family == "qwen3_moe"  # one family's linear layers in float16, the others' in float32
    model, architecture = _random_model(family, float16), _ARCHITECTURES[family]
    qtype = gguf.GGMLQuantizationType.F16 if float16 else gguf.GGMLQuantizationType.F32
    _write_gguf(tmp_path / "model.gguf", model, architecture, _gguf_tensors(model, architecture), qtype)
    llm = LLM(str(tmp_path / "model.gguf"), **EXACT)
    ours = llm.engine.runner.model
    assert all(isinstance(layer.mlp, SparseMoE) for layer in ours.layers)
    assert isinstance(ours, MixtralForCausalLM) == (family == "mixtral")
    assert (ours.layers[0].mlp.shared_expert is not None) == (family == "qwen2_moe")
    diff = _max_logit_diff(llm.engine, model)
    print(f"{family}: max |logit diff| {diff:.2e}")
    assert diff < 1e-3
    assert _generate(llm) == _greedy_alone(model)


@pytest.fixture(scope="module")
def mixtral() -> transformers.PreTrainedModel:
    """The tiny random Mixtral, the reference for files a test alters."""
    return _random_model("mixtral", float16=False)


def _q8_0_rounded(model: transformers.PreTrainedModel) -> transformers.PreTrainedModel:
    """A copy of the model whose linear weights are what a Q8_0 file of it dequantizes to.

    Q8_0 rounds each row's blocks of 32 on their own, so rounding before llama.cpp's row permutation and the
    split of gate from up gives the same values as the file's.
    """
    rounded = copy.deepcopy(model)
    q8_0 = gguf.GGMLQuantizationType.Q8_0
    with torch.no_grad():
        for name, param in rounded.named_parameters():
            if name.endswith(("_proj.weight", "experts.gate_up_proj", "experts.down_proj")):
                values = gguf.quants.dequantize(gguf.quants.quantize(param.detach().numpy(), q8_0), q8_0)
                param.copy_(torch.from_numpy(values.reshape(param.shape)))
    return rounded


def test_q8_0_moe_file_loads_its_experts_into_int8_layers_and_keeps_its_router_float(mixtral, tmp_path):
    path = tmp_path / "q8_0.gguf"
    _write_gguf(path, mixtral, "llama", _gguf_tensors(mixtral, "llama"), gguf.GGMLQuantizationType.Q8_0)
    assert GGUFFile(path).native_quantization() == "int8"  # the stacked experts count as linear layers
    llm = LLM(str(path), quantization="int8", kv_cache_dtype="float32")
    for layer in llm.engine.runner.model.layers:
        experts = layer.mlp.experts
        assert all(isinstance(e.gate_up_proj, Int8Linear) and isinstance(e.down_proj, Int8Linear) for e in experts)
        assert isinstance(layer.mlp.gate, Gate) and layer.mlp.gate.weight.dtype == torch.float32
    # int8 groups of 32 hold Q8_0's blocks exactly: each expert holds the file's values, gate rows before up rows.
    reference = _q8_0_rounded(mixtral)
    for ours, theirs in zip(llm.engine.runner.model.layers, reference.model.layers):
        for i, expert in enumerate(ours.mlp.experts):
            assert torch.equal(expert.gate_up_proj.dequantize(), theirs.mlp.experts.gate_up_proj[i].detach())
            assert torch.equal(expert.down_proj.dequantize(), theirs.mlp.experts.down_proj[i].detach())


def test_expert_count_other_than_the_metadata_is_a_load_error_naming_the_tensor(mixtral, tmp_path):
    tensors = _gguf_tensors(mixtral, "llama")
    tensors["blk.1.ffn_up_exps.weight"] = tensors["blk.1.ffn_up_exps.weight"][:3]  # 3 experts of the 4 declared
    _write_gguf(tmp_path / "short.gguf", mixtral, "llama", tensors)
    expected = r"blk\.1\.ffn_up_exps\.weight has shape \(3, 64, 64\); expected \[4 experts"
    with pytest.raises(ModelLoadError, match=expected):
        LLM(str(tmp_path / "short.gguf"), **EXACT)


def test_moe_gguf_missing_an_expert_projection_is_a_load_error_naming_it(mixtral, tmp_path):
    tensors = _gguf_tensors(mixtral, "llama")
    del tensors["blk.0.ffn_down_exps.weight"]
    _write_gguf(tmp_path / "short.gguf", mixtral, "llama", tensors)
    # Each of the 4 experts' down projection, by the checkpoint name it stands for.
    expected = r"lacks 4 tensors .* e\.g\. model\.layers\.0\.block_sparse_moe\.experts\.0\.w2\.weight"
    with pytest.raises(ModelLoadError, match=expected):
        LLM(str(tmp_path / "short.gguf"), **EXACT)
