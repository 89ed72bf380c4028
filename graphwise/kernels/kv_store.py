"""Write new K/V rows into the paged KV cache (one program per token).

An FP8 (e4m3) cache stores ``x / scale`` rounded to nearest-even on the e4m3 grid and
saturated to +-448 (vLLM's per-tensor ``k_scale`` / ``v_scale``): bit for bit what torch's
``(x.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn)`` gives.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def e4m3_round(x, scale):
    """``x / scale`` as fp32 values that e4m3 represents exactly (nearest-even, saturated).

    The rounding is done here rather than by the cast: Triton's interpreter rounds
    fp32 -> fp8 wrongly when the mantissa carries into the exponent (125.0 -> 64), and doing
    it in fp32 makes the interpreter and the GPU agree bit for bit. Step: the e4m3 spacing
    of |x| is 2^(e - 3) for its exponent e, and 2^-9 below the smallest normal 2^-6; scaling
    by powers of two is exact, and adding and subtracting 1.5 * 2^23 rounds to an integer
    (nearest-even) in fp32. The sign is put back bitwise so -0.0 stays -0.0, as in torch."""
    x = tl.math.div_rn(x.to(tl.float32), scale)  # IEEE division, as torch's x / scale
    x = tl.clamp(x, -448.0, 448.0)
    mag = tl.abs(x)
    e = (tl.maximum(mag, 0.015625).to(tl.int32, bitcast=True) >> 23) & 0xFF
    spacing = ((e - 3) << 23).to(tl.float32, bitcast=True)
    inv_spacing = ((257 - e) << 23).to(tl.float32, bitcast=True)
    r = ((mag * inv_spacing + 12582912.0) - 12582912.0) * spacing
    sign = x.to(tl.int32, bitcast=True) & -2147483648
    return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


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
    k_scale,  # FP8 only: the cache holds x / scale
    v_scale,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of 2
    BLOCK_H: tl.constexpr,
    FP8: tl.constexpr,  # the cache is e4m3: quantize with the per-tensor scales
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
    if FP8:
        k = e4m3_round(k, k_scale)
        v = e4m3_round(v, v_scale)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_warps: int = 4,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Scatter ``k, v [T, Hkv, D]`` into ``k_cache, v_cache [num_blocks, block_size, Hkv, D]``.

    ``slot_mapping`` int64 ``[T]``: flat slot ``block_id * block_size + offset``; slot < 0 is a
    padding lane and writes nothing. ``k``/``v`` may be strided views (e.g. slices of a packed
    qkv) as long as the head_dim axis is contiguous. Allocates nothing (CUDA-graph safe).
    An ``torch.float8_e4m3fn`` cache stores ``x / k_scale`` (``v_scale``), saturated.
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
        float(k_scale),
        float(v_scale),
        NUM_KV_HEADS=hkv,
        HEAD_DIM=d,
        BLOCK_D=triton.next_power_of_2(d),
        BLOCK_H=triton.next_power_of_2(hkv),
        FP8=k_cache.dtype == torch.float8_e4m3fn,
        num_warps=num_warps,
    )
