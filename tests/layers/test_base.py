"""Layer: attribute reads see exactly what nn.Module has registered, however it was replaced."""

import pytest
import torch
from torch import nn

from tokenmill.layers.base import Layer


class Scaled(Layer):
    """weight * x + offset, with a submodule, to have one of each registered kind."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4))
        self.register_buffer("offset", torch.zeros(4))
        self.inner = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.weight * x + self.offset)


def _in_step(layer: Layer) -> None:
    """Every registered name reads as the registered object, and from the instance dict (no __getattr__)."""
    for registry in (layer._parameters, layer._buffers, layer._modules):
        for name, value in registry.items():
            assert layer.__dict__[name] is value and getattr(layer, name) is value


def test_reads_follow_assignment_registration_and_conversion():
    layer = Scaled()
    _in_step(layer)
    layer.weight = nn.Parameter(torch.full((4,), 2.0))
    layer.offset = torch.ones(4)  # a registered buffer replaced by assignment
    layer.register_buffer("extra", torch.zeros(2))
    layer.inner = nn.ReLU()
    _in_step(layer)
    assert torch.equal(layer(-torch.ones(4)), torch.zeros(4))  # relu(2 * -1 + 1)
    layer.double()  # _apply replaces the buffers (and may replace parameters) with new tensors
    _in_step(layer)
    assert layer.weight.dtype == layer.offset.dtype == torch.float64


def test_built_on_meta_then_given_storage_reads_the_new_tensors():
    with torch.device("meta"):
        layer = Scaled()
    layer.to_empty(device="cpu")
    _in_step(layer)
    assert layer.weight.device.type == "cpu" and layer.offset.device.type == "cpu"


def test_deleted_names_are_gone_from_both():
    layer = Scaled()
    del layer.offset
    del layer.inner
    assert "offset" not in layer._buffers and "inner" not in layer._modules
    with pytest.raises(AttributeError):
        layer.offset
    with pytest.raises(AttributeError):
        layer.inner


def test_a_forward_hook_is_refused_rather_than_never_called():
    with pytest.raises(NotImplementedError, match="without hooks"):
        Scaled().register_forward_hook(lambda module, args, out: None)
    with pytest.raises(NotImplementedError, match="without hooks"):
        Scaled().register_forward_pre_hook(lambda module, args: None)
