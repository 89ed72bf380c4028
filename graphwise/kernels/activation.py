"""SwiGLU gate: ``silu(x[:, :I]) * x[:, I:]``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,
    out_ptr,
    stride_x,
    stride_o,
    inter,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + inter + offs, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    # Round silu to the model dtype before the product, as eager `F.silu(g) * up` does.
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    tl.store(
        out_ptr + row * stride_o + offs,
        (act * up.to(tl.float32)).to(out_ptr.dtype.element_ty),
        mask=mask,
    )


def silu_and_mul(
    x: torch.Tensor,
    out: torch.Tensor | None = None,
    block: int = 1024,
    num_warps: int = 4,
) -> torch.Tensor:
    """``x [T, 2I]`` -> ``silu(x[:, :I]) * x[:, I:]`` as ``[T, I]`` (into ``out`` if given)."""
    t, two_i = x.shape
    assert two_i % 2 == 0 and x.stride(1) == 1
    inter = two_i // 2
    if out is None:
        out = torch.empty(t, inter, dtype=x.dtype, device=x.device)
    assert out.shape == (t, inter) and out.stride(1) == 1
    if t == 0:
        return out
    block = min(block, triton.next_power_of_2(inter))
    _silu_and_mul_kernel[(t, triton.cdiv(inter, block))](
        x, out, x.stride(0), out.stride(0), inter, BLOCK=block, num_warps=num_warps
    )
    return out
