"""Maps GGUF and Hugging Face architecture names to model classes."""

from torch import nn

from tokenmill.errors import UnsupportedArchitectureError
from tokenmill.models.gemma3 import Gemma3ForCausalLM
from tokenmill.models.llama import LlamaForCausalLM, Qwen3ForCausalLM
from tokenmill.models.mixtral import MixtralForCausalLM
from tokenmill.models.qwen_moe import Qwen2MoeForCausalLM, Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    # GGUF general.architecture values
    "gemma3": Gemma3ForCausalLM,
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen2moe": Qwen2MoeForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "qwen3moe": Qwen3MoeForCausalLM,
    # Hugging Face config.json architectures
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
}


# GGUF architectures whose files with experts ({arch}.expert_count) are another family: llama.cpp writes Mixtral
# as llama.
MOE_VARIANTS: dict[str, type[nn.Module]] = {"llama": MixtralForCausalLM}


def model_class(architecture: str, moe: bool = False) -> type[nn.Module]:
    """The class implementing an architecture (its mixture-of-experts variant if `moe`), or an error naming the
    supported ones."""
    if architecture not in MODEL_REGISTRY:
        raise UnsupportedArchitectureError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(MODEL_REGISTRY)}"
        )
    return MOE_VARIANTS[architecture] if moe and architecture in MOE_VARIANTS else MODEL_REGISTRY[architecture]
