"""INT4 weight-only checkpoints (AWQ and GPTQ packings): a torch reference dequantize and a
Triton kernel computing y = x @ dequant(W) with the 4-bit codes unpacked inside the GEMM/GEMV.

Both formats store the transposed weight (``[in_features, out_features]``), 8 codes per int32,
code ``q`` in 0..15, one fp16/bf16 scale and one 4-bit zero point per (group of
``group_size`` input rows, output column); w = (q - zero) * scale.

AWQ (AutoAWQ ``WQLinear_GEMM``; the format vLLM's ``awq`` method and transformers read):
- ``qweight`` int32 ``[in, out / 8]``, packed along the *output* axis; within one int32 the
  codes of output columns ``8p + [0, 2, 4, 6, 1, 3, 5, 7]`` sit at bits ``0, 4, ..., 28``
  (AutoAWQ's pack order), so column ``8p + o`` is at bits ``4 * (o // 2 + 4 * (o % 2))``.
- ``qzeros`` int32 ``[in / group, out / 8]``, same packing; the zero is the stored code.
- ``scales`` ``[in / group, out]``.

GPTQ (AutoGPTQ v1 files, ``checkpoint_format`` "gptq"; vLLM's ``gptq``):
- ``qweight`` int32 ``[in / 8, out]``, packed along the *input* axis: input row ``8i + j`` at
  bits ``4j`` of ``qweight[i]``.
- ``qzeros`` int32 ``[in / group, out / 8]``, packed along the output axis in plain order
  (column ``8p + j`` at bits ``4j``), storing ``zero - 1``: AutoGPTQ's pack subtracts 1 and its
  kernels add it back, so a symmetric model stores 7 (0x77777777) for a zero point of 8.
- ``scales`` ``[in / group, out]``; ``g_idx`` ``[in]`` must be ``i // group_size``
  (``desc_act=False``): act-order checkpoints are refused by ``check_gptq_g_idx``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from graphwise.kernels.linear_io import as_rows

FORMATS = ("awq", "gptq")
# AutoAWQ's order of the 8 output columns inside one int32 (bits 0, 4, ..., 28).
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"INT4 format {fmt!r} is not supported (supported: {', '.join(FORMATS)})")
    return fmt


def int4_shapes(
    fmt: str, in_features: int, out_features: int, group_size: int
) -> dict[str, tuple[int, int]]:
    """The shapes of qweight, qzeros and scales of one ``fmt`` layer."""
    _check_format(fmt)
    if in_features % group_size or group_size % 8 or out_features % 8 or in_features % 8:
        raise ValueError(
            f"INT4 {fmt}: in_features={in_features} must be a multiple of group_size={group_size} "
            f"(itself a multiple of 8) and out_features={out_features} a multiple of 8"
        )
    groups = in_features // group_size
    qweight = (in_features, out_features // 8) if fmt == "awq" else (in_features // 8, out_features)
    return {
        "qweight": qweight,
        "qzeros": (groups, out_features // 8),
        "scales": (groups, out_features),
    }


def check_gptq_g_idx(g_idx: torch.Tensor | None, in_features: int, group_size: int) -> None:
    """Refuse act-order (``desc_act=True``) GPTQ checkpoints: only ``g_idx[i] == i // group_size``
    is supported. Call at load time (it reads the tensor)."""
    if g_idx is None:
        return
    expected = torch.arange(in_features, device=g_idx.device) // group_size
    if g_idx.shape != (in_features,) or not torch.equal(g_idx.long(), expected):
        raise ValueError(
            "GPTQ g_idx is not i // group_size: act-order (desc_act=True) checkpoints are not "
            "supported by the INT4 kernels; use a desc_act=False export"
        )


def _unpack_cols(packed: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """int32 [r, c] -> int [r, 8c]: the code of column 8p + order[j] is at bits 4j of [:, p]."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    codes = (packed[:, :, None] >> shifts) & 0xF  # [r, c, 8] in bit order
    out = torch.empty_like(codes)
    out[:, :, list(order)] = codes
    return out.reshape(packed.shape[0], -1)


