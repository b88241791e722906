"""Llama-family decoder (Llama, SmolLM2, Mistral, Qwen2, Qwen3) over a flat batch of tokens."""

from collections.abc import Callable, Iterable
from functools import partial
from itertools import islice

import torch
from torch import nn

from tokenmill.config import ModelConfig
from tokenmill.errors import ModelLoadError
from tokenmill.layers.activation import silu_and_mul
from tokenmill.layers.attention import Attention
from tokenmill.layers.base import Layer
from tokenmill.layers.norm import RMSNorm
from tokenmill.layers.rotary import RotaryEmbedding, apply_rotary_
from tokenmill.models.llama_stack import FusedLlamaLayers
from tokenmill.quant.levels import LevelRows


class LlamaAttention(Layer):
    """Grouped-query self-attention with a fused QKV projection; qk_norm adds Qwen3's per-head norms."""

    def __init__(self, config: ModelConfig, layer: int, qk_norm: bool = False) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.attention_out_bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, config.layer_window(layer),
                              config.attention_scale)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        # Query and key heads lie side by side in each row: one in-place rotation covers both.
        qk = qkv[:, : self.q_size + self.kv_size].view(-1, self.num_heads + self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            # Normalized heads go back into the QKV rows, so the one rotation still covers them.
            self.q_norm.normalize_(qk[:, : self.num_heads])
            self.k_norm.normalize_(qk[:, self.num_heads :])
        apply_rotary_(qk, cos, sin)
        q, k, v = qkv.split_with_sizes([self.q_size, self.kv_size, self.kv_size], dim=-1)  # no Python wrapper
        kv_shape = (-1, self.num_kv_heads, self.head_dim)
        o = self.attn(q.view(-1, self.num_heads, self.head_dim), k.view(kv_shape), v.view(kv_shape))
        return self.o_proj(o.view(-1, self.q_size))


class LlamaMLP(Layer):
    """Gated feed-forward with a fused gate/up projection: SwiGLU, or another gate such as Gemma's GeGLU."""

    def __init__(
        self, config: ModelConfig, gate_and_mul: Callable[[torch.Tensor], torch.Tensor] = silu_and_mul
    ) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.gate_and_mul = gate_and_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(Layer):
    """Pre-norm attention and MLP blocks with the residual carried between them."""

    def __init__(self, config: ModelConfig, layer: int, qk_norm: bool = False, mlp: nn.Module | None = None) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer, qk_norm)
        self.mlp = mlp if mlp is not None else LlamaMLP(config)  # a mixture of experts in MoE families
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, cos, sin)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(Layer):
    """Token ids and positions of a flat batch in, hidden states out; logits for chosen rows."""

    # Checkpoint projection name -> (fused parameter, shard index).
    stacked_params = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    fused_shards = {"qkv_proj": 3, "gate_up_proj": 2}
    # Whether each query and key head is RMS-normalized before rotary (Qwen3).
    qk_norm = False
    # Whether its activations stay inside float16's range, so that --dtype float16 runs it.
    fits_float16 = True

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # Built on the meta device (ModelRunner) and filled by load_weights: initial values are never
        # read, and a random init on meta runs torch's Python reference ops, which import torch._dynamo
        # (73 MiB of peak RSS, 0.7 s). _weight skips the init; the rotary frequencies come with the weights.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(self._decoder_layer(i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary: RotaryEmbedding | None = None
        # Set by load_weights where every layer runs in the C++ ops (int8/int4 on CPU).
        self.fused_layers: FusedLlamaLayers | None = None

    def _decoder_layer(self, layer: int) -> nn.Module:
        """Decoder layer `layer`; MoE families override it to give some layers a mixture of experts."""
        return LlamaDecoderLayer(self.config, layer, self.qk_norm)

    def _rotary(self, freq_factors: torch.Tensor | None = None) -> RotaryEmbedding:
        c = self.config
        return RotaryEmbedding(c.head_dim, c.rope_theta, c.rope_scaling, freq_factors)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, num_layers: int | None = None) -> torch.Tensor:
        # input_ids, positions: [tokens]; returns hidden states [tokens, hidden] after the first num_layers
        # layers (all by default; fewer to draft by early exit) and the final norm
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        if self.fused_layers is not None and x.is_cpu and x.dtype == torch.float32 and num_layers != 0:
            x, residual = self.fused_layers(x, cos, sin, num_layers)
        else:
            residual = None
            for layer in islice(self.layers, num_layers):  # slicing a ModuleList builds a new one: 85 us
                x, residual = layer(x, residual, cos, sin)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [rows, vocab] for the hidden states of the rows that need sampling."""
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, slice, torch.Tensor | LevelRows]]) -> None:
        """Fill a model whose storage is allocated but unset (see to_empty): weights, ties and rotary frequencies.

        Checkpoint tensors (Hugging Face names, whole or in pieces of rows) go into parameters, or into
        quantized layers' load_rows, with Q/K/V and gate/up fused.
        """
        if self.config.tie_word_embeddings and isinstance(self.lm_head, nn.Linear):
            self.lm_head.weight = self.embed_tokens.weight  # to_empty() allocates tied parameters apart
        targets = self._load_targets()
        loaded: set[str] = set()
        # Tensors streamed in row pieces (GGUF): load key -> (checkpoint name, rows filled, rows expected). A tensor
        # short of rows would leave the rest of its parameter uninitialized, which no piece's own check sees.
        streamed: dict[str, tuple[str, int, int]] = {}
        freq_factors = None
        for checkpoint_name, rows, tensor in weights:
            name = checkpoint_name.removeprefix("model.")
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                # The shared matrix, which some savers (safetensors' save_model) store under this name alone; the
                # embedding's own tensor wins wherever the file has it too, before or after.
                if "embed_tokens.weight" in loaded:
                    continue
                name = "embed_tokens.weight"
            if name == "rope_freqs":  # GGUF stores Llama 3.1 rope scaling as per-frequency factors
                freq_factors = tensor.float()
                continue
            parts = name.split(".")
            target, shard = name, None
            if len(parts) >= 2 and parts[-2] in self.stacked_params:
                fused, shard = self.stacked_params[parts[-2]]
                target = ".".join(parts[:-2] + [fused, parts[-1]])
            if target not in targets:
                if name.endswith("rotary_emb.inv_freq"):  # older checkpoints saved this derived table
                    continue
                # A tensor this model has no place for means the checkpoint is another architecture
                # (or a variant of it); loading around it would run with part of the model left out.
                raise ModelLoadError(
                    f"checkpoint tensor {checkpoint_name} has no parameter in a {self.config.architecture} model; "
                    "is the checkpoint's architecture name right?"
                )
            if shard is None:
                targets[target](rows, tensor, checkpoint_name)
                key = target
            else:
                shard_rows = self._shard_rows(target, fused, shard)
                targets[target](_within(shard_rows, rows, checkpoint_name), tensor, checkpoint_name)
                key = f"{target}#{shard}"
            loaded.add(key)
            if rows.stop is not None:
                expected = self._target_rows(target) if shard is None else shard_rows.stop - shard_rows.start
                streamed[key] = (checkpoint_name, rows.stop, expected)
        # The frequencies are derived, not stored: on the weights' device, after any rope_freqs.
        self.rotary = self._rotary(freq_factors).to(self.norm.weight.device)
        self.fused_layers = FusedLlamaLayers.of(self.layers)
        for name, filled, rows in streamed.values():
            if filled != rows:
                raise ModelLoadError(f"checkpoint tensor {name} has {filled} rows, expected {rows}")
        missing = sorted(name for key, name in self._expected_tensors(targets).items() if key not in loaded)
        if missing:
            raise ModelLoadError(
                f"checkpoint lacks {len(missing)} tensors a {self.config.architecture} model needs, "
                f"e.g. {', '.join(missing[:3])}"
            )

    def _expected_tensors(self, targets: Iterable[str]) -> dict[str, str]:
        """Each load target (a fused parameter once per shard, as `name#shard`) -> its checkpoint tensor name."""
        unfused = {fused_shard: proj for proj, fused_shard in self.stacked_params.items()}
        expected = {}
        for n in targets:
            parts = n.split(".")
            for shard in range(self.fused_shards.get(parts[-2], 0)):
                expected[f"{n}#{shard}"] = "model." + ".".join(parts[:-2] + [unfused[parts[-2], shard], parts[-1]])
            if parts[-2] not in self.fused_shards:
                expected[n] = n if n.startswith("lm_head.") else f"model.{n}"
        return expected

    def _load_targets(self) -> dict[str, Callable[[slice, torch.Tensor, str], None]]:
        # Quantized layers hold no float weight: they take rows through load_rows.
        targets = {name: partial(_copy_rows, param) for name, param in self.named_parameters()}
        targets |= {f"{n}.weight": m.load_rows for n, m in self.named_modules() if hasattr(m, "load_rows")}
        if self.config.tie_word_embeddings:
            targets.pop("lm_head.weight", None)  # filled through the embedding it shares
        return targets

    def _target_rows(self, target: str) -> int:
        """Rows of a load target: a parameter's first dimension, or a quantized layer's outputs."""
        module_name, _, attr = target.rpartition(".")
        module = self.get_submodule(module_name)
        param = getattr(module, attr, None)
        return param.shape[0] if isinstance(param, torch.Tensor) else module.out_features

    def _shard_rows(self, target: str, fused: str, shard: int) -> slice:
        c = self.config
        if fused == "qkv_proj":
            q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
            return [slice(0, q), slice(q, q + kv), slice(q + kv, q + 2 * kv)][shard]
        # Equal shards of the layer's own rows: MoE experts and shared experts have widths of their own.
        size = self.get_submodule(target.rpartition(".")[0]).out_features // self.fused_shards[fused]
        return slice(shard * size, (shard + 1) * size)


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3: Llama's decoder with RMSNorm over each query and key head before rotary."""

    qk_norm = True


def _within(shard: slice, rows: slice, name: str) -> slice:
    """Rows [rows] of checkpoint tensor `name`, which fills rows [shard] of a fused parameter."""
    if rows.stop is None:
        return slice(shard.start + (rows.start or 0), shard.stop)
    if shard.start + rows.stop > shard.stop:  # else a piece would spill into the next shard unchecked
        raise ModelLoadError(f"checkpoint tensor {name} has more than the {shard.stop - shard.start} rows expected")
    return slice(shard.start + (rows.start or 0), shard.start + rows.stop)


def _copy_rows(param: nn.Parameter, rows: slice, src: torch.Tensor | LevelRows, name: str) -> None:
    if isinstance(src, LevelRows):  # a quantized checkpoint's table kept in float (an untied embedding)
        src = src.dequantize()
    dst = param.data[rows]
    if dst.shape != src.shape:
        raise ModelLoadError(f"checkpoint tensor {name} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    dst.copy_(src)
