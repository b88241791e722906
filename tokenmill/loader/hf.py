"""Read a Hugging Face model directory: config.json and *.safetensors."""

import json
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from tokenmill.config import GEMMA3_SLIDING_PATTERN, ModelConfig, gemma3_layer_types
from tokenmill.errors import ModelLoadError
from tokenmill.loader.json_file import read_json_object

# transformers' Qwen2Config default: the layers below this attend over every key even with use_sliding_window.
_QWEN_MAX_WINDOW_LAYERS = 28
# transformers' defaults where config.json leaves them out: (rope_theta, rms_norm_eps), by architecture prefix.
_DEFAULTS = {"Gemma3": (1_000_000.0, 1e-6), "Mixtral": (1_000_000.0, 1e-5)}
# Gemma 3's sliding layers' rotary base where config.json leaves it out (Gemma3TextConfig's default_theta).
_GEMMA3_LOCAL_THETA = 10_000.0
# The MLP activation each family's code computes; a config asking for another would run a different model.
_ACTIVATIONS = {"Gemma3": "gelu_pytorch_tanh"}
# transformers' defaults where config.json leaves them out: max_position_embeddings (2048 for the others) and
# sliding_window (none for the others), by architecture prefix.
_CONTEXTS = {"Mistral": 131_072, "Mixtral": 131_072, "Gemma3": 131_072, "Qwen": 32_768}
_WINDOWS = {"Mistral": 4096, "Gemma3": 4096, "Qwen": 4096}  # Qwen's only where use_sliding_window is on
# transformers' head_dim where config.json leaves it out (hidden_size / num_attention_heads for the others;
# Qwen3-MoE's too, listed so the Qwen3 prefix does not catch it).
_HEAD_DIMS = {"Qwen3Moe": None, "Qwen3": 128, "Gemma3": 256}
# transformers' mixture-of-experts defaults where config.json leaves them out: (experts, experts per token, each
# expert's width, the shared expert's width). A left-out top-k read as 0 routed to no expert at all.
_EXPERTS = {"Mixtral": (8, 2, 0, 0), "Qwen2Moe": (60, 4, 1408, 5632), "Qwen3Moe": (128, 8, 768, 0)}
# The class each config.json model_type stands for, where `architectures` is left out (AutoModelForCausalLM's
# mapping); the family defaults above go by the class name.
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM",
                "qwen2": "Qwen2ForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3": "Qwen3ForCausalLM",
                "qwen3_moe": "Qwen3MoeForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
# Gemma3TextConfig's query_pre_attn_scalar where config.json leaves it out.
_GEMMA3_QUERY_SCALAR = 256
# generation_config.json's sampling settings, used where a request leaves them unset (as vLLM's default
# --generation-config auto does), each with transformers' GenerationConfig default, which vLLM leaves out as unset.
_SAMPLING_FIELDS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "min_p": None, "repetition_penalty": 1.0}
# The rope scaling layers/rotary.py computes; any other would change every rotation.
_SCALINGS = ("default", "linear", "llama3")


