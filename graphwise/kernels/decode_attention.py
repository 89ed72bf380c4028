"""Paged decode attention (one query token per sequence), split-K "flash-decoding" style.

Stage 1 (``_decode_split_kernel``): grid ``(B, Hkv, num_splits)``. Each program takes one
sequence, one KV head and one contiguous range of that sequence's context, and computes
attention for all query heads of the GQA group at once (the group is the M dimension of the
``tl.dot``), so each K/V tile is read from HBM once per group. The range of a split is derived
on the device from ``seq_lens``, so short sequences simply leave their trailing splits empty.
It writes a normalised partial output and its log2-sum-exp per (seq, q head, split).

Stage 2 (``_decode_reduce_kernel``): grid ``(B, Hq)``, combines the splits with their
log-sum-exp weights. With a single split stage 1 writes the final output directly.

The grid depends only on ``B``, ``Hkv`` and the split count, which the wrapper picks from
shapes (``max_blocks``), never from tensor values: the launch is CUDA-graph capturable.

Per-layer options: a sliding window (the context is ``[max(0, seq_len - window), seq_len)``,
derived on the device like the splits, so a graph captured once serves every length) and a
tanh soft-cap on the scores. A head_dim that is not a power of two is padded to one in
registers (masked loads and stores), e.g. Phi-3's 96.

An FP8 (e4m3) cache is read as such (half the bytes of bf16) and widened in registers, which
is exact: to fp16 for a bf16/fp16 model (one packed conversion per two values, e4m3 -> f16x2,
where e4m3 -> bf16 would go through fp32: at 1 byte per value the conversions, not the loads,
could bound the kernel), and the dots run in fp16 (q and the probabilities converted once per
tile; fp16 keeps 3 more mantissa bits than bf16, and q is far inside its range); to fp32 for an
fp32 model. Its per-tensor scales are applied where they cost nothing: the scores are linear in
k, so ``k_scale`` joins the softmax scale, and the output is linear in v, so ``v_scale``
multiplies the output once instead of every V tile.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _tanh(x):
    # tanh from exp (no libdevice dependency, same in the interpreter): exp overflowing to inf
    # for large x still gives 1, and -1 for very negative x.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _dim_mask(rows_mask, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """``rows_mask [R, 1]`` and, only when head_dim was padded to BLOCK_D, the head_dim bound:
    a power-of-2 head_dim compiles to exactly the unpadded kernel."""
    if BLOCK_D != HEAD_DIM:
        mask = rows_mask & (offs_d[None, :] < HEAD_DIM)
    else:
        mask = rows_mask
    return mask


@triton.jit
def _scores(q, k, qk_scale, softcap_scale, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Base-2 attention scores of q against k: ``s * log2(e)`` with ``s = scale * q.k``, or
    with a soft-cap ``c``: ``c * tanh(s / c) * log2(e)`` (then qk_scale = scale / c and
    softcap_scale = c * log2(e))."""
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if SOFTCAP:
        qk = _tanh(qk) * softcap_scale
    return qk


