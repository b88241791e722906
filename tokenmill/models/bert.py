"""BERT encoder (all-MiniLM and kin): bidirectional attention over a padded batch, post-norm layers."""

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.errors import ModelLoadError, UnsupportedArchitectureError
from tokenmill.loader.json_file import read_json_object
from tokenmill.layers.packed_linear import can_pack, pack_linears

_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


@dataclass(frozen=True)
class BertConfig:
    """The config.json fields a BERT encoder needs."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str

    @classmethod
    def from_dir(cls, path: Path) -> "BertConfig":
        """Read config.json; raises on a model that is not a BERT encoder with absolute positions."""
        c = read_json_object(path / "config.json")
        if c.get("model_type") != "bert" or c.get("position_embedding_type", "absolute") != "absolute":
            raise UnsupportedArchitectureError(
                f"{path} is model_type {c.get('model_type')!r} with {c.get('position_embedding_type')!r} positions; "
                "the embedding models supported are BERT encoders with absolute positions")
        if c.get("hidden_act", "gelu") not in _ACTIVATIONS:
            raise UnsupportedArchitectureError(f"{path}: activation {c['hidden_act']!r} is not one of "
                                               f"{sorted(_ACTIVATIONS)}")
        return cls(
            vocab_size=int(c["vocab_size"]),
            hidden_size=int(c["hidden_size"]),
            num_layers=int(c["num_hidden_layers"]),
            num_heads=int(c["num_attention_heads"]),
            intermediate_size=int(c["intermediate_size"]),
            max_position_embeddings=int(c["max_position_embeddings"]),
            type_vocab_size=int(c.get("type_vocab_size", 2)),
            layer_norm_eps=float(c.get("layer_norm_eps", 1e-12)),
            hidden_act=c.get("hidden_act", "gelu"),
        )


class BertEmbeddings(nn.Module):
    """Token + absolute position + token type (always type 0 here: one segment per input), then LayerNorm."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [batch, seq]; the same positions for every row, since rows are right-padded.
        seq = input_ids.shape[1]
        x = self.word_embeddings(input_ids) + self.position_embeddings.weight[:seq]
        return self.LayerNorm(x + self.token_type_embeddings.weight[0])


class BertLayer(nn.Module):
    """Self-attention with a fused QKV projection, then the MLP; each adds its input back and normalizes after.

    The residual stream and the norms stay float32 whatever the linear layers' dtype: with only the linears
    and attention in bfloat16, embeddings keep cosine >= 0.99997 to float32 ones (all-MiniLM-L6-v2), where
    a model wholly in bfloat16 drops to 0.99991 (docs/benchmarks.md).
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads, self.head_dim = config.num_heads, hidden // config.num_heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.up = nn.Linear(hidden, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, hidden)
        self.mlp_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.act = _ACTIVATIONS[config.hidden_act]
        self.dtype = torch.float32  # the linear layers' (BertModel.set_linear_dtype)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # x: [batch, seq, hidden] float32; mask: [batch, 1, 1, seq], True where a key is a real token.
        batch, seq, hidden = x.shape
        dtype = self.dtype
        # qkv: [3, batch, heads, seq, head_dim]
        qkv = self.qkv(x.to(dtype)).view(batch, seq, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask)
        x = self.attn_norm(x + self.attn_out(o.transpose(1, 2).reshape(batch, seq, hidden)).float())
        return self.mlp_norm(x + self.down(self.act(self.up(x.to(dtype)))).float())


class BertModel(nn.Module):
    """The encoder: token ids and a padding mask in, one float32 hidden state per token out (no pooler head)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_layers))

    def set_linear_dtype(self, dtype: torch.dtype) -> None:
        """Run the linear layers and attention in dtype (packed for oneDNN where it can); the rest stays float32."""
        for layer in self.layers:
            layer.dtype = dtype
            for module in layer.modules():
                if isinstance(module, nn.Linear):
                    module.to(dtype)
        if can_pack(torch.device("cpu"), dtype):
            pack_linears(self.layers)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask: [batch, seq] (mask True on real tokens) → hidden states [batch, seq, hidden]."""
        mask = attention_mask[:, None, None, :]
        x = self.embeddings(input_ids)
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def load_hf_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load a Hugging Face BertModel checkpoint (with or without the `bert.` prefix), fusing Q, K and V."""
        tensors = {name.removeprefix("bert."): t for name, t in tensors.items()}
        state = {n: t for n, t in tensors.items() if n.startswith("embeddings.") and "position_ids" not in n}
        renames = {"attention.output.dense": "attn_out", "attention.output.LayerNorm": "attn_norm",
                   "intermediate.dense": "up", "output.dense": "down", "output.LayerNorm": "mlp_norm"}
        try:
            for i in range(self.config.num_layers):
                hf, ours = f"encoder.layer.{i}.", f"layers.{i}."
                for kind in ("weight", "bias"):
                    state[f"{ours}qkv.{kind}"] = torch.cat(
                        [tensors[f"{hf}attention.self.{p}.{kind}"] for p in ("query", "key", "value")])
                    for theirs, mine in renames.items():
                        state[f"{ours}{mine}.{kind}"] = tensors[f"{hf}{theirs}.{kind}"]
        except KeyError as exc:
            raise ModelLoadError(f"BERT checkpoint lacks {exc.args[0]} (config.json has {self.config.num_layers} "
                                 "layers)") from None
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ModelLoadError(f"BERT checkpoint does not match config.json: missing {missing}, "
                                 f"unexpected {unexpected}")