class HFDirectory:
    """A directory holding config.json, *.safetensors and tokenizer.json."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.raw_config = read_json_object(self.path / "config.json")
        self.files = self._weight_files()
        if not self.files:
            pickled = sorted(p.name for p in self.path.glob("*.bin")) + sorted(p.name for p in self.path.glob("*.pt"))
            found = f" (it has {', '.join(pickled[:3])}: PyTorch pickles, which can run code when loaded; save them " \
                "as safetensors with transformers' save_pretrained(..., safe_serialization=True))" if pickled else ""
            raise ModelLoadError(f"{self.path} has no *.safetensors files{found}")
        model_type = str(self.raw_config.get("model_type", ""))
        archs = self.raw_config.get("architectures") or [_MODEL_TYPES.get(model_type, model_type)]
        self.architecture = str(archs[0])

    def _weight_files(self) -> list[Path]:
        """The checkpoint's files as transformers picks them: the index's shards, else model.safetensors, else any.

        Not every *.safetensors beside them: Mistral's repos also ship their own format's consolidated.safetensors.
        """
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as exc:
                raise ModelLoadError(f"cannot read {index}: {exc}") from exc
            missing = [name for name in shards if not (self.path / name).is_file()]
            if missing:
                raise ModelLoadError(f"{index} names shards that are not there: {', '.join(missing)}")
            return [self.path / name for name in shards]
        single = self.path / "model.safetensors"
        return [single] if single.is_file() else sorted(self.path.glob("*.safetensors"))

    def native_quantization(self) -> str:
        """none: safetensors checkpoints here hold float weights, which int8/int4 would round."""
        return "none"

    def model_config(self) -> ModelConfig:
        """Build the ModelConfig from config.json (and generation_config.json for stop tokens)."""
        c = self.raw_config
        family = next((f for f in _DEFAULTS if self.architecture.startswith(f)), None)
        theta, eps = _DEFAULTS.get(family, (10_000.0, 1e-6))
        activation = _by_family(_ACTIVATIONS, self.architecture, "silu")
        experts, top_k, expert_width, shared_width = _by_family(_EXPERTS, self.architecture, (0, 0, 0, 0))
        asked = c.get("hidden_activation") or c.get("hidden_act") or activation
        if asked != activation:
            raise ModelLoadError(f"{self.path / 'config.json'} asks for activation {asked!r}; {self.architecture} "
                                 f"runs {activation!r} here")
        if isinstance(c.get("quantization_config"), dict):  # else its scales read as unknown tensors, mid-load
            method = c["quantization_config"].get("quant_method", "unnamed")
            raise ModelLoadError(f"{self.path / 'config.json'} describes a checkpoint quantized with {method!r}; "
                                 "only float (float32, bfloat16, float16) safetensors load here: use the float "
                                 "checkpoint, which --quantization can quantize, or a GGUF file")
        if c.get("final_logit_softcapping"):
            raise ModelLoadError(f"{self.path / 'config.json'} sets final_logit_softcapping; not supported")
        try:
            num_heads = int(c["num_attention_heads"])
            hidden = int(c["hidden_size"])
            rope = c.get("rope_parameters") or {}
            rope = rope.get("full_attention", rope)  # Gemma 3 keeps one set per layer type
            scaling = c.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
            kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
            if kind not in _SCALINGS:  # refused here, not after the whole checkpoint is read
                raise ModelLoadError(f"{self.path / 'config.json'} asks for rope scaling {kind!r}; supported: "
                                     f"{', '.join(_SCALINGS[1:])}")
            local = (c.get("rope_parameters") or {}).get("sliding_attention") or {}
            if local.get("rope_type", "default") != "default":  # Gemma 3's sliding layers rotate unscaled here
                raise ModelLoadError(f"{self.path / 'config.json'} asks for rope scaling {local['rope_type']!r} on "
                                     "the sliding layers; not supported")
            config = ModelConfig(
                architecture=self.architecture,
                vocab_size=int(c["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(c["intermediate_size"]),
                num_layers=int(c["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(c.get("num_key_value_heads") or num_heads),
                head_dim=int(c.get("head_dim") or _by_family(_HEAD_DIMS, self.architecture, None)
                             or hidden // num_heads),
                rms_norm_eps=float(c.get("rms_norm_eps", eps)),
                rope_theta=float(c.get("rope_theta") or rope.get("rope_theta") or theta),
                max_position_embeddings=int(c.get("max_position_embeddings")
                                            or _by_family(_CONTEXTS, self.architecture, 2048)),
                # transformers' own default where config.json leaves it out: Gemma's configs tie, the others do not.
                tie_word_embeddings=bool(c.get("tie_word_embeddings", self.architecture.startswith("Gemma"))),
                rope_scaling=scaling,
                # Qwen2-MoE configs name it qkv_bias.
                attention_bias=bool(c.get("attention_bias", c.get("qkv_bias", self.architecture.startswith("Qwen2")))),
                # Qwen2, Mistral and Mixtral leave the output projection without one whatever the config says.
                attention_out_bias=bool(c.get("attention_bias", False))
                and not self.architecture.startswith(("Qwen2", "Mistral", "Mixtral")),
                mlp_bias=bool(c.get("mlp_bias", False)) and self.architecture.startswith("Llama"),
                # Qwen configs carry a sliding_window that use_sliding_window (off unless said) switches on.
                sliding_window=c.get("sliding_window", _by_family(_WINDOWS, self.architecture, None))
                if c.get("use_sliding_window", not self.architecture.startswith("Qwen")) else None,
                layer_types=_layer_types(c, self.architecture),
                rope_local_theta=_local_theta(c) or (_GEMMA3_LOCAL_THETA if family == "Gemma3" else None),
                attention_scale=_attention_scale(c, family),
                num_experts=int(c.get("num_local_experts") or c.get("num_experts") or experts),
                num_experts_per_tok=int(c.get("num_experts_per_tok") or top_k),
                moe_intermediate_size=int(c.get("moe_intermediate_size") or expert_width),
                shared_expert_intermediate_size=int(c.get("shared_expert_intermediate_size", shared_width) or 0),
                norm_topk_prob=bool(c.get("norm_topk_prob", False)),
                decoder_sparse_step=int(c.get("decoder_sparse_step") or 1),
                mlp_only_layers=[int(i) for i in c.get("mlp_only_layers") or []],
                bos_token_id=c.get("bos_token_id"),
                eos_token_ids=self._eos_token_ids(),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"{self.path / 'config.json'} is missing or has a bad field: {exc}") from exc
        if config.num_experts and not 1 <= config.num_experts_per_tok <= config.num_experts:
            raise ModelLoadError(f"{self.path / 'config.json'} routes each token to {config.num_experts_per_tok} of "
                                 f"{config.num_experts} experts; it must be at least 1 and at most all of them")
        return config

    @cached_property
    def generation_config(self) -> dict[str, Any]:
        """generation_config.json's settings (stop tokens, sampling), or none where the folder has no such file."""
        generation = self.path / "generation_config.json"
        return read_json_object(generation) if generation.is_file() else {}

    def sampling_defaults(self) -> dict[str, float]:
        """generation_config.json's sampling settings, for requests that leave them unset."""
        raw = self.generation_config
        return {name: raw[name] for name, default in _SAMPLING_FIELDS.items()
                if raw.get(name) is not None and raw[name] != default}

    def _eos_token_ids(self) -> list[int]:
        eos = self.generation_config.get("eos_token_id", self.raw_config.get("eos_token_id"))
        if eos is None:
            return []
        return sorted(set(eos)) if isinstance(eos, list) else [int(eos)]

    def weights(
        self, config: ModelConfig, dtype: torch.dtype, levels: bool = False
    ) -> Iterator[tuple[str, slice, torch.Tensor]]:
        """Yield (name, rows, tensor) for every tensor in every safetensors file, each whole (float: no levels)."""
        from safetensors import safe_open  # only a Hugging Face directory needs it (0.8 MiB)

        for file in self.files:
            try:
                with safe_open(file, framework="pt") as f:
                    for name in f.keys():
                        yield name, slice(None), f.get_tensor(name).to(dtype)
            except Exception as exc:  # safetensors raises its own SafetensorError on bad bytes
                raise ModelLoadError(f"cannot read {file}: {exc}") from exc


