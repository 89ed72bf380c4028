"""RMSNorm and fused residual-add + RMSNorm (one program per row), and RMSNorm of the q and k
heads of a packed qkv in place (Qwen3, Gemma 3).

Two numerics, both HF's: Llama's (normalise in fp32, round to the model dtype, then multiply by
the weight) and Gemma's (``x * (1 + w)`` with the multiply in fp32, rounded once at the end).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rmsnorm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    stride_x,
    stride_r,
    stride_o,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    GEMMA: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    dtype = x.dtype
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0)
        # The sum is rounded to the model dtype first, exactly as HF's `residual + x` is.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
        tl.store(residual_ptr + row * stride_r + offs, x, mask=mask)
    h = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(h * h, 0) / hidden + eps)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = _scale(h * inv_rms, w, x, GEMMA)
    tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale(normed, w, like, GEMMA: tl.constexpr):
    """``normed`` (fp32) scaled by the weight; ``like`` carries the model dtype."""
    if GEMMA:  # HF Gemma: (x * (1 + w)).to(input_dtype), all in fp32
        return normed * (1.0 + w)
    # HF Llama: weight * x.to(input_dtype) -- round the normalised value before scaling by weight.
    return w * normed.to(like.dtype).to(tl.float32)


@triton.jit
def _head_rmsnorm_kernel(
    x_ptr,
    q_weight_ptr,
    k_weight_ptr,
    stride_t,
    eps,
    NUM_Q_HEADS: tl.constexpr,
    NUM_HEADS: tl.constexpr,  # q heads + k heads (adjacent in the packed row)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    GEMMA: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    mask = (heads[:, None] < NUM_HEADS) & d_mask[None, :]
    ptrs = x_ptr + token * stride_t + heads[:, None] * HEAD_DIM + offs_d[None, :]
    x = tl.load(ptrs, mask=mask, other=0.0)
    h = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(h * h, 1) / HEAD_DIM + eps)
    wq = tl.load(q_weight_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    wk = tl.load(k_weight_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    w = tl.where((heads < NUM_Q_HEADS)[:, None], wq[None, :], wk[None, :])
    y = _scale(h * inv_rms[:, None], w, x, GEMMA)
    tl.store(ptrs, y.to(x.dtype), mask=mask)


def _launch(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    out: torch.Tensor,
    eps: float,
    num_warps: int | None,
    gemma: bool = False,
) -> None:
    t, hidden = x.shape
    assert x.stride(1) == 1 and out.stride(1) == 1 and weight.is_contiguous()
    assert weight.shape == (hidden,) and out.shape == x.shape
    if t == 0:
        return
    block = triton.next_power_of_2(hidden)
    if num_warps is None:
        # ~8-16 elements per thread keeps the row in registers without spilling.
        num_warps = max(1, min(16, block // 512))
    res = x if residual is None else residual
    assert res.shape == x.shape and res.stride(1) == 1
    _rmsnorm_kernel[(t,)](
        x,
        res,
        weight,
        out,
        x.stride(0),
        res.stride(0),
        out.stride(0),
        hidden,
        eps,
        HAS_RESIDUAL=residual is not None,
        GEMMA=gemma,
        BLOCK=block,
        num_warps=num_warps,
    )


def rmsnorm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
    num_warps: int | None = None,
    gemma: bool = False,
) -> torch.Tensor:
    """``rmsnorm(x) * weight`` (``* (1 + weight)`` with ``gemma``) for ``x [T, H]``; returns
    ``out`` (allocated if None)."""
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _launch(x, None, weight, out, eps, num_warps, gemma)
    return out


def fused_add_rmsnorm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    num_warps: int | None = None,
    gemma: bool = False,
) -> None:
    """In place: ``residual += x``; ``x = rmsnorm(residual) * weight``. ``x, residual [T, H]``."""
    _launch(x, residual, weight, x, eps, num_warps, gemma)


def head_rmsnorm_(
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    eps: float,
    gemma: bool = False,
    block_heads: int = 8,
    num_warps: int = 4,
) -> None:
    """RMSNorm over head_dim of every q head (weight ``q_weight [D]``) and k head (``k_weight``)
    of ``qkv [T, (Hq + 2*Hkv) * D]``, in place; v heads are left alone."""
    t = qkv.shape[0]
    assert qkv.shape[1] == (num_q_heads + 2 * num_kv_heads) * head_dim and qkv.stride(1) == 1
    assert q_weight.shape == k_weight.shape == (head_dim,)
    assert q_weight.is_contiguous() and k_weight.is_contiguous()
    if t == 0:
        return
    num_heads = num_q_heads + num_kv_heads
    block_heads = min(block_heads, triton.next_power_of_2(num_heads))
    _head_rmsnorm_kernel[(t, triton.cdiv(num_heads, block_heads))](
        qkv,
        q_weight,
        k_weight,
        qkv.stride(0),
        eps,
        NUM_Q_HEADS=num_q_heads,
        NUM_HEADS=num_heads,
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_HEADS=block_heads,
        GEMMA=gemma,
        num_warps=num_warps,
    )
