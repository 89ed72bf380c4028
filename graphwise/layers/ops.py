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


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool = False) -> torch.Tensor:
    """Llama's RMSNorm (round, then scale by weight) or, with `gemma`, Gemma's (scale by
    1 + weight in fp32, round once)."""
    if triton_enabled() and x.is_cuda and x.dim() == 2:
        from graphwise.kernels.rmsnorm import rmsnorm as triton_rmsnorm

        return triton_rmsnorm(x, weight, eps, gemma=gemma)
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        return (h * (1.0 + weight.float())).to(x.dtype)
    return weight * h.to(x.dtype)


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + residual), x + residual)."""
    if triton_enabled() and x.is_cuda:
        from graphwise.kernels.rmsnorm import fused_add_rmsnorm

        # in place: x <- norm, residual <- sum
        fused_add_rmsnorm(x, residual, weight, eps, gemma=gemma)
        return x, residual
    residual = residual + x
    return rmsnorm(residual, weight, eps, gemma), residual


def head_rmsnorm_(
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    eps: float,
    gemma: bool = False,
) -> None:
    """RMSNorm over head_dim of each q and each k head of a packed [T, (Hq + 2 Hkv) * D]
    projection, in place (Qwen3 and Gemma 3 normalise q and k before RoPE)."""
    if triton_enabled() and qkv.is_cuda:
        from graphwise.kernels.rmsnorm import head_rmsnorm_ as triton_head_rmsnorm_

        triton_head_rmsnorm_(
            qkv, q_weight, k_weight, num_heads, num_kv_heads, head_dim, eps, gemma=gemma
        )
        return
    T = qkv.shape[0]
    q_size, k_size = num_heads * head_dim, num_kv_heads * head_dim
    q = qkv[:, :q_size].view(T, num_heads, head_dim)
    k = qkv[:, q_size : q_size + k_size].view(T, num_kv_heads, head_dim)
    q.copy_(rmsnorm(q, q_weight, eps, gemma))
    k.copy_(rmsnorm(k, k_weight, eps, gemma))


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if _use_triton.get() and x.is_cuda:
        from graphwise.kernels.activation import silu_and_mul as triton_silu_and_mul

        return triton_silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """GeGLU: gelu(gate, approximate="tanh") * up (HF's `gelu_pytorch_tanh`, Gemma)."""
    if triton_enabled() and x.is_cuda:
        from graphwise.kernels.activation import gelu_tanh_and_mul as triton_gelu_tanh_and_mul

        return triton_gelu_tanh_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


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