def _layer_types(config: dict, architecture: str) -> list[str] | None:
    """Each layer's attention, as transformers fills it in where config.json leaves layer_types out."""
    if config.get("layer_types"):
        return config["layer_types"]
    layers = int(config["num_hidden_layers"])
    if architecture.startswith("Gemma3"):
        return gemma3_layer_types(layers, int(config.get("sliding_window_pattern") or GEMMA3_SLIDING_PATTERN))
    if not (architecture.startswith("Qwen") and config.get("use_sliding_window")):
        return None
    if architecture.startswith("Qwen3Moe"):
        return None  # every layer slides
    first = int(config.get("max_window_layers", _QWEN_MAX_WINDOW_LAYERS))
    if architecture.startswith("Qwen2Moe"):
        # The even layers below max_window_layers, as Qwen2MoeConfig fills it in.
        return ["sliding_attention" if i % 2 == 0 and i < first else "full_attention" for i in range(layers)]
    # Only the layers from max_window_layers on slide (28 unless said), as Qwen2Config and Qwen3Config.
    return ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]


def _by_family(table: dict[str, Any], architecture: str, default: Any) -> Any:
    """The table's value for the first architecture prefix that names this architecture's family, else default."""
    return next((value for family, value in table.items() if architecture.startswith(family)), default)


def _attention_scale(config: dict, family: str | None) -> float | None:
    """Gemma's query scale, 1/sqrt(query_pre_attn_scalar); None for the usual 1/sqrt(head_dim)."""
    scalar = config.get("query_pre_attn_scalar") or (_GEMMA3_QUERY_SCALAR if family == "Gemma3" else None)
    return scalar ** -0.5 if scalar else None


def _local_theta(config: dict) -> float | None:
    """Gemma 3's rotary base for sliding-window layers: rope_local_base_freq, or in rope_parameters by layer type."""
    local = (config.get("rope_parameters") or {}).get("sliding_attention") or {}
    theta = config.get("rope_local_base_freq") or local.get("rope_theta")
    return float(theta) if theta else None
