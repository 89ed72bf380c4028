from __future__ import annotations

import torch
from torch import nn

from graphwise.layers.attention.backend import ForwardContext


class Attention(nn.Module):
    """Paged attention for one layer; its KV cache and the kernels come from the context."""

    def __init__(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        k_cache, v_cache = ctx.kv_caches[self.layer_idx]
        return ctx.backend.forward(q, k, v, k_cache, v_cache, ctx.meta, self.scale)
