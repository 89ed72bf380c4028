"""RMSNorm and fused residual-add + RMSNorm (one program per row), HF Llama numerics."""

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
    # HF: weight * h.to(input_dtype) -- round the normalised value before scaling by weight.
    normed = (h * inv_rms).to(dtype).to(tl.float32)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    out: torch.Tensor,
    eps: float,
    num_warps: int | None,
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
        BLOCK=block,
        num_warps=num_warps,
    )


def rmsnorm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """``rmsnorm(x) * weight`` for ``x [T, H]``; returns ``out`` (allocated if None)."""
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _launch(x, None, weight, out, eps, num_warps)
    return out


def fused_add_rmsnorm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    num_warps: int | None = None,
) -> None:
    """In place: ``residual += x``; ``x = rmsnorm(residual) * weight``. ``x, residual [T, H]``."""
    _launch(x, residual, weight, x, eps, num_warps)
