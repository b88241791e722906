"""Maps GGUF and Hugging Face architecture names to model classes."""

from torch import nn

from tokenmill.errors import UnsupportedArchitectureError
from tokenmill.models.llama import LlamaForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    # GGUF general.architecture values
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    # Hugging Face config.json architectures
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}


def model_class(architecture: str) -> type[nn.Module]:
    """The class implementing an architecture, or an error naming the supported ones."""
    if architecture not in MODEL_REGISTRY:
        raise UnsupportedArchitectureError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(MODEL_REGISTRY)}"
        )
    return MODEL_REGISTRY[architecture]
