"""The gated MLP of Llama-style decoders (also a MoE layer's shared expert): SwiGLU, or GeGLU
for Gemma."""

from __future__ import annotations

import torch
from torch import nn

from graphwise.distributed import parallel_state
from graphwise.layers.activation import gated_activation
from graphwise.layers.linear import PackedLinear, RowParallelLinear


class MLP(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        reduce_output: bool = True,
        hidden_act: str = "silu",
    ) -> None:
        super().__init__()
        tp = parallel_state.current()
        part = (tp.tp_rank, tp.tp_size)
        self.gate_up_proj = PackedLinear(
            hidden_size,
            {"gate": intermediate_size, "up": intermediate_size},
            shard_parts={"gate": part, "up": part},
        )
        self.down_proj = RowParallelLinear(
            intermediate_size, hidden_size, reduce_output=reduce_output
        )
        self.act = gated_activation(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))
