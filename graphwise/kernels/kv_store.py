"""Write new K/V rows into the paged KV cache (one program per token)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cache_slot,  # elements between consecutive flat slots (= Hkv * D for contiguous)
    stride_cache_h,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of 2
    BLOCK_H: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    # A negative slot is a padding lane: mask every access so nothing is read or written.
    # (Folded into the head bound: `tensor_mask & scalar_bool` trips Triton's interpreter.)
    num_heads = tl.where(slot >= 0, NUM_KV_HEADS, 0)
    mask = offs_h[:, None] < num_heads
    if BLOCK_D != HEAD_DIM:  # padded head_dim only: a power of 2 compiles as before
        mask = mask & (offs_d[None, :] < HEAD_DIM)
    src_k = k_ptr + token * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :]
    src_v = v_ptr + token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :]
    dst = slot * stride_cache_slot + offs_h[:, None] * stride_cache_h + offs_d[None, :]
    k = tl.load(src_k, mask=mask)
    v = tl.load(src_v, mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_warps: int = 4,
) -> None:
    """Scatter ``k, v [T, Hkv, D]`` into ``k_cache, v_cache [num_blocks, block_size, Hkv, D]``.

    ``slot_mapping`` int64 ``[T]``: flat slot ``block_id * block_size + offset``; slot < 0 is a
    padding lane and writes nothing. ``k``/``v`` may be strided views (e.g. slices of a packed
    qkv) as long as the head_dim axis is contiguous. Allocates nothing (CUDA-graph safe).
    """
    t, hkv, d = k.shape
    assert v.shape == k.shape, f"k {tuple(k.shape)} and v {tuple(v.shape)} differ"
    assert k_cache.shape == v_cache.shape and k_cache.shape[2:] == (hkv, d)
    assert k.stride(2) == 1 and v.stride(2) == 1, "head_dim axis of k/v must be contiguous"
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    if t == 0:
        return
    _store_kv_kernel[(t,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(1),
        k_cache.stride(2),
        NUM_KV_HEADS=hkv,
        HEAD_DIM=d,
        BLOCK_D=triton.next_power_of_2(d),
        BLOCK_H=triton.next_power_of_2(hkv),
        num_warps=num_warps,
    )
