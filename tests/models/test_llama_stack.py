"""The fused decoder stack (csrc/llama_layers.cpp) gives the bits of the Python layers it stands in for."""

import pytest
import torch

from tokenmill.engine.model_runner import Chunk, flat_batch
from tokenmill.layers.activation import gelu_tanh_and_mul
from tokenmill.layers.attention import attention_metadata
from tokenmill.models.llama_stack import FusedLlamaLayers


def _hidden(engine, chunks: list[Chunk], fused: FusedLlamaLayers | None, num_layers: int | None = None) -> torch.Tensor:
    model = engine.runner.model
    ids, positions, meta = flat_batch(chunks, engine.runner.block_size, torch.device("cpu"))
    kept, model.fused_layers = model.fused_layers, fused
    try:
        with torch.inference_mode(), attention_metadata(meta):
            return model(ids, positions, num_layers)
    finally:
        model.fused_layers = kept


@pytest.mark.parametrize("quantization", ["int4", "int8"])
@pytest.mark.parametrize("kv_cache_dtype", ["float16", "int8"])
def test_prompt_chunks_and_decodes_match_the_python_layers_bit_for_bit(make_engine, quantization, kv_cache_dtype):
    engine = make_engine(quantization=quantization, kv_cache_dtype=kv_cache_dtype)
    fused = engine.runner.model.fused_layers
    assert fused is not None
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randint(0, 49152, (n,), generator=g).tolist() for n in (21, 40, 17, 300)]
    tables = [[1, 2], [3, 4, 5], [6, 7], list(range(8, 27))]
    # Two prompts whole; then a decode row for each of them beside a third prompt, in two chunks; then the third's
    # last rows beside a fourth prompt, 308 rows: the op's MLP takes them 128 at a time, the last 52.
    steps = [
        [Chunk(tokens[0][:20], 0, tables[0]), Chunk(tokens[1][:39], 0, tables[1])],
        [Chunk(tokens[0][20:], 20, tables[0]), Chunk(tokens[1][39:], 39, tables[1]), Chunk(tokens[2][:9], 0, tables[2])],
        [Chunk(tokens[2][9:], 9, tables[2]), Chunk(tokens[3], 0, tables[3])],
    ]
    for chunks in steps:
        # Each step runs both ways over the same pool: both write the same keys and values into the same slots.
        expected = _hidden(engine, chunks, None)
        assert torch.equal(_hidden(engine, chunks, fused), expected)
    # Early exit (self-drafting) runs the first layers only.
    assert torch.equal(_hidden(engine, steps[2], fused, num_layers=3), _hidden(engine, steps[2], None, num_layers=3))


def test_stays_off_where_a_layer_would_leave_the_cpu_ops(make_engine):
    assert make_engine(quantization="none").runner.model.fused_layers is None
    layers = make_engine(quantization="int4").runner.model.layers
    assert FusedLlamaLayers.of(layers) is not None
    changes = [
        (layers[1].self_attn.attn, "sliding_window", 8),
        (layers[1].mlp, "gate_and_mul", gelu_tanh_and_mul),
        (layers[1].self_attn.o_proj, "bias", torch.nn.Parameter(torch.zeros(576), requires_grad=False)),
    ]
    for owner, name, value in changes:
        kept = getattr(owner, name)
        setattr(owner, name, value)
        try:
            assert FusedLlamaLayers.of(layers) is None, name
        finally:
            setattr(owner, name, kept)
