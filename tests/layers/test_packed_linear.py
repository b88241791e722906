"""bfloat16 linear layers packed for oneDNN compute what F.linear does, for any number of rows."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.layers.packed_linear import PackedLinear, can_pack, pack_linears

pytestmark = pytest.mark.skipif(
    not can_pack(torch.device("cpu"), torch.bfloat16), reason="oneDNN has no bfloat16 kernels for this CPU (needs AVX-512)"
)


@pytest.mark.parametrize("rows", [1, 5, 64])
def test_packed_linear_matches_f_linear(rows):
    torch.manual_seed(0)
    linear = nn.Linear(96, 160, bias=True).to(torch.bfloat16)
    x = torch.randn(rows, 96, dtype=torch.bfloat16)
    expected = F.linear(x.float(), linear.weight.float(), linear.bias.float())
    out = PackedLinear(linear)(x)
    assert out.shape == (rows, 160) and out.dtype == torch.bfloat16
    # Both sides hold the same bfloat16 weights; only the output's rounding to bfloat16 differs.
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)


def test_pack_linears_swaps_every_linear_and_keeps_the_outputs(tied_lm):
    model = tied_lm.to(torch.bfloat16)
    ids = torch.tensor([0, 7, 95])
    with torch.no_grad():
        before = model(ids).float()
        pack_linears(model)
        after = model(ids).float()
    assert isinstance(model.proj, PackedLinear) and isinstance(model.lm_head, PackedLinear)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert isinstance(model.embed_tokens, nn.Embedding)  # the tied table stays for lookups
    torch.testing.assert_close(after, before, rtol=2e-2, atol=2e-2)


def test_only_bfloat16_on_cpu_is_packed():
    assert not can_pack(torch.device("cpu"), torch.float32)
    assert not can_pack(torch.device("meta"), torch.bfloat16)


def test_bfloat16_is_not_packed_where_pytorch_was_told_to_dispatch_avx2(monkeypatch):
    # oneDNN still says yes there, but PyTorch's bfloat16 attention refuses to run (seen with ATEN_CPU_CAPABILITY).
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr("tokenmill.ops.ARCH", "x86")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not can_pack(torch.device("cpu"), torch.bfloat16)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert can_pack(torch.device("cpu"), torch.bfloat16) is torch.backends.mkldnn.is_available()
