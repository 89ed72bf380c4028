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
    AWQ: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    # bit position of each output column inside its packed int32 (qzeros; AWQ's qweight too)
    if AWQ:
        o = offs_n % 8
        col_shift = (o // 2 + 4 * (o % 2)) * 4
    else:
        col_shift = (offs_n % 8) * 4
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    if BLOCK_M == 1:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        g = k0 // GROUP  # BLOCK_K divides GROUP: one group per tile
        s = tl.load(s_ptr + g * stride_s + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        zp = tl.load(z_ptr + g * stride_z + offs_n // 8, mask=n_mask, other=0)
        z = (zp >> col_shift) & 0xF
        if not AWQ:
            z = z + 1
        if AWQ:
            pw = tl.load(
                qw_ptr + k.to(tl.int64)[:, None] * stride_qw + (offs_n // 8)[None, :],
                mask=n_mask[None, :],
                other=0,
            )
            q = (pw >> col_shift[None, :]) & 0xF
        else:
            pw = tl.load(
                qw_ptr + (k // 8).to(tl.int64)[:, None] * stride_qw + offs_n[None, :],
                mask=n_mask[None, :],
                other=0,
            )
            q = (pw >> ((k % 8) * 4)[:, None]) & 0xF
        w = (q - z[None, :]).to(tl.float32) * s[None, :]  # [BLOCK_K, BLOCK_N]
        if BLOCK_M == 1:
            xv = tl.load(x_ptr + pid_m.to(tl.int64) * stride_xm + k).to(tl.float32)
            acc += tl.sum(w * xv[:, None], axis=0)
        else:
            xt = tl.load(x_rows + k[None, :], mask=m_mask[:, None], other=0.0)
            if IEEE:
                acc += tl.dot(xt, w.to(xt.dtype), input_precision="ieee")
            else:
                acc += tl.dot(xt, w.to(xt.dtype))
    if BLOCK_M == 1:
        tl.store(
            y_ptr + pid_m.to(tl.int64) * stride_ym + offs_n,
            acc.to(y_ptr.dtype.element_ty),
            mask=n_mask,
        )
    else:
        y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _tiles(M: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps)."""
    if M == 1:
        return 1, 32, 128, 4
    if M <= 16:
        return 16, 64, 128, 4
    if M <= 64:
        return 64, 64, 64, 4
    return 128, 128, 64, 8


def int4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    fmt: str,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """y = x @ dequant(qweight, scales, zeros) for an AWQ or GPTQ (desc_act=False) layer.

    x: [..., in_features] (fp32/fp16/bf16); ``zeros`` is the checkpoint's ``qzeros``. Returns
    [..., out_features] in x's dtype, accumulated in fp32. No host syncs (graph-capturable).
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
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {in_features}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if out is None:
        out = torch.empty(*lead, out_features, device=x.device, dtype=x.dtype)
    y2 = out.view(-1, out_features)
    if M == 0:
        return out
    bm, bn, bk, warps = _tiles(M)
    bm, bn, bk, warps = block_m or bm, block_n or bn, block_k or bk, num_warps or warps
    while group_size % bk:
        bk //= 2
    if bk < 8:
        raise ValueError(f"INT4 group_size={group_size} has no power-of-2 tile of at least 8")
    grid = (triton.cdiv(out_features, bn), triton.cdiv(M, bm))
    _int4_linear_kernel[grid](
        x2,
        qweight,
        scales,
        zeros,
        y2,
        M,
        out_features,
        in_features,
        group_size,
        x2.stride(0),
        qweight.stride(0),
        scales.stride(0),
        zeros.stride(0),
        y2.stride(0),
        AWQ=fmt == "awq",
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        IEEE=x.dtype == torch.float32,
        num_warps=warps,
        num_stages=3,
    )
    return out
