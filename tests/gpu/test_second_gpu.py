"""--device cuda:N: the Triton kernel runs on the tensors' GPU, not the thread's current one (0)."""

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two NVIDIA GPUs")


def test_paged_attention_runs_on_a_second_gpu_while_the_current_device_is_0():
    from tokenmill.layers.triton_attention import paged_attention

    device = torch.device("cuda:1")
    assert torch.cuda.current_device() == 0
    q = torch.randn(2, 4, 64, device=device)
    k = torch.randn(4, 16, 2, 64, device=device)
    tables, lens = torch.tensor([[0], [1]], device=device), torch.tensor([3, 5], device=device)
    # Launched on device 0 it failed: "Pointer argument (at 0) cannot be accessed from Triton".
    assert paged_attention(q, k, k.clone(), tables, lens, 0.125, None).isfinite().all()
