from __future__ import annotations

import torch
from torch import nn

from graphwise.layers.attention.backend import ForwardContext


class Attention(nn.Module):
    """Paged attention for one layer; its KV cache and the kernels come from the context.

    What differs from layer to layer lives here and is passed to the backend on every call:
    the softmax scale (default head_dim ** -0.5; Gemma's query_pre_attn_scalar), the sliding
    window (None: the layer sees its whole context) and the tanh soft-cap of the scores.
    `k_scale` / `v_scale` are the per-tensor scales of an FP8 KV cache (1.0 unless the
    checkpoint names them, see `set_kv_scale`); a cache in the model's dtype ignores them."""

    def __init__(
        self,
        layer_idx: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float | None = None,
        sliding_window: int | None = None,
        softcap: float | None = None,
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5 if scale is None else scale
        self.sliding_window = sliding_window or None
        self.softcap = softcap or None
        self.k_scale = 1.0
        self.v_scale = 1.0

    def set_kv_scale(self, which: str, value: float) -> None:
        """A checkpoint's FP8 KV-cache scale ("k" or "v"): positive and finite."""
        if which not in ("k", "v"):
            raise ValueError(f"KV-cache scale must be for 'k' or 'v', got {which!r}")
        if not (value > 0.0 and value != float("inf")):
            raise ValueError(
                f"layer {self.layer_idx}: {which}_scale must be positive and finite, got {value}"
            )
        setattr(self, f"{which}_scale", float(value))

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        k_cache, v_cache = ctx.kv_caches[self.layer_idx]
        return ctx.backend.forward(
            q,
            k,
            v,
            k_cache,
            v_cache,
            ctx.meta,
            self.scale,
            sliding_window=self.sliding_window,
            softcap=self.softcap,
            k_scale=self.k_scale,
            v_scale=self.v_scale,
        )

    def extra_repr(self) -> str:
        return (
            f"layer={self.layer_idx}, heads={self.num_heads}/{self.num_kv_heads}, "
            f"head_dim={self.head_dim}, window={self.sliding_window}, softcap={self.softcap}, "
            f"kv_scales=({self.k_scale}, {self.v_scale})"
        )