def unpack_codes(
    qweight: torch.Tensor, qzeros: torch.Tensor, fmt: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [in, out], zero points [in / group, out]) as int32, zero points with GPTQ's +1."""
    _check_format(fmt)
    if fmt == "awq":
        return _unpack_cols(qweight, AWQ_PACK_ORDER), _unpack_cols(qzeros, AWQ_PACK_ORDER)
    shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int32)
    codes = ((qweight[:, None, :] >> shifts[None, :, None]) & 0xF).reshape(-1, qweight.shape[1])
    zeros = _unpack_cols(qzeros, tuple(range(8))) + 1
    return codes, zeros


def dequantize(
    qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, group_size: int, fmt: str
) -> torch.Tensor:
    """fp32 ``[in_features, out_features]`` (the stored, transposed orientation)."""
    codes, zeros = unpack_codes(qweight, qzeros, fmt)
    z = zeros.repeat_interleave(group_size, dim=0)
    s = scales.float().repeat_interleave(group_size, dim=0)
    return (codes - z).float() * s


def pack_codes(
    codes: torch.Tensor, zeros: torch.Tensor, fmt: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``unpack_codes``: codes [in, out] and zero points [groups, out] (0..15; GPTQ
    zero points 1..16 as used, stored minus 1) -> (qweight, qzeros) int32. For tests/benchmarks."""
    _check_format(fmt)

    def pack_cols(v: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
        v = v.to(torch.int64).reshape(v.shape[0], -1, 8)[:, :, list(order)]
        shifts = torch.arange(0, 32, 4, device=v.device, dtype=torch.int64)
        return _to_int32((v << shifts).sum(-1))

    if fmt == "awq":
        return pack_cols(codes, AWQ_PACK_ORDER), pack_cols(zeros, AWQ_PACK_ORDER)
    c = codes.to(torch.int64).reshape(-1, 8, codes.shape[1])
    shifts = torch.arange(0, 32, 4, device=codes.device, dtype=torch.int64)[None, :, None]
    return _to_int32((c << shifts).sum(1)), pack_cols(zeros - 1, tuple(range(8)))


def _to_int32(v: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> the int32 with the same bits."""
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)


