"""Packed variable-length causal prefill/extend attention over the paged KV cache.

Grid ``(cdiv(max_q_len, BLOCK_M), B, Hq)``: each program owns ``BLOCK_M`` new query tokens of
one sequence and one query head, and streams that sequence's keys (cached prefix and the new
tokens alike, all read from the paged cache) in ``BLOCK_N`` tiles with an online softmax.
Programs whose tile lies past their sequence's ``q_len`` exit at once, so ``max_q_len`` only
needs to be an upper bound. Keys that every row of the tile may see run without the causal
mask; only the tiles around the diagonal pay for it.

A sliding window (per layer) bounds the keys a tile reads to ``[first row's position - window
+ 1, last row's position]``; the tiles at both edges of that band are masked, the whole tiles
inside it are not. Soft-capping, padded head_dim and an FP8 (e4m3) cache work as in
``decode_attention`` (tiles widened in registers, to fp16 unless the model is fp32, ``k_scale``
folded into the softmax scale, ``v_scale`` applied to the output).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from graphwise.kernels.decode_attention import (
    _dim_mask,
    _score_scales,
    _scores,
    check_kv_dtype,
    head_dim_block,
    kv_compute_dtype,
)


@triton.jit
def _attend_tiles(
    acc,
    l_i,
    m_i,
    q,
    q_pos,
    k_cache_ptr,
    v_cache_ptr,
    bt_row,
    kv_base,
    key_start,
    key_end,
    qk_scale,
    softcap_scale,
    window,
    stride_cache_block,
    stride_cache_tok,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL_MASK: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    KV_FP8: tl.constexpr,
    KV_COMPUTE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online-softmax accumulation over keys ``[key_start, key_end)`` (base-2 exponent).

    Without ``CAUSAL_MASK`` the caller guarantees whole tiles that every row may see; with it
    and ``WINDOW``, keys at or below ``q_pos - window`` are masked too."""
    offs_d = tl.arange(0, BLOCK_D)
    for tile_start in range(key_start, key_end, BLOCK_N):
        offs_n = tile_start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < key_end
        block_ids = tl.load(bt_row + offs_n // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
        tok = block_ids * stride_cache_block + (offs_n % PAGE_SIZE) * stride_cache_tok + kv_base
        kv_mask = _dim_mask(n_mask[:, None], offs_d, HEAD_DIM, BLOCK_D)
        k = tl.load(k_cache_ptr + tok[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        if KV_FP8:
            k = k.to(KV_COMPUTE)
        qk = _scores(q, k, qk_scale, softcap_scale, SOFTCAP, DOT_PRECISION)
        if CAUSAL_MASK:
            visible = n_mask[None, :] & (offs_n[None, :] <= q_pos[:, None])
            if WINDOW:
                visible = visible & (offs_n[None, :] > q_pos[:, None] - window)
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # Without a window every row sees key 0 in the first tile processed, so m_new is
        # finite from then on. Near a window's edges a row may have seen no key yet: pivot its
        # exponentials on 0 (they are all exp2(-inf) = 0) instead of exp2(-inf - -inf) = NaN,
        # and keep its running maximum at -inf.
        pivot = m_new
        if CAUSAL_MASK and WINDOW:
            pivot = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - pivot)
        p = tl.exp2(qk - pivot[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + tok[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        if KV_FP8:
            v = v.to(KV_COMPUTE)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# The block-table width changes from step to step: specializing on it (width == 1, width % 16)
# would compile new variants mid-serving, a ~1 s stall each (seen on the H100 in bench offline).
@triton.jit(do_not_specialize=["stride_bt", "window"])
def _extend_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    cu_seqlens_ptr,
    seq_lens_ptr,
    block_tables_ptr,
    qk_scale,
    softcap_scale,
    window,
    v_scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_cache_block,
    stride_cache_tok,
    stride_cache_head,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    KV_FP8: tl.constexpr,
    KV_COMPUTE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Launch the heaviest (last, most keys) query tiles first to shorten the causal tail.
    m_block = tl.num_programs(0) - 1 - tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)

    q_start = tl.load(cu_seqlens_ptr + seq)
    q_len = tl.load(cu_seqlens_ptr + seq + 1) - q_start
    if m_block * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix = seq_len - q_len

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_len
    md_mask = _dim_mask(m_mask[:, None], offs_d, HEAD_DIM, BLOCK_D)
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=md_mask,
        other=0.0,
    )
    if KV_FP8:
        q = q.to(KV_COMPUTE)
    q_pos = prefix + offs_m  # absolute position of each query row

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    bt_row = block_tables_ptr + seq * stride_bt
    kv_base = (head // GROUP) * stride_cache_head

    # Keys in [full_start, first_pos] are visible to every row: those whole tiles skip the
    # mask. Keys before them (down to the first row's window edge, `band_start`) and after
    # them (up to the last row's position) are masked. Without a window both starts are 0.
    first_pos = prefix + m_block * BLOCK_M
    key_end = tl.minimum(prefix + (m_block + 1) * BLOCK_M, seq_len)
    band_start = 0
    full_start = 0
    if WINDOW:
        band_start = tl.maximum(first_pos - window + 1, 0)
        full_start = tl.minimum(tl.maximum(key_end - window, band_start), first_pos + 1)
    unmasked_end = full_start + ((first_pos + 1 - full_start) // BLOCK_N) * BLOCK_N
    if WINDOW:
        acc, l_i, m_i = _attend_tiles(
            acc, l_i, m_i, q, q_pos, k_cache_ptr, v_cache_ptr, bt_row, kv_base,
            band_start, full_start, qk_scale, softcap_scale, window,
            stride_cache_block, stride_cache_tok,
            HEAD_DIM, BLOCK_D, PAGE_SIZE, BLOCK_N, True, WINDOW, SOFTCAP, KV_FP8, KV_COMPUTE,
            DOT_PRECISION,
        )  # fmt: skip
    acc, l_i, m_i = _attend_tiles(
        acc, l_i, m_i, q, q_pos, k_cache_ptr, v_cache_ptr, bt_row, kv_base,
        full_start, unmasked_end, qk_scale, softcap_scale, window,
        stride_cache_block, stride_cache_tok,
        HEAD_DIM, BLOCK_D, PAGE_SIZE, BLOCK_N, False, WINDOW, SOFTCAP, KV_FP8, KV_COMPUTE,
        DOT_PRECISION,
    )  # fmt: skip
    acc, l_i, m_i = _attend_tiles(
        acc, l_i, m_i, q, q_pos, k_cache_ptr, v_cache_ptr, bt_row, kv_base,
        unmasked_end, key_end, qk_scale, softcap_scale, window,
        stride_cache_block, stride_cache_tok,
        HEAD_DIM, BLOCK_D, PAGE_SIZE, BLOCK_N, True, WINDOW, SOFTCAP, KV_FP8, KV_COMPUTE,
        DOT_PRECISION,
    )  # fmt: skip

    o = acc / l_i[:, None]
    if KV_FP8:
        o = o * v_scale
    dst = out_ptr + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=md_mask)


def extend_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    max_q_len: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    sliding_window: int | None = None,
    softcap: float | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Causal attention of packed new tokens ``q [T, Hq, D]`` over their sequences' paged KV.

    ``cu_seqlens_q`` int32 ``[B+1]``, ``seq_lens`` int32 ``[B]`` (context incl. new tokens; the
    new tokens' KV is already in the cache), ``block_tables`` int32 ``[B, max_blocks]``.
    ``max_q_len`` is an upper bound on any sequence's new-token count; None uses ``T`` (always
    safe; excess programs exit immediately). ``sliding_window`` and ``softcap`` as in
    ``decode_attention``; so are ``k_scale`` / ``v_scale`` of an FP8 cache. Returns ``[T, Hq, D]`` in q's dtype.
    """
    t, hq, d = q.shape
    num_blocks, page_size, hkv, d_cache = k_cache.shape
    assert d == d_cache, f"q head_dim {d} and KV cache head_dim {d_cache} differ"
    assert hq % hkv == 0, f"num_q_heads {hq} is not a multiple of num_kv_heads {hkv}"
    assert v_cache.shape == k_cache.shape and k_cache.stride() == v_cache.stride()
    assert q.stride(2) == 1 and k_cache.stride(3) == 1, "head_dim axis must be contiguous"
    kv_fp8 = check_kv_dtype(q, k_cache, v_cache)
    b = seq_lens.shape[0]
    assert cu_seqlens_q.shape[0] == b + 1 and block_tables.shape[0] == b
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    assert out.shape == q.shape and out.stride(2) == 1
    if t == 0 or b == 0:
        return out
    if max_q_len is None:
        max_q_len = t
    # 64 x 64 tiles (measured on the H100 for head_dim <= 128); wider heads (Gemma's 256) use
    # 32 x 32 so the accumulator and the staged K/V tiles fit (not yet tuned on hardware).
    wide = head_dim_block(d) > 128
    block_m = block_m or (32 if wide else 64)
    block_n = block_n or (32 if wide else 64)
    grid = (triton.cdiv(max_q_len, block_m), b, hq)
    _extend_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        cu_seqlens_q,
        seq_lens,
        block_tables,
        *_score_scales(scale, softcap, k_scale if kv_fp8 else 1.0),
        sliding_window or 0,
        float(v_scale),
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        GROUP=hq // hkv,
        HEAD_DIM=d,
        BLOCK_D=head_dim_block(d),
        PAGE_SIZE=page_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        WINDOW=bool(sliding_window),
        SOFTCAP=bool(softcap),
        KV_FP8=kv_fp8,
        KV_COMPUTE=kv_compute_dtype(q.dtype),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
