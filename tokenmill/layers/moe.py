"""Sparse mixture-of-experts feed-forward: a softmax router picks each token's top-k experts, and each routed
expert runs once, on the tokens routed to it."""

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.layers.activation import silu_and_mul


class Expert(nn.Module):
    """One SwiGLU expert with a fused gate/up projection, as Llama's MLP but of its own width."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class Gate(nn.Module):
    """A small float projection (the router, the shared expert's gate) that the int8/int4 rewrite leaves alone.

    It is not an nn.Linear on purpose: its weights are a sliver of the model, and rounding them moves tokens
    to other experts, which changes the output far more than rounding an expert does.
    """

    def __init__(self, hidden_size: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def route(router_logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's top_k experts [tokens, top_k] and their float32 weights, as transformers routes.

    Softmax over all experts in float32, top-k of the probabilities (torch.topk, so ties break as in
    transformers, which calls the same op on the same values), then, if `normalize`, the k weights
    rescaled to sum to 1.
    """
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


class SparseMoE(nn.Module):
    """Routed experts (plus, for Qwen2-MoE, a shared expert every token goes through, scaled by a sigmoid gate).

    Names follow the Hugging Face checkpoints: gate (the router), experts.<i>, shared_expert, shared_expert_gate.
    """

    def __init__(
        self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, normalize: bool,
        shared_intermediate_size: int = 0,
    ) -> None:
        super().__init__()
        self.top_k, self.normalize = top_k, normalize
        self.gate = Gate(hidden_size, num_experts)
        self.experts = nn.ModuleList(Expert(hidden_size, intermediate_size) for _ in range(num_experts))
        self.shared_expert = Expert(hidden_size, shared_intermediate_size) if shared_intermediate_size else None
        self.shared_expert_gate = Gate(hidden_size, 1) if shared_intermediate_size else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [tokens, hidden]
        weights, experts = route(self.gate(x), self.top_k, self.normalize)
        out = self._routed(x, weights, experts)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out

    def _routed(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Sum over each token's experts of weight * expert(token), reading only the routed experts' weights."""
        # The batch's (token, slot) pairs sorted by expert: each expert's tokens are then one contiguous run,
        # in token order, gathered once and scattered back once. The stable sort keeps every token's experts
        # in ascending order, the order in which transformers adds them up.
        pairs = experts.flatten()  # [tokens * top_k]
        order = torch.argsort(pairs, stable=True)
        counts = torch.bincount(pairs, minlength=len(self.experts)).tolist()  # one host sync per layer
        token_ids = order // self.top_k
        grouped = x.index_select(0, token_ids)  # [tokens * top_k, hidden]
        # NOTE: an expert no token chose is skipped, not run on zero rows: its weights are never read.
        outputs = [expert(rows) for expert, rows in zip(self.experts, grouped.split(counts)) if len(rows)]
        # Qwen casts the weights to the model's dtype before scaling; Mixtral scales in float32 (same in float32).
        scaled = torch.cat(outputs) * weights.flatten()[order, None].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token_ids, scaled)