# The block-table width changes from step to step: specializing on it (width == 1, width % 16)
# would compile new variants mid-serving, a ~1 s stall each (seen on the H100 in bench offline).
@triton.jit(do_not_specialize=["stride_bt", "window"])
def _decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    qk_scale,  # softmax scale * log2(e): the kernel works in base 2 (exp2 is one instruction)
    softcap_scale,  # with SOFTCAP: cap * log2(e), and qk_scale = scale / cap
    window,  # with WINDOW: keys at positions >= seq_len - window only
    v_scale,  # with KV_FP8: the output's factor (k_scale is folded into qk_scale)
    stride_qb,
    stride_qh,
    stride_ob,
    stride_oh,
    stride_bt,
    stride_cache_block,
    stride_cache_tok,
    stride_cache_head,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    GROUP: tl.constexpr,  # query heads per KV head
    BLOCK_H: tl.constexpr,  # GROUP padded to >= 16 (tl.dot's minimum M)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of 2
    PAGE_SIZE: tl.constexpr,  # tokens per KV-cache block
    BLOCK_N: tl.constexpr,  # context tokens per inner-loop tile
    NUM_SPLITS: tl.constexpr,
    DIRECT_OUT: tl.constexpr,  # single split: write the final output, skip the reduce
    WINDOW: tl.constexpr,  # sliding-window layer
    SOFTCAP: tl.constexpr,  # tanh soft-capped scores
    KV_FP8: tl.constexpr,  # e4m3 cache: widen the tiles to KV_COMPUTE, scale the output
    KV_COMPUTE: tl.constexpr,  # with KV_FP8: the dots' dtype (fp16, or fp32 for an fp32 q)
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + seq)
    first = 0
    if WINDOW:
        first = tl.maximum(seq_len - window, 0)
    # Split the context evenly, in whole tiles so no tile straddles two splits.
    tiles_per_split = tl.cdiv(tl.cdiv(seq_len - first, BLOCK_N), NUM_SPLITS)
    start = first + split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + offs_h
    h_mask = offs_h < GROUP
    hd_mask = _dim_mask(h_mask[:, None], offs_d, HEAD_DIM, BLOCK_D)
    q = tl.load(
        q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=hd_mask,
        other=0.0,
    )
    if KV_FP8:
        q = q.to(KV_COMPUTE)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    bt_row = block_tables_ptr + seq * stride_bt
    kv_base = kv_head * stride_cache_head

    # Every tile in [start, end) holds at least one valid token, so m_i is finite after the
    # first iteration and exp2(m_i - m_new) never sees (-inf) - (-inf).
    for tile_start in range(start, end, BLOCK_N):
        offs_n = tile_start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        # Gather: token n lives in block block_tables[seq, n // PAGE_SIZE] at n % PAGE_SIZE.
        block_ids = tl.load(bt_row + offs_n // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
        tok = block_ids * stride_cache_block + (offs_n % PAGE_SIZE) * stride_cache_tok + kv_base
        kv_mask = _dim_mask(n_mask[:, None], offs_d, HEAD_DIM, BLOCK_D)
        k = tl.load(k_cache_ptr + tok[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        if KV_FP8:
            k = k.to(KV_COMPUTE)
        qk = _scores(q, k, qk_scale, softcap_scale, SOFTCAP, DOT_PRECISION)
        qk = tl.where(n_mask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + tok[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        if KV_FP8:
            v = v.to(KV_COMPUTE)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # Empty split or padding lane (seq_len 0): l_i == 0, acc == 0 -> output 0, lse -inf.
    has_tokens = l_i > 0.0
    o = acc / tl.where(has_tokens, l_i, 1.0)[:, None]
    if KV_FP8:  # the splits' partials are linear in v: scaling each scales their combination
        o = o * v_scale
    if DIRECT_OUT:
        dst = out_ptr + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=hd_mask)
    else:
        lse = tl.where(has_tokens, m_i + tl.log2(tl.where(has_tokens, l_i, 1.0)), float("-inf"))
        dst = part_out_ptr + seq * stride_pb + heads[:, None] * stride_ph + split * stride_ps
        tl.store(dst + offs_d[None, :], o, mask=hd_mask)
        tl.store(part_lse_ptr + seq * stride_lb + heads * stride_lh + split, lse, mask=h_mask)


@triton.jit
def _decode_reduce_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_P2: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_P2)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < NUM_SPLITS
    lse = tl.load(
        part_lse_ptr + seq * stride_lb + head * stride_lh + offs_s, mask=s_mask, other=float("-inf")
    )
    m = tl.max(lse, 0)
    # All splits empty (padding lane): use 0 as the pivot so the weights are exp2(-inf) = 0.
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    used = s_mask & (lse > float("-inf"))
    part = tl.load(
        part_out_ptr
        + seq * stride_pb
        + head * stride_ph
        + offs_s[:, None] * stride_ps
        + offs_d[None, :],
        mask=_dim_mask(used[:, None], offs_d, HEAD_DIM, BLOCK_D),
        other=0.0,
    )
    den = tl.sum(w, 0)
    o = tl.sum(part * w[:, None], 0) / tl.where(den > 0.0, den, 1.0)
    dst = out_ptr + seq * stride_ob + head * stride_oh + offs_d
    if BLOCK_D != HEAD_DIM:
        tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)
    else:
        tl.store(dst, o.to(out_ptr.dtype.element_ty))


def check_kv_dtype(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """The cache is q's dtype, or e4m3 (then True: the kernel dequantizes)."""
    assert k_cache.dtype == v_cache.dtype, f"K cache {k_cache.dtype}, V cache {v_cache.dtype}"
    if k_cache.dtype == torch.float8_e4m3fn:
        assert q.dtype in (torch.float32, torch.float16, torch.bfloat16), q.dtype
        return True
    assert q.dtype == k_cache.dtype, f"q {q.dtype} and KV cache {k_cache.dtype} differ"
    return False


def kv_compute_dtype(q_dtype: torch.dtype):
    """The dtype an fp8 cache's tiles widen to (and the dots run in): fp32 for an fp32 model,
    else fp16 (e4m3 -> fp16 is one packed instruction and exact)."""
    return tl.float32 if q_dtype == torch.float32 else tl.float16


def _score_scales(scale: float, softcap: float | None, k_scale: float) -> tuple[float, float]:
    """(qk_scale, softcap_scale) for ``_scores``: base 2, and an FP8 cache's k_scale folded
    into the softmax scale (scores are linear in k; the soft-cap comes after)."""
    scale = scale * k_scale
    if softcap:
        return scale / softcap, softcap * _LOG2E
    return scale * _LOG2E, 1.0


def head_dim_block(head_dim: int) -> int:
    """The register width a head is padded to: a power of 2, at least tl.dot's minimum 16."""
    return max(16, triton.next_power_of_2(head_dim))


def decode_tiles(
    head_dim: int,
    elem_bytes: int,
    cache_elem_bytes: int | None = None,
    smem_bytes: int | None = None,
) -> tuple[int, int]:
    """(BLOCK_N, num_stages) by default. For heads up to 128 wide: 128 tokens a tile when the
    three staged K and V tiles fit the device's shared memory (``smem_bytes``, the per-block
    opt-in limit), else 64; stages 3. Measured on the H200 (benchmarks/results/
    decode-tiles-h200.json: batch 64, 4096 tokens, 28/4 heads of 128): 128 streams a bf16 cache
    at 4.03 TB/s against 3.66 at 64 (0.133 vs 0.147 ms a layer) and an FP8 cache in 0.124 vs
    0.154 ms; an FP8 tile moves half the bytes, so it needs the longer tile even more. 128 x 128
    bf16 x 2 tensors x 3 stages is 192 KiB: Hopper's 227 KiB opt-in holds it, an Ampere or Ada
    card's does not (they keep 64, which the H100 measured best at the time). Wider heads
    (Gemma's 256) halve the tile, and in fp32 also the pipeline depth, so that the staged tiles
    stay inside shared memory (64 x 256 fp32 x 2 tensors x 3 stages would be 384 KiB). Not yet
    tuned on hardware for head_dim 256."""
    width = head_dim_block(head_dim)
    if width > 128:
        return 32, (3 if elem_bytes <= 2 else 2)
    staged = 128 * width * (cache_elem_bytes or elem_bytes) * 2 * 3
    # the rest of the kernel's shared memory (the query tile, the P operand): a generous margin
    if elem_bytes <= 2 and smem_bytes is not None and staged + 24 * 1024 <= smem_bytes:
        return 128, 3
    return 64, 3


# Tokens a split must span for 128-token tiles: at 4096 (batch 64, one split) they won by 10%
# (decode-tiles-h200.json); at ~300 tokens of context (bench latency's batch 1) the step was
# ~1.8% slower with them (0.08 ms over 28 layers: one resident program per SM and a longer
# prologue for one or two tiles). 1024 keeps short splits on 64.
LONG_TILE_MIN_TOKENS = 1024


@functools.lru_cache(maxsize=16)
def _smem_optin(device_index: int) -> int | None:
    props = torch.cuda.get_device_properties(device_index)
    return getattr(props, "shared_memory_per_block_optin", None)


def _device_smem(device: torch.device) -> int | None:
    """Shared memory one block may opt into (None off CUDA: the interpreter keeps 64-token
    tiles, the size the CPU tests were written for)."""
    if device.type == "cuda":
        return _smem_optin(
            device.index if device.index is not None else torch.cuda.current_device()
        )
    return None


@functools.lru_cache(maxsize=16)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 132  # interpreter / CPU: pretend to be an H100 so the heuristic stays meaningful


def choose_num_splits(
    batch: int,
    num_kv_heads: int,
    max_context: int,
    num_sms: int = 132,
    programs_per_sm: int = 4,
    min_tokens_per_split: int = 128,
    max_splits: int = 32,
) -> int:
    """Split count from shapes only (CUDA-graph safe).

    Once ``batch * num_kv_heads`` programs already cover every SM, splitting only adds the
    reduce pass (measured on H100: B=32, Hkv=8 is fastest unsplit). Below that, aim for about
    ``programs_per_sm`` programs per SM, with no split shorter than ``min_tokens_per_split`` of
    the *maximum* context, rounded down to a power of two so few kernel variants compile.
    Sequences shorter than the maximum simply leave their trailing splits empty.
    """
    programs = max(1, batch * num_kv_heads)
    if programs >= num_sms:
        return 1
    by_occupancy = programs_per_sm * num_sms // programs
    by_length = triton.cdiv(max(1, max_context), min_tokens_per_split)
    splits = max(1, min(by_occupancy, by_length, max_splits))
    return 1 << (splits.bit_length() - 1)


def alloc_decode_workspace(
    batch: int, num_q_heads: int, head_dim: int, num_splits: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scratch for the split partials: ``(part_out [B, Hq, S, D], part_lse [B, Hq, S])`` fp32.

    Allocate once for the largest batch and pass it to every call (also inside CUDA graphs);
    a larger buffer than needed is fine (the kernel uses its strides)."""
    part_out = torch.empty(
        batch, num_q_heads, num_splits, head_dim, dtype=torch.float32, device=device
    )
    part_lse = torch.empty(batch, num_q_heads, num_splits, dtype=torch.float32, device=device)
    return part_out, part_lse


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Attention of ``q [B, Hq, D]`` over each sequence's paged KV; returns ``[B, Hq, D]``.

    ``block_tables`` int32 ``[B, max_blocks]``, ``seq_lens`` int32 ``[B]`` (0 = padding lane:
    output zeros). ``num_splits`` None picks it from ``B``, ``Hkv`` and ``max_blocks`` (see
    ``choose_num_splits``); pass ``workspace`` from ``alloc_decode_workspace`` to avoid the
    per-call allocation of the split partials. ``sliding_window`` W: only the last W keys of
    each sequence are read; ``softcap`` c: scores ``c * tanh(scale * q.k / c)`` (see
    ``reference.py``). A ``torch.float8_e4m3fn`` cache holds ``k / k_scale`` and
    ``v / v_scale`` (see ``kv_store``); it is dequantized in registers.
    """
    b, hq, d = q.shape
    num_blocks, page_size, hkv, d_cache = k_cache.shape
    assert d == d_cache, f"q head_dim {d} and KV cache head_dim {d_cache} differ"
    assert hq % hkv == 0, f"num_q_heads {hq} is not a multiple of num_kv_heads {hkv}"
    assert v_cache.shape == k_cache.shape and k_cache.stride() == v_cache.stride()
    assert q.stride(2) == 1 and k_cache.stride(3) == 1, "head_dim axis must be contiguous"
    assert block_tables.shape[0] == b and seq_lens.shape[0] == b
    kv_fp8 = check_kv_dtype(q, k_cache, v_cache)
    group = hq // hkv
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    assert out.shape == q.shape and out.stride(2) == 1
    if b == 0:
        return out
    if num_splits is None:
        max_context = block_tables.shape[1] * page_size
        if sliding_window:
            max_context = min(max_context, sliding_window)
        num_splits = choose_num_splits(b, hkv, max_context, _device_sms(q.device))
    if block_n is None or num_stages is None:
        # Long tiles pay off only where a split streams many of them (see decode_tiles).
        per_split = block_tables.shape[1] * page_size // num_splits
        smem = _device_smem(q.device) if per_split >= LONG_TILE_MIN_TOKENS else None
        tile_n, stages = decode_tiles(d, q.element_size(), k_cache.element_size(), smem)
        block_n = tile_n if block_n is None else block_n
        num_stages = stages if num_stages is None else num_stages
    direct = num_splits == 1
    if direct:
        part_out, part_lse = out, seq_lens  # unused placeholders (any pointer will do)
        p_strides, l_strides = (0, 0, 0), (0, 0)
    else:
        if workspace is None:
            workspace = alloc_decode_workspace(b, hq, d, num_splits, q.device)
        part_out, part_lse = workspace
        assert part_out.shape[0] >= b and part_out.shape[1] == hq and part_out.shape[3] == d
        assert part_out.shape[2] >= num_splits and part_out.stride(3) == 1
        assert part_lse.shape[0] >= b and part_lse.shape[2] >= num_splits
        assert part_lse.stride(2) == 1
        p_strides = (part_out.stride(0), part_out.stride(1), part_out.stride(2))
        l_strides = (part_lse.stride(0), part_lse.stride(1))

    _decode_split_kernel[(b, hkv, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        out,
        part_out,
        part_lse,
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
        *p_strides,
        *l_strides,
        GROUP=group,
        BLOCK_H=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=d,
        BLOCK_D=head_dim_block(d),
        PAGE_SIZE=page_size,
        BLOCK_N=block_n,
        NUM_SPLITS=num_splits,
        DIRECT_OUT=direct,
        WINDOW=bool(sliding_window),
        SOFTCAP=bool(softcap),
        KV_FP8=kv_fp8,
        KV_COMPUTE=kv_compute_dtype(q.dtype),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if not direct:
        _decode_reduce_kernel[(b, hq)](
            part_out,
            part_lse,
            out,
            *p_strides,
            *l_strides,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=d,
            BLOCK_D=head_dim_block(d),
            NUM_SPLITS=num_splits,
            SPLITS_P2=triton.next_power_of_2(num_splits),
            num_warps=4,
        )
    return out