def random_int4(
    fmt: str,
    out_features: int,
    in_features: int,
    group_size: int,
    device: torch.device | str = "cpu",
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (qweight, scales, qzeros) of one layer, every code and zero point in use."""
    int4_shapes(fmt, in_features, out_features, group_size)
    g = torch.Generator(device="cpu").manual_seed(seed)
    groups = in_features // group_size
    codes = torch.randint(0, 16, (in_features, out_features), generator=g)
    lo = 1 if fmt == "gptq" else 0  # GPTQ stores zero - 1 in 4 bits: zero points 1..16
    zeros = torch.randint(lo, lo + 16, (groups, out_features), generator=g)
    scales = (torch.rand(groups, out_features, generator=g) * 0.01 + 0.001).to(dtype)
    qweight, qzeros = pack_codes(codes, zeros, fmt)
    return qweight.to(device), scales.to(device), qzeros.to(device)


# ----------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tile_cols(pid_n, N, AWQ: tl.constexpr, BLOCK_N: tl.constexpr):
    """Output column of each tile column (storage order) and its mask."""
    c = tl.arange(0, BLOCK_N)
    if AWQ:  # tile column 8p + j is output column 8p + AWQ_PACK_ORDER[j]
        j = c % 8
        offs_n = pid_n * BLOCK_N + (c // 8) * 8 + (j % 4) * 2 + j // 4
    else:
        offs_n = pid_n * BLOCK_N + c
    return offs_n, offs_n < N


@triton.jit
def _int4_tile(
    qw_ptr,
    s_ptr,
    z_ptr,
    k0,
    pid_n,
    offs_n,
    n_mask,
    N,
    GROUP,
    stride_qw,
    stride_s,
    stride_z,
    AWQ: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """fp32 [BLOCK_K, BLOCK_N] weight tile at rows k0.. (one group), columns in storage order.

    Packed words are loaded once each, as contiguous tiles, and split into their 8 codes in
    registers."""
    shifts = tl.arange(0, 8) * 4
    g = k0 // GROUP  # BLOCK_K divides GROUP
    s = tl.load(s_ptr + g * stride_s + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if AWQ:
        offs_p = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)  # packed columns
        p_mask = offs_p < N // 8
        zp = tl.load(z_ptr + g * stride_z + offs_p, mask=p_mask, other=0)
        z = tl.reshape((zp[:, None] >> shifts[None, :]) & 0xF, [BLOCK_N])
        k = k0 + tl.arange(0, BLOCK_K)
        pw = tl.load(
            qw_ptr + k.to(tl.int64)[:, None] * stride_qw + offs_p[None, :],
            mask=p_mask[None, :],
            other=0,
        )  # [BK, BN / 8]
        q = tl.reshape((pw[:, :, None] >> shifts[None, None, :]) & 0xF, [BLOCK_K, BLOCK_N])
    else:
        zp = tl.load(z_ptr + g * stride_z + offs_n // 8, mask=n_mask, other=0)
        z = ((zp >> ((offs_n % 8) * 4)) & 0xF) + 1
        kp = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        pw = tl.load(
            qw_ptr + kp.to(tl.int64)[:, None] * stride_qw + offs_n[None, :],
            mask=n_mask[None, :],
            other=0,
        )  # [BK / 8, BN]
        q = tl.reshape((pw[:, None, :] >> shifts[None, :, None]) & 0xF, [BLOCK_K, BLOCK_N])
    return (q - z[None, :]).to(tl.float32) * s[None, :]


@triton.jit
def _int4_linear_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    y_ptr,
    M,
    N,
    K,
    GROUP,
    stride_xm,
    stride_qw,
    stride_s,
    stride_z,
    stride_ym,
    stride_ys,
    AWQ: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    """BLOCK_M == 1: GEMV, fp32 FMA into a [BLOCK_K, BLOCK_N] accumulator reduced once at the
    end; else tl.dot tiles."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_n, n_mask = _tile_cols(pid_n, N, AWQ, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    if BLOCK_M == 1:
        acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    n_tiles = K // BLOCK_K
    per = tl.cdiv(n_tiles, SPLIT_K)
    first = tl.program_id(2) * per
    last = tl.minimum(first + per, n_tiles)
    for kt in range(first, last):
        k0 = kt * BLOCK_K
        k = k0 + tl.arange(0, BLOCK_K)
        w = _int4_tile(
            qw_ptr,
            s_ptr,
            z_ptr,
            k0,
            pid_n,
            offs_n,
            n_mask,
            N,
            GROUP,
            stride_qw,
            stride_s,
            stride_z,
            AWQ,
            BLOCK_N,
            BLOCK_K,
        )
        if BLOCK_M == 1:
            xv = tl.load(x_ptr + pid_m.to(tl.int64) * stride_xm + k).to(tl.float32)
            acc += w * xv[:, None]
        else:
            xt = tl.load(
                x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + k[None, :],
                mask=m_mask[:, None],
                other=0.0,
            )
            if IEEE:
                acc += tl.dot(xt, w.to(xt.dtype), input_precision="ieee")
            else:
                acc += tl.dot(xt, w.to(xt.dtype))
    y_ptr += tl.program_id(2).to(tl.int64) * stride_ys  # this split's partial sums
    if BLOCK_M == 1:
        y = tl.sum(acc, axis=0)
        tl.store(
            y_ptr + pid_m.to(tl.int64) * stride_ym + offs_n,
            y.to(y_ptr.dtype.element_ty),
            mask=n_mask,
        )
    else:
        yp = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _gptq_gemv_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    y_ptr,
    N,
    K,
    GROUP,
    stride_xm,
    stride_qw,
    stride_s,
    stride_z,
    stride_ym,
    stride_ys,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """GPTQ, one x row per program: per tile (inside one group) sum_k q[k, n] x[k] and sum_k x[k]
    in fp32, then y[n] += s[n] (qx[n] - z[n] sx): only an unpack and an FMA per weight; the
    codes stay [BK / 8, 8, BN] (no register reshape)."""
    pid_n = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    i = tl.arange(0, BLOCK_K // 8)
    j = tl.arange(0, 8)
    shifts = j * 4
    zsh = (offs_n % 8) * 4
    x_row = x_ptr + row * stride_xm
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    n_tiles = K // BLOCK_K
    per = tl.cdiv(n_tiles, SPLIT_K)
    first = tl.program_id(2) * per
    last = tl.minimum(first + per, n_tiles)
    for kt in range(first, last):
        k0 = kt * BLOCK_K
        pw = tl.load(
            qw_ptr + (k0 // 8 + i).to(tl.int64)[:, None] * stride_qw + offs_n[None, :],
            mask=n_mask[None, :],
            other=0,
        )
        q = ((pw[:, None, :] >> shifts[None, :, None]) & 0xF).to(tl.float32)  # [BK/8, 8, BN]
        xv = tl.load(x_row + k0 + i[:, None] * 8 + j[None, :]).to(tl.float32)  # [BK/8, 8]
        qx = tl.sum(tl.sum(q * xv[:, :, None], axis=0), axis=0)
        sx = tl.sum(tl.sum(xv, axis=1), axis=0)
        g = k0 // GROUP
        sc = tl.load(s_ptr + g * stride_s + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        zp = tl.load(z_ptr + g * stride_z + offs_n // 8, mask=n_mask, other=0)
        z = (((zp >> zsh) & 0xF) + 1).to(tl.float32)
        acc += sc * (qx - z * sx)
    y_ptrs = y_ptr + tl.program_id(2).to(tl.int64) * stride_ys + row * stride_ym + offs_n
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _int4_dequant_kernel(
    qw_ptr,
    s_ptr,
    z_ptr,
    out_ptr,
    N,
    GROUP,
    stride_qw,
    stride_s,
    stride_z,
    stride_o,
    AWQ: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Grid (column tiles, row tiles): out [K, N] = dequant(W) in out's dtype."""
    pid_n = tl.program_id(0)
    k0 = tl.program_id(1) * BLOCK_K
    offs_n, n_mask = _tile_cols(pid_n, N, AWQ, BLOCK_N)
    w = _int4_tile(
        qw_ptr,
        s_ptr,
        z_ptr,
        k0,
        pid_n,
        offs_n,
        n_mask,
        N,
        GROUP,
        stride_qw,
        stride_s,
        stride_z,
        AWQ,
        BLOCK_N,
        BLOCK_K,
    )
    k = k0 + tl.arange(0, BLOCK_K)
    tl.store(
        out_ptr + k.to(tl.int64)[:, None] * stride_o + offs_n[None, :],
        w.to(out_ptr.dtype.element_ty),
        mask=n_mask[None, :],
    )


@triton.jit
def _awq_dequant_kernel(
    qw_ptr,
    s_ptr,
    z_ptr,
    out_ptr,
    N,
    GROUP,
    stride_qw,
    stride_s,
    stride_z,
    stride_o,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """AWQ dequantize kept 3-D ([k, packed column, nibble]): the interleaved column order goes
    straight into the store addresses instead of through a register reshape."""
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < N // 8
    j = tl.arange(0, 8)
    shifts = j * 4
    cols = offs_p[:, None] * 8 + ((j % 4) * 2 + j // 4)[None, :]  # [BP, 8] output columns
    k0 = tl.program_id(1) * BLOCK_K
    g = k0 // GROUP
    s = tl.load(s_ptr + g * stride_s + cols, mask=p_mask[:, None], other=0.0).to(tl.float32)
    zp = tl.load(z_ptr + g * stride_z + offs_p, mask=p_mask, other=0)
    z = (zp[:, None] >> shifts[None, :]) & 0xF
    k = k0 + tl.arange(0, BLOCK_K)
    pw = tl.load(
        qw_ptr + k.to(tl.int64)[:, None] * stride_qw + offs_p[None, :],
        mask=p_mask[None, :],
        other=0,
    )
    q = (pw[:, :, None] >> shifts[None, None, :]) & 0xF
    w = (q - z[None, :, :]).to(tl.float32) * s[None, :, :]
    tl.store(
        out_ptr + k.to(tl.int64)[:, None, None] * stride_o + cols[None, :, :],
        w.to(out_ptr.dtype.element_ty),
        mask=p_mask[None, :, None],
    )


# GPTQ at M = 1 through _gptq_gemv_kernel (False: the general kernel).
GPTQ_GEMV = True
# Above this many rows of x, int4_linear dequantizes to a scratch matrix and calls torch's GEMM.
FUSED_MAX_M = 64


# Programs a fused launch aims for: enough to keep every SM of an H100/H200 streaming.
_TARGET_PROGRAMS = 2048


def _split_k(programs: int, n_tiles: int) -> int:
    """K splits that bring ``programs`` up to about _TARGET_PROGRAMS (at least 4 tiles each)."""
    split = 1
    while programs * split * 2 <= _TARGET_PROGRAMS and n_tiles >= split * 2 * 4:
        split *= 2
    return split


def _fit_block_k(bk: int, group_size: int) -> int:
    while group_size % bk:
        bk //= 2
    if bk < 8:
        raise ValueError(f"INT4 group_size={group_size} has no power-of-2 tile of at least 8")
    return bk


def int4_dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    group_size: int,
    fmt: str,
    dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """dequant(W) as ``dtype`` [in_features, out_features] on qweight's device (Triton)."""
    _check_format(fmt)
    in_features = qweight.shape[0] * (1 if fmt == "awq" else 8)
    out_features = qweight.shape[1] * (8 if fmt == "awq" else 1)
    if out is None:
        out = torch.empty(in_features, out_features, device=qweight.device, dtype=dtype)
    bk = _fit_block_k(64, group_size)
    if fmt == "awq":
        bp = 8
        grid = (triton.cdiv(out_features // 8, bp), in_features // bk)
        _awq_dequant_kernel[grid](
            qweight,
            scales,
            qzeros,
            out,
            out_features,
            group_size,
            qweight.stride(0),
            scales.stride(0),
            qzeros.stride(0),
            out.stride(0),
            BLOCK_P=bp,
            BLOCK_K=bk,
            num_warps=4,
        )
        return out
    bn = 64
    grid = (triton.cdiv(out_features, bn), in_features // bk)
    _int4_dequant_kernel[grid](
        qweight,
        scales,
        qzeros,
        out,
        out_features,
        group_size,
        qweight.stride(0),
        scales.stride(0),
        qzeros.stride(0),
        out.stride(0),
        AWQ=False,
        BLOCK_N=bn,
        BLOCK_K=bk,
        num_warps=4,
    )
    return out


def _tiles(M: int, fmt: str) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps): the best of a small sweep on the H200 at
    Qwen2.5-7B shapes (K splits then fill the GPU for narrow outputs)."""
    if M == 1:
        return (1, 64, 128, 2) if fmt == "gptq" else (1, 16, 128, 2)
    if M <= 16:
        return 16, 64, 128, 4
    if M <= 64:
        return 64, 64, 128, 4
    return 64, 64, 128, 4


def int4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    fmt: str,
    out: torch.Tensor | None = None,
    fused_max_m: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """y = x @ dequant(qweight, scales, zeros) for an AWQ or GPTQ (desc_act=False) layer.

    x: [..., in_features] (fp32/fp16/bf16); ``zeros`` is the checkpoint's ``qzeros``. Returns
    [..., out_features] in x's dtype, accumulated in fp32. M <= ``fused_max_m`` (default
    FUSED_MAX_M) runs the fused kernel (GEMV for M = 1); larger M (prefill) dequantizes into a
    scratch matrix of x's dtype and calls torch's GEMM. No host syncs (graph-capturable).
    """
    _check_format(fmt)
    if qweight.dtype != torch.int32 or zeros.dtype != torch.int32:
        raise ValueError(
            f"INT4 {fmt}: qweight and qzeros must be int32, got {qweight.dtype}, {zeros.dtype}"
        )
    in_features = qweight.shape[0] * (1 if fmt == "awq" else 8)
    out_features = qweight.shape[1] * (8 if fmt == "awq" else 1)
    expect = int4_shapes(fmt, in_features, out_features, group_size)
    got = {
        "qweight": tuple(qweight.shape),
        "qzeros": tuple(zeros.shape),
        "scales": tuple(scales.shape),
    }
    if got != expect:
        raise ValueError(
            f"INT4 {fmt} group_size={group_size}: tensor shapes {got} do not match {expect}"
        )
    x2, y2, out = as_rows(x, in_features, out_features, out)
    M = x2.shape[0]
    if M == 0:
        return out
    if fused_max_m is None:
        # AWQ's dequantize kernel measured slow on the H200 (its interleaved columns): AWQ stays
        # on the fused kernel at every M until that is fixed.
        fused_max_m = FUSED_MAX_M if fmt == "gptq" else 1 << 62
    if M > fused_max_m:
        w = int4_dequantize(qweight, scales, zeros, group_size, fmt, dtype=x.dtype)
        torch.matmul(x2, w, out=y2)
        return out
    bm, bn, bk, warps = _tiles(M, fmt)
    bm, bn, bk, warps = block_m or bm, block_n or bn, block_k or bk, num_warps or warps
    bk = _fit_block_k(bk, group_size)
    programs = triton.cdiv(out_features, bn) * triton.cdiv(M, bm)
    split = split_k or _split_k(programs, in_features // bk)
    dst = (
        y2
        if split == 1
        else torch.empty(split, M, out_features, device=x.device, dtype=torch.float32)
    )
    grid = (triton.cdiv(out_features, bn), triton.cdiv(M, bm), split)
    if fmt == "gptq" and M == 1 and block_m in (None, 1) and GPTQ_GEMV:
        _gptq_gemv_kernel[grid](
            x2,
            qweight,
            scales,
            zeros,
            dst,
            out_features,
            in_features,
            group_size,
            x2.stride(0),
            qweight.stride(0),
            scales.stride(0),
            zeros.stride(0),
            dst.stride(-2),
            0 if split == 1 else dst.stride(0),
            BLOCK_N=bn,
            BLOCK_K=bk,
            SPLIT_K=split,
            num_warps=warps,
        )
    else:
        _int4_linear_kernel[grid](
            x2,
            qweight,
            scales,
            zeros,
            dst,
            M,
            out_features,
            in_features,
            group_size,
            x2.stride(0),
            qweight.stride(0),
            scales.stride(0),
            zeros.stride(0),
            dst.stride(-2),
            0 if split == 1 else dst.stride(0),
            AWQ=fmt == "awq",
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_K=bk,
            SPLIT_K=split,
            IEEE=x.dtype == torch.float32,
            num_warps=warps,
            num_stages=3,
        )
    if split > 1:
        y2.copy_(dst.sum(0))
    return out
