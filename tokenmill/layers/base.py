"""Layer: the nn.Module that tokenmill's model layers derive from, cheap to call and to read from."""

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class Layer(nn.Module):
    """An nn.Module whose calls skip hook dispatch and whose registered tensors and submodules read as plain attributes.

    A SmolLM2 decode step calls about 300 layers and reads about 700 of their attributes: through
    nn.Module's __call__ (0.7 us) and __getattr__ (0.5 us) that was a fifth of the step on a 2-core CPU
    (docs/benchmarks.md). Each registered tensor or module is also kept in the instance __dict__, where
    Python finds it before ever calling __getattr__; every way nn.Module replaces one keeps the copy in step.
    """

    # NOTE: no forward hooks: a call runs forward directly, so registering one fails rather than never firing.
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def register_forward_hook(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} is a tokenmill Layer, called without hooks")

    register_forward_pre_hook = register_forward_hook

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        self._mirror(name)

    def __delattr__(self, name: str) -> None:
        super().__delattr__(name)
        self.__dict__.pop(name, None)

    def register_buffer(self, name: str, tensor: torch.Tensor | None, persistent: bool = True) -> None:
        super().register_buffer(name, tensor, persistent)
        self._mirror(name)

    def register_parameter(self, name: str, param: nn.Parameter | None) -> None:
        super().register_parameter(name, param)
        self._mirror(name)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "Layer":
        # .to(), to_empty() and the like may put new tensor objects in _parameters and _buffers.
        out = super()._apply(fn, recurse)
        for name in (*self._parameters, *self._buffers):
            self._mirror(name)
        return out

    def _mirror(self, name: str) -> None:
        for registry in ("_parameters", "_buffers", "_modules"):
            entries = self.__dict__.get(registry)
            if entries is not None and name in entries:
                self.__dict__[name] = entries[name]
