"""The operand plumbing every packed-weight matmul shares (GGUF, INT4): x as 2-D rows with a
contiguous last axis, and the output allocated (or the caller's) with x's leading shape."""

from __future__ import annotations

import torch


def as_rows(
    x: torch.Tensor, in_features: int, out_features: int, out: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x2 [M, in], y2 [M, out] viewing `out`, out [..., out]); a clear error if x's last
    axis is not in_features."""
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {in_features}")
    x2 = x.reshape(-1, in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if out is None:
        out = torch.empty(*x.shape[:-1], out_features, device=x.device, dtype=x.dtype)
    return x2, out.view(-1, out_features), out
