"""FP8 (e4m3) activation quantization and the block-scaled W8A8 GEMM, with torch references.

- `per_token_group_quant_fp8(x, group_size)`: x [M, K] -> (q fp8 [M, K], scales fp32
  [M, ceil(K / group_size)]), scale = amax(|group|) / 448, so every group uses e4m3's full range.
  `group_size=None` is one group per row (per-token scales, [M, 1]).
- `w8a8_block_fp8_matmul(a, b, a_scales, b_scales, block_n, block_k, out_dtype)`: y = (a *
  a_scales) (b * b_scales)^T for a fp8 [M, K] with per-(row, K-block) scales, b fp8 [N, K] (the
  checkpoint's layout) with scales per (row block, K block): b_scales [ceil(N / scale_rows),
  ceil(K / block_k)], `scale_rows` = block_n (the checkpoint's 128 x 128 blocks) or 1 (scales
  expanded per row, when a packed layer's shards do not start on a block boundary).

Each Triton function has a torch twin (`*_torch`): the CPU path and the tests' reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
# Smallest scale: an all-zero row must not divide by zero (its values quantize to 0 anyway).
MIN_SCALE = 1.0 / (FP8_MAX * 512.0)


def per_token_group_quant_fp8_torch(
    x: torch.Tensor, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    M, K = x.shape
    g = K if group_size is None else group_size
    groups = -(-K // g)
    xf = x.float()
    if groups * g != K:
        xf = torch.nn.functional.pad(xf, (0, groups * g - K))
    xg = xf.view(M, groups, g)
    scale = (xg.abs().amax(dim=-1) / FP8_MAX).clamp(min=MIN_SCALE)
    q = (xg / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(M, groups * g)[:, :K].contiguous(), scale


@triton.jit
def _group_quant_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    K,
    stride_xm,
    stride_qm,
    stride_sm,
    GROUP: tl.constexpr,
    BLOCK: tl.constexpr,
    FP8_MAX_C: tl.constexpr,
    MIN_SCALE_C: tl.constexpr,
):
    # One program per (row, group); a group wider than BLOCK is walked twice (amax, then store).
    row = tl.program_id(0)
    g = tl.program_id(1)
    start = g * GROUP
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, GROUP, BLOCK):
        cols = start + off + tl.arange(0, BLOCK)
        mask = (cols < K) & (off + tl.arange(0, BLOCK) < GROUP)
        v = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    scale = tl.maximum(tl.max(amax, axis=0) / FP8_MAX_C, MIN_SCALE_C)
    for off in range(0, GROUP, BLOCK):
        cols = start + off + tl.arange(0, BLOCK)
        mask = (cols < K) & (off + tl.arange(0, BLOCK) < GROUP)
        v = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(v / scale, -FP8_MAX_C), FP8_MAX_C)
        tl.store(q_ptr + row * stride_qm + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row * stride_sm + g, scale)


def per_token_group_quant_fp8(
    x: torch.Tensor, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One kernel for the whole activation (a decode step calls this for every linear layer:
    several small torch ops each would cost more than the GEMM at batch 1)."""
    assert x.dim() == 2 and x.stride(-1) == 1
    M, K = x.shape
    g = K if group_size is None else group_size
    groups = -(-K // g)
    q = torch.empty((M, K), dtype=FP8_DTYPE, device=x.device)
    s = torch.empty((M, groups), dtype=torch.float32, device=x.device)
    if M == 0:
        return q, s
    block = min(triton.next_power_of_2(g), 4096)
    _group_quant_kernel[(M, groups)](
        x,
        q,
        s,
        K,
        x.stride(0),
        q.stride(0),
        s.stride(0),
        GROUP=g,
        BLOCK=block,
        FP8_MAX_C=FP8_MAX,
        MIN_SCALE_C=MIN_SCALE,
        num_warps=4 if block <= 1024 else 8,
    )
    return q, s


def dequantize_blockwise(
    w: torch.Tensor, scales: torch.Tensor, scale_rows: int, block_k: int, dtype: torch.dtype
) -> torch.Tensor:
    """w fp8 [N, K] times its per-(row block, K block) scales, in `dtype`."""
    N, K = w.shape
    s = scales.repeat_interleave(scale_rows, 0)[:N] if scale_rows > 1 else scales
    s = s.repeat_interleave(block_k, 1)[:, :K]
    return (w.float() * s).to(dtype)


def w8a8_block_fp8_matmul_torch(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scales: torch.Tensor,
    b_scales: torch.Tensor,
    scale_rows: int,
    block_k: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    a_deq = dequantize_blockwise(a, a_scales, 1, block_k, torch.float32)
    b_deq = dequantize_blockwise(b, b_scales, scale_rows, block_k, torch.float32)
    return (a_deq @ b_deq.T).to(out_dtype)


@triton.jit
def _block_fp8_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    as_ptr,
    bs_ptr,
    M,
    N,
    K,
    stride_am,
    stride_bn,
    stride_cm,
    stride_asm,
    stride_bsn,
    SCALE_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # BLOCK_K is the quantization block along K: one activation scale per row and one weight
    # scale per (row block) in each K step, applied to that step's partial product.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k = kb * BLOCK_K + rk
        k_mask = k < K
        a = tl.load(
            a_ptr + rm[:, None] * stride_am + k[None, :],
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + rn[None, :] * stride_bn + k[:, None],
            mask=n_mask[None, :] & k_mask[:, None],
            other=0.0,
        )
        sa = tl.load(as_ptr + rm * stride_asm + kb, mask=m_mask, other=0.0)
        sb = tl.load(bs_ptr + (rn // SCALE_ROWS) * stride_bsn + kb, mask=n_mask, other=0.0)
        acc += tl.dot(a, b) * sa[:, None] * sb[None, :]
    tl.store(
        c_ptr + rm[:, None] * stride_cm + rn[None, :],
        acc.to(c_ptr.dtype.element_ty),
        mask=m_mask[:, None] & n_mask[None, :],
    )


def w8a8_block_fp8_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scales: torch.Tensor,
    b_scales: torch.Tensor,
    scale_rows: int,
    block_k: int,
    out_dtype: torch.dtype,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    assert a.dim() == 2 and b.dim() == 2 and a.shape[1] == b.shape[1]
    assert a.stride(-1) == 1 and b.stride(-1) == 1
    M, K = a.shape
    N = b.shape[0]
    c = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0:
        return c
    # Decode (small M): narrow M tiles, more of N per program; prefill: square-ish tiles.
    bm = block_m or (16 if M <= 16 else 32 if M <= 32 else 64)
    bn = block_n or (64 if M <= 64 else 128)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    _block_fp8_gemm_kernel[grid](
        a,
        b,
        c,
        a_scales,
        b_scales,
        M,
        N,
        K,
        a.stride(0),
        b.stride(0),
        c.stride(0),
        a_scales.stride(0),
        b_scales.stride(0),
        SCALE_ROWS=scale_rows,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=block_k,
        num_warps=4,
        num_stages=3 if torch.cuda.is_available() else 1,
    )
    return c


@triton.jit
def _fp8_skinny_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    K_PER_SPLIT,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Few rows of x against many rows of w: each program owns BLOCK_N output features (and,
    # split over K, one K range of them) and streams their fp8 rows once, upcast to x's dtype
    # in registers; the row scales are applied once at the end (y = (x w_q^T) * s). Split-K
    # programs add their partial sums into an fp32 output with atomics.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    n_mask = rn < N
    m_mask = rm < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + rk
        k_mask = k < k_end
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + k[None, :],
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        w = tl.load(
            w_ptr + rn[None, :] * stride_wn + k[:, None],
            mask=n_mask[None, :] & k_mask[:, None],
            other=0.0,
        )
        acc += tl.dot(x, w.to(x.dtype))
    s = tl.load(s_ptr + rn, mask=n_mask, other=0.0)
    acc = acc * s[None, :]
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(ptrs, acc, mask=mask)


def fp8_skinny_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    row_scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    block_n: int = 32,
    block_k: int = 256,
    split_k: int | None = None,
) -> torch.Tensor:
    """y = x (w * row_scales)^T (+ bias) for a few rows of x (decode): the weight is read once,
    in fp8, and x stays in its dtype (no activation quantization, no extra kernel)."""
    assert x.dim() == 2 and x.stride(-1) == 1 and w.stride(-1) == 1
    M, K = x.shape
    N = w.shape[0]
    assert M <= 16, "fp8_skinny_matmul is for decode-sized batches"
    tiles = triton.cdiv(N, block_n)
    if split_k is None:
        # Too few column tiles to fill the GPU (down_proj: 3584 rows over K = 18944): split K.
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
        split_k = 1 if tiles >= sms else max(1, min(-(-2 * sms // tiles), K // (4 * block_k)))
    k_per_split = -(-triton.cdiv(K, split_k) // block_k) * block_k
    if split_k == 1:
        y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    else:
        y = torch.zeros((M, N), dtype=torch.float32, device=x.device)
    if M == 0:
        return y.to(x.dtype)
    _fp8_skinny_kernel[(tiles, split_k)](
        x,
        w,
        row_scales,
        bias if bias is not None else row_scales,
        y,
        M,
        N,
        K,
        x.stride(0),
        w.stride(0),
        y.stride(0),
        k_per_split,
        HAS_BIAS=bias is not None,
        SPLIT_K=split_k,
        BLOCK_M=16,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=4,
        num_stages=4 if torch.cuda.is_available() else 1,
    )
    return y if split_k == 1 else y.to(x.dtype)
