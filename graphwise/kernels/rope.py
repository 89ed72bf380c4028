"""In-place rotary embedding (NeoX / HF Llama rotate_half) on the q and k parts of packed qkv."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(
    qkv_ptr,
    pos_ptr,
    cos_sin_ptr,
    stride_t,
    stride_cs,
    NUM_ROT_HEADS: tl.constexpr,  # q heads + k heads; v heads follow and are left alone
    HEAD_DIM: tl.constexpr,
    BLOCK_HALF: tl.constexpr,  # HEAD_DIM / 2 rounded up to a power of 2 (e.g. 48 -> 64)
    BLOCK_HEADS: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head_block = tl.program_id(1)
    half: tl.constexpr = HEAD_DIM // 2
    offs_j = tl.arange(0, BLOCK_HALF)
    pos = tl.load(pos_ptr + token)
    heads = head_block * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)
    mask = heads[:, None] < NUM_ROT_HEADS
    if BLOCK_HALF != half:  # padded (e.g. head_dim 96); a power of 2 compiles as before
        j_mask = offs_j < half
        cos = tl.load(cos_sin_ptr + pos * stride_cs + offs_j, mask=j_mask, other=0.0)
        sin = tl.load(cos_sin_ptr + pos * stride_cs + half + offs_j, mask=j_mask, other=0.0)
        mask = mask & j_mask[None, :]
    else:
        cos = tl.load(cos_sin_ptr + pos * stride_cs + offs_j)
        sin = tl.load(cos_sin_ptr + pos * stride_cs + half + offs_j)
    # q heads and k heads are adjacent in the packed row, so they rotate as one range.
    first = qkv_ptr + token * stride_t + heads[:, None] * HEAD_DIM + offs_j[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + half, mask=mask, other=0.0).to(tl.float32)
    out1 = x1 * cos[None, :] - x2 * sin[None, :]
    out2 = x2 * cos[None, :] + x1 * sin[None, :]
    tl.store(first, out1.to(qkv_ptr.dtype.element_ty), mask=mask)
    tl.store(first + half, out2.to(qkv_ptr.dtype.element_ty), mask=mask)


def rope_qkv_(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_heads: int = 8,
    num_warps: int = 4,
) -> None:
    """Rotate q and k heads of ``qkv [T, (Hq + 2*Hkv) * D]`` in place at ``positions`` int64.

    ``cos_sin_cache`` fp32 ``[max_position, D]``: columns ``[:D/2]`` cos, ``[D/2:]`` sin.
    """
    t = qkv.shape[0]
    assert qkv.shape[1] == (num_q_heads + 2 * num_kv_heads) * head_dim and qkv.stride(1) == 1
    assert head_dim % 2 == 0, f"head_dim must be even, got {head_dim}"
    assert cos_sin_cache.shape[1] == head_dim and cos_sin_cache.stride(1) == 1
    assert positions.shape == (t,)
    if t == 0:
        return
    num_rot = num_q_heads + num_kv_heads
    block_heads = min(block_heads, triton.next_power_of_2(num_rot))
    grid = (t, triton.cdiv(num_rot, block_heads))
    _rope_kernel[grid](
        qkv,
        positions,
        cos_sin_cache,
        qkv.stride(0),
        cos_sin_cache.stride(0),
        NUM_ROT_HEADS=num_rot,
        HEAD_DIM=head_dim,
        BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
        BLOCK_HEADS=block_heads,
        num_warps=num_warps,
    )
