"""Mixture-of-experts MLP: top-k routed experts plus, optionally, a gated shared expert
(Qwen2-MoE has one; Qwen3-MoE and Mixtral have none).

Expert weights are stored stacked — gate/up as [E, 2I, H] and down as [E, H, I] — so a fused
grouped-GEMM kernel can take them as they are. The PyTorch path here loops over the experts that
received tokens, in the same order and arithmetic as HF transformers.

Tensor parallelism splits the experts (expert parallelism inside the TP group): rank r holds a
contiguous run of whole experts, serves the tokens routed to them, and the shared expert is split
like a dense MLP; one all-reduce sums the routed and shared partial outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from graphwise.distributed import parallel_state
from graphwise.layers import ops, quantization
from graphwise.layers.linear import Linear
from graphwise.layers.mlp import MLP


class SparseMoE(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        intermediate_size: int,
        norm_topk_prob: bool,
        shared_intermediate_size: int = 0,
        fp32_routing_weights: bool = False,
    ) -> None:
        super().__init__()
        tp = parallel_state.current()
        quant = quantization.current()
        if quant is not None:
            quant.check_moe("the routed experts of a MoE layer")
        self.tp_size = tp.tp_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        # Mixtral's router hands its fp32 top-k weights to the experts as they are; Qwen's
        # round them to the model dtype first.
        self.fp32_routing_weights = fp32_routing_weights
        self.intermediate_size = intermediate_size
        # Experts [expert_start, expert_start + num_local_experts) live here (all at TP=1).
        self.expert_start = tp.tp_rank * num_experts // tp.tp_size
        self.num_local_experts = (tp.tp_rank + 1) * num_experts // tp.tp_size - self.expert_start
        self.gate = Linear(hidden_size, num_experts)
        self.w_gate_up = nn.Parameter(
            torch.empty(self.num_local_experts, 2 * intermediate_size, hidden_size),
            requires_grad=False,
        )
        self.w_down = nn.Parameter(
            torch.empty(self.num_local_experts, hidden_size, intermediate_size),
            requires_grad=False,
        )
        self.shared_expert: nn.Module | None = None
        self.shared_expert_gate: Linear | None = None
        if shared_intermediate_size:
            self.shared_expert = MLP(
                hidden_size, shared_intermediate_size, reduce_output=tp.tp_size == 1
            )
            self.shared_expert_gate = Linear(hidden_size, 1)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k] in x's dtype (fp32 for Mixtral), expert ids [T, k])."""
        router_logits = self.gate(x)
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.fp32_routing_weights:
            return weights, experts
        return weights.to(x.dtype), experts

    def experts_forward(
        self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor
    ) -> torch.Tensor:
        if ops.triton_enabled() and x.is_cuda and self.num_local_experts > 0:
            from graphwise.kernels.fused_moe import fused_moe

            if self.tp_size > 1:
                # Another rank's experts get weight 0 here (their id clamped into range).
                local = experts - self.expert_start
                mine = (local >= 0) & (local < self.num_local_experts)
                weights = weights * mine
                experts = local.clamp(0, max(0, self.num_local_experts - 1))
            return fused_moe(x, self.w_gate_up, self.w_down, weights, experts)
        out = torch.zeros_like(x)
        # [E, k, T]: which (token, slot) pairs each expert serves.
        mask = F.one_hot(experts, num_classes=self.num_experts).permute(2, 1, 0)
        for i in range(self.num_local_experts):
            slot, token = torch.where(mask[self.expert_start + i])
            if token.numel() == 0:
                continue
            h = ops.silu_and_mul(F.linear(x[token], self.w_gate_up[i]))
            h = F.linear(h, self.w_down[i]) * weights[token, slot, None]
            out.index_add_(0, token, h.to(x.dtype))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = self.route(x)
        out = self.experts_forward(x, weights, experts)
        if self.shared_expert is not None:
            assert self.shared_expert_gate is not None
            shared = self.shared_expert(x)
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * shared
        if self.tp_size > 1:  # routed experts and shared-expert shards: one sum
            out = parallel_state.tensor_model_parallel_all_reduce(out)
        return out
