"""RMSNorm with HF numerics: Llama's (statistics in fp32, scale applied in the model dtype) or
Gemma's (scale by 1 + weight, in fp32)."""

from __future__ import annotations

import torch
from torch import nn

from graphwise.layers import ops


class RMSNorm(nn.Module):
    gemma = False  # GemmaRMSNorm: weight stored as an offset from 1

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without residual: norm(x). With residual: (norm(x + residual), x + residual)."""
        if residual is None:
            return ops.rmsnorm(x, self.weight, self.eps, self.gemma)
        return ops.add_rmsnorm(x, residual, self.weight, self.eps, self.gemma)


class GemmaRMSNorm(RMSNorm):
    """Gemma 2 / 3: x * (1 + weight), the multiply in fp32 (HF's Gemma2RMSNorm); a checkpoint's
    zero weight is the identity scale."""

    gemma = True
