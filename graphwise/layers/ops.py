"""Elementwise and row ops used by the layers: Triton kernels on CUDA, PyTorch elsewhere.

The PyTorch versions follow HF transformers' arithmetic step by step (that is what makes CPU
outputs token-identical to HF); the Triton versions are checked against them in tests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch
import torch.nn.functional as F

# Whether ops on CUDA tensors take the Triton kernels: set for the span of a forward by whoever
# runs the model (the runner, with its attention backend's choice), never left switched on.
_use_triton: ContextVar[bool] = ContextVar("graphwise_triton_ops", default=False)


@contextlib.contextmanager
def triton_ops(enabled: bool) -> Iterator[None]:
    token = _use_triton.set(enabled)
    try:
        yield
    finally:
        _use_triton.reset(token)


def triton_enabled() -> bool:
    return _use_triton.get()


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _use_triton.get() and x.is_cuda:
        from graphwise.kernels.rmsnorm import rmsnorm as triton_rmsnorm

        return triton_rmsnorm(x, weight, eps)
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + residual), x + residual)."""
    if _use_triton.get() and x.is_cuda:
        from graphwise.kernels.rmsnorm import fused_add_rmsnorm

        fused_add_rmsnorm(x, residual, weight, eps)  # in place: x <- norm, residual <- sum
        return x, residual
    residual = residual + x
    return rmsnorm(residual, weight, eps), residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if _use_triton.get() and x.is_cuda:
        from graphwise.kernels.activation import silu_and_mul as triton_silu_and_mul

        return triton_silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_qkv(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotate q and k of a packed [T, (Hq + 2 Hkv) * D] projection; returns q, k, v as
    [T, heads, D] (views into qkv on the Triton path, which rotates in place)."""
    T = qkv.shape[0]
    sizes = (num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim)
    if _use_triton.get() and qkv.is_cuda:
        from graphwise.kernels.rope import rope_qkv_

        rope_qkv_(qkv, positions, cos_sin_cache, num_heads, num_kv_heads, head_dim)
        q, k, v = qkv.split(sizes, dim=-1)
        return (
            q.view(T, num_heads, head_dim),
            k.view(T, num_kv_heads, head_dim),
            v.view(T, num_kv_heads, head_dim),
        )
    q, k, v = qkv.split(sizes, dim=-1)
    q = q.view(T, num_heads, head_dim)
    k = k.view(T, num_kv_heads, head_dim)
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)
    cos = torch.cat([cos, cos], dim=-1).unsqueeze(1).to(qkv.dtype)
    sin = torch.cat([sin, sin], dim=-1).unsqueeze(1).to(qkv.dtype)
    return _rotate(q, cos, sin), _rotate(k, cos, sin), v.view(T, num_kv_heads, head_dim)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's rotate_half arithmetic: x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
