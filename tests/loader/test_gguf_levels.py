"""A GGUF file's Q4_1 and Q8_0 blocks loaded as their own levels: the weights dequantizing gives, bit for bit."""

import types

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize

from tokenmill.config import EngineConfig
from tokenmill.errors import ModelLoadError
from tokenmill.loader.gguf import GGUFFile
from tokenmill.loader.model_loader import load_model
from tokenmill.quant.levels import LevelRows
from tokenmill.quant.linear import Int4Linear, Int8Linear

# SmolLM2: the tied embedding is Q8_0, the layers Q4_1; Q and K rows are also unpermuted on the way.
NAMES = {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
         "model.layers.29.mlp.down_proj.weight"}


def _whole(weights) -> dict[str, torch.Tensor]:
    """The NAMES tensors, their pieces put together in float32."""
    pieces: dict[str, list] = {}
    for name, _, tensor in weights:
        if name in NAMES:
            pieces.setdefault(name, []).append(tensor.dequantize() if isinstance(tensor, LevelRows) else tensor)
    return {name: torch.cat(parts) for name, parts in pieces.items()}


def test_levels_dequantize_to_what_the_gguf_package_dequantizes(smollm2_source):
    levels = list(smollm2_source.weights(torch.float32, levels=True))
    kinds = {name: (piece.bits, piece.group) for name, _, piece in levels if isinstance(piece, LevelRows)}
    assert kinds["model.embed_tokens.weight"] == (8, 32) and kinds["model.layers.0.mlp.up_proj.weight"] == (4, 32)
    assert not any(isinstance(piece, LevelRows) for _, _, piece in smollm2_source.weights(torch.float32))
    expected = _whole(smollm2_source.weights(torch.float32))
    got = _whole(levels)
    assert got.keys() == NAMES
    for name in NAMES:
        assert torch.equal(got[name], expected[name]), name


def test_a_model_loaded_from_levels_holds_the_same_bits_as_one_quantized_from_floats(smollm2_source, monkeypatch):
    config = EngineConfig(model=str(smollm2_source.path), quantization="int4")
    direct = load_model(config, smollm2_source)[0].state_dict()
    with monkeypatch.context() as patch:
        floats_only = smollm2_source.weights
        patch.setattr(smollm2_source, "weights", lambda dtype, levels=False: floats_only(dtype))
        reference = load_model(config, smollm2_source)[0].state_dict()
    assert direct.keys() == reference.keys()
    assert all(torch.equal(direct[k], reference[k]) for k in direct)


def _tiny_gguf(path, raw: np.ndarray, qtype: GGMLQuantizationType) -> GGUFFile:
    writer = GGUFWriter(path, "qwen2")
    writer.add_tensor("blk.0.ffn_up.weight", raw, raw_shape=raw.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GGUFFile(path)


def test_each_expert_of_a_stack_comes_as_its_levels(tmp_path):
    # Stacked experts went through float: a Q4_0 MoE file, int4 under auto, had 71% of its experts' weights moved.
    qtype = GGMLQuantizationType.Q4_0
    raw = quantize(np.random.default_rng(0).standard_normal((2, 32, 64)).astype(np.float32), qtype)
    writer = GGUFWriter(tmp_path / "moe.gguf", "qwen2moe")
    writer.add_tensor("blk.0.ffn_up_exps.weight", raw, raw_shape=raw.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    file = GGUFFile(tmp_path / "moe.gguf")
    assert file.native_quantization() == "int4"
    config = types.SimpleNamespace(num_experts=2, num_heads=1, num_kv_heads=1)
    experts = [Int4Linear(64, 32, 32) for _ in range(2)]
    for name, rows, piece in file.weights(config, torch.float32, True):
        assert isinstance(piece, LevelRows)
        experts[int(name.split(".")[5])].load_rows(rows, piece, name)
    for expert, layer in enumerate(experts):
        assert torch.equal(layer.dequantize(), torch.from_numpy(dequantize(raw[expert], qtype)))


@pytest.mark.parametrize("qtype, layer", [
    (GGMLQuantizationType.Q4_0, Int4Linear), (GGMLQuantizationType.Q4_0, Int8Linear),
    (GGMLQuantizationType.Q4_1, Int8Linear), (GGMLQuantizationType.Q5_0, Int8Linear),
    (GGMLQuantizationType.Q5_1, Int8Linear),
])
def test_a_layer_of_at_least_the_blocks_bits_holds_them_exactly(tmp_path, qtype, layer):
    # They went through float and onto a new grid: SmolLM2 in Q4_0 under auto (int8 then) moved its logits 0.67 from
    # the file's own, 3 of 16 greedy tokens changed.
    raw = quantize(np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32), qtype)
    config = types.SimpleNamespace(num_experts=0, num_heads=1, num_kv_heads=1)
    loaded = layer(64, 32, 32)
    for name, rows, piece in _tiny_gguf(tmp_path / "tiny.gguf", raw, qtype).weights(config, torch.float32, True):
        assert isinstance(piece, LevelRows)
        loaded.load_rows(rows, piece, name)
    assert torch.equal(loaded.dequantize(), torch.from_numpy(dequantize(raw, qtype)))


def test_q8_0_blocks_whose_offset_passes_float16_come_as_floats(tmp_path):
    # Steps above 511.75 are fine float16, but -128 * d is not: the levels' offsets were -inf, loaded unchecked.
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 64)).astype(np.float32)
    w[16:] *= 1e5  # rows 16 on: steps near 800
    raw = quantize(w, GGMLQuantizationType.Q8_0)
    path = tmp_path / "big.gguf"
    writer = GGUFWriter(path, "qwen2")
    writer.add_tensor("blk.0.ffn_up.weight", raw, raw_shape=raw.shape, raw_dtype=GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    config = types.SimpleNamespace(num_experts=0, num_heads=1, num_kv_heads=1)
    file = GGUFFile(path)
    file_pieces = list(file.weights(config, torch.float32, levels=True))
    got = torch.cat([p.dequantize() if isinstance(p, LevelRows) else p for _, _, p in file_pieces])
    assert torch.equal(got, torch.from_numpy(dequantize(raw, GGMLQuantizationType.Q8_0)))
    # A quantized layer refuses them as it refuses any float weights past its float16 scales.
    layer = Int8Linear(64, 32, 32)
    with pytest.raises(ModelLoadError, match="--quantization none"):
        for name, rows, piece in file_pieces:
            layer.load_rows(rows, piece, name)
