"""Gated activations on a packed gate/up projection: ``act(x[:, :I]) * x[:, I:]``.

SwiGLU (``silu``, Llama and most others) and GeGLU (``gelu_tanh``, Gemma's
``gelu_pytorch_tanh``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _act_and_mul_kernel(
    x_ptr,
    out_ptr,
    stride_x,
    stride_o,
    inter,
    GELU_TANH: tl.constexpr,  # False: silu
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + inter + offs, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    if GELU_TANH:
        # 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))), tanh written as 2 sigmoid(2u) - 1.
        u = 0.7978845608028654 * (g + 0.044715 * g * g * g)  # sqrt(2 / pi) = 0.79788...
        act = g - g / (1.0 + tl.exp(2.0 * u))
    else:
        act = g / (1.0 + tl.exp(-g))
    # Round the activation to the model dtype before the product, as eager `act(g) * up` does.
    act = act.to(gate.dtype).to(tl.float32)
    tl.store(
        out_ptr + row * stride_o + offs,
        (act * up.to(tl.float32)).to(out_ptr.dtype.element_ty),
        mask=mask,
    )


def _act_and_mul(
    x: torch.Tensor, out: torch.Tensor | None, gelu_tanh: bool, block: int, num_warps: int
) -> torch.Tensor:
    t, two_i = x.shape
    assert two_i % 2 == 0 and x.stride(1) == 1
    inter = two_i // 2
    if out is None:
        out = torch.empty(t, inter, dtype=x.dtype, device=x.device)
    assert out.shape == (t, inter) and out.stride(1) == 1
    if t == 0:
        return out
    block = min(block, triton.next_power_of_2(inter))
    _act_and_mul_kernel[(t, triton.cdiv(inter, block))](
        x,
        out,
        x.stride(0),
        out.stride(0),
        inter,
        GELU_TANH=gelu_tanh,
        BLOCK=block,
        num_warps=num_warps,
    )
    return out


def silu_and_mul(
    x: torch.Tensor,
    out: torch.Tensor | None = None,
    block: int = 1024,
    num_warps: int = 4,
) -> torch.Tensor:
    """``x [T, 2I]`` -> ``silu(x[:, :I]) * x[:, I:]`` as ``[T, I]`` (into ``out`` if given)."""
    return _act_and_mul(x, out, False, block, num_warps)


def gelu_tanh_and_mul(
    x: torch.Tensor,
    out: torch.Tensor | None = None,
    block: int = 1024,
    num_warps: int = 4,
) -> torch.Tensor:
    """``x [T, 2I]`` -> ``gelu_tanh(x[:, :I]) * x[:, I:]`` (GeGLU, Gemma's MLP)."""
    return _act_and_mul(x, out, True, block, num_warps)
