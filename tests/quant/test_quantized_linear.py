"""Quantized linear layers against the float matmul of their own dequantized weights, on both kernel paths."""

import pytest
import torch
from torch import nn

from tokenmill.errors import ModelLoadError
from tokenmill.quant import quantize_model
from tokenmill.quant.linear import Int4Linear, Int8Embedding, Int8Linear


def _weight(out_features: int = 96, in_features: int = 64) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("rows", [1, 5, 31, 32, 200])  # both sides of each layer's large-batch switch
@pytest.mark.parametrize("make", [lambda w: Int8Linear(w), lambda w: Int4Linear(w, group_size=16)])
def test_forward_equals_float_matmul_of_dequantized_weight(make, rows):
    layer = make(_weight())
    x = torch.randn(rows, 64)
    reference = x @ layer.dequantize(0, 96).T
    torch.testing.assert_close(layer(x), reference, rtol=1e-4, atol=1e-4)


def test_int8_round_trip_error_is_within_half_a_step_per_row():
    w = _weight()
    layer = Int8Linear(w)
    error = (layer.dequantize(0, 96) - w).abs().amax(dim=1)
    assert torch.all(error <= layer.scale / 2 + 1e-6)
    assert layer.qweight.dtype == torch.int8 and layer.qweight.abs().max() == 127


def test_int4_reproduces_weights_already_on_its_grid_exactly():
    # A GGUF Q4_1 tensor dequantized to float: each group of 32 is min + step * q with q in 0..15.
    q = torch.randint(0, 16, (8, 4, 32), generator=torch.Generator().manual_seed(1)).float()
    q[..., 0], q[..., 1] = 0, 15  # every group spans the full range, as Q4_1's quantizer makes it
    step, low = torch.rand(8, 4, 1) + 0.1, torch.randn(8, 4, 1)
    w = (low + step * q).view(8, 128)
    layer = Int4Linear(w, group_size=32)
    torch.testing.assert_close(layer.dequantize(0, 8), w, rtol=0, atol=1e-5)
    assert layer.qweight.numel() * 4 == w.numel() // 2  # two weights per byte


def test_bias_and_leading_dimensions_are_kept():
    bias = torch.randn(96)
    layer = Int8Linear(_weight(), bias)
    x = torch.randn(2, 3, 64)
    out = layer(x)
    assert out.shape == (2, 3, 96)
    torch.testing.assert_close(out, x @ layer.dequantize(0, 96).T + bias, rtol=1e-4, atol=1e-4)


def test_bfloat16_input_takes_the_dequantizing_fallback():
    layer = Int4Linear(_weight(), group_size=32)
    x = torch.randn(4, 64)
    out = layer(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), x @ layer.dequantize(0, 96).T, rtol=0.05, atol=0.1)


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(96, 64)
        self.proj = nn.Linear(64, 64)
        self.lm_head = nn.Linear(64, 96, bias=False)
        self.lm_head.weight = self.embed_tokens.weight


def test_int4_model_keeps_lm_head_int8_and_shares_it_with_the_tied_embedding():
    model = _Tied()
    embedding = model.embed_tokens.weight.detach().clone()
    quantize_model(model, "int4", group_size=32)
    assert isinstance(model.proj, Int4Linear) and isinstance(model.lm_head, Int8Linear)
    assert isinstance(model.embed_tokens, Int8Embedding) and model.embed_tokens.table is model.lm_head
    ids = torch.tensor([0, 5, 95])
    rows = model.embed_tokens(ids)
    assert torch.all((rows - embedding[ids]).abs() <= model.lm_head.scale[ids, None] / 2 + 1e-6)


def test_group_size_that_does_not_divide_a_layer_is_a_load_error_naming_it():
    with pytest.raises(ModelLoadError, match="proj: int4 group size 48"):
        quantize_model(_Tied(), "int4", group_size=48)


def test_none_leaves_the_model_alone():
    model = _Tied()
    quantize_model(model, "none", group_size=32)
    assert type(model.proj) is nn.Linear and type(model.embed_tokens) is nn.Embedding
