"""Elementwise and row ops used by the layers: Triton kernels on CUDA, PyTorch elsewhere.

The PyTorch versions follow HF transformers' arithmetic step by step (that is what makes CPU
outputs token-identical to HF); the Triton versions are checked against them in tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_use_triton = False


def enable_triton(flag: bool) -> None:
    """Route ops on CUDA tensors to the Triton kernels (set by the model runner)."""
    global _use_triton
    _use_triton = flag


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _use_triton and x.is_cuda:
        from graphwise.kernels.rmsnorm import rmsnorm as triton_rmsnorm

        return triton_rmsnorm(x, weight, eps)
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + residual), x + residual)."""
    if _use_triton and x.is_cuda:
        from graphwise.kernels.rmsnorm import fused_add_rmsnorm

        fused_add_rmsnorm(x, residual, weight, eps)  # in place: x <- norm, residual <- sum
        return x, residual
    residual = residual + x
    return rmsnorm(residual, weight, eps), residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if _use_triton and x.is_cuda:
        from graphwise.kernels.activation import silu_and_mul as triton_silu_and_mul

        return triton_silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
