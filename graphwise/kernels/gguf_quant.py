"""GGUF weights kept packed: a torch reference dequantize and Triton GEMV/GEMM kernels that
dequantize the packed blocks on the fly (y = x @ dequant(W)^T).

A weight is the tensor's raw bytes as the GGUF file stores them: uint8 ``[rows, bytes_per_row]``
(``GGUFReader``'s ``tensor.data`` for a quantized type), each row a run of blocks. Layouts, as in
ggml-common.h and the ``gguf`` package's ``quants.py`` (all scales little-endian fp16):

| type | elements / bytes per block | block |
| --- | --- | --- |
| Q8_0 | 32 / 34  | d, 32 x int8 |
| Q4_0 | 32 / 18  | d, 16 bytes: element j < 16 is the low nibble of byte j, j >= 16 the high nibble of byte j-16; w = d (q - 8) |
| Q4_1 | 32 / 20  | d, m, 16 bytes as Q4_0; w = d q + m |
| Q4_K | 256 / 144 | d, dmin, 12 bytes of 6-bit (scale, min) for 8 sub-blocks of 32, 128 bytes: byte 32c + l holds sub-block 2c (low nibble) and 2c+1 (high) element l; w = d sc q - dmin m |
| Q5_K | 256 / 176 | as Q4_K with 32 bytes qh between scales and qs: bit s of qh[l] is the 5th bit of sub-block s element l |
| Q6_K | 256 / 210 | ql[128], qh[64], 16 int8 scales, d; element 128h + r: ql[64h + r%64] nibble r//64, qh[32h + r%32] bits 2(r//32); w = d scale[j//16] (q - 32) |

The kernels read the weight bytes in storage order and instead gather the matching columns of x
(small, cache resident), so no nibble shuffles are needed: each storage "plane" (low nibbles,
high nibbles) becomes a [rows, P] tile whose column j multiplies x[:, idx_j]. K is walked in
chunks of 256 elements (one super-block, or 8 legacy blocks).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from graphwise.kernels.linear_io import as_rows

# GGML type ids (gguf.GGMLQuantizationType values): name -> (id, elements, bytes) per block.
_QTYPES: dict[str, tuple[int, int, int]] = {
    "Q4_0": (2, 32, 18),
    "Q4_1": (3, 32, 20),
    "Q8_0": (8, 32, 34),
    "Q4_K": (12, 256, 144),
    "Q5_K": (13, 256, 176),
    "Q6_K": (14, 256, 210),
}
_BY_ID = {v[0]: k for k, v in _QTYPES.items()}
SUPPORTED_QTYPES = tuple(_QTYPES)
_CHUNK = 256  # K elements per kernel step


def qtype_name(qtype: object) -> str:
    """The canonical name ("Q4_K") of a qtype given as a name, a GGML id or a gguf enum."""
    name = getattr(qtype, "name", None)
    if isinstance(name, str) and name in _QTYPES:
        return name
    if isinstance(qtype, str) and qtype.upper() in _QTYPES:
        return qtype.upper()
    if isinstance(qtype, int) and qtype in _BY_ID:
        return _BY_ID[qtype]
    raise ValueError(
        f"GGUF quantization type {qtype!r} is not supported by the packed kernels "
        f"(supported: {', '.join(SUPPORTED_QTYPES)})"
    )


def block_shape(qtype: object) -> tuple[int, int]:
    """(elements, bytes) of one block of ``qtype``."""
    _, elems, nbytes = _QTYPES[qtype_name(qtype)]
    return elems, nbytes


def bytes_per_row(qtype: object, in_features: int) -> int:
    """Packed bytes of one weight row of ``in_features`` elements."""
    elems, nbytes = block_shape(qtype)
    if in_features <= 0 or in_features % elems:
        raise ValueError(
            f"in_features={in_features} is not a positive multiple of the "
            f"{qtype_name(qtype)} block size {elems}"
        )
    return in_features // elems * nbytes


# ----------------------------------------------------------------------------------------------
# torch reference: the same fp32 operations, in the same order, as gguf.quants.dequantize
# ----------------------------------------------------------------------------------------------


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] little-endian bytes -> [...] fp32 (via fp16)."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit (scale, min) pairs of Q4_K/Q5_K from their 12 bytes [n, 12] -> 2 x [n, 8]."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()


def _nibbles(q: torch.Tensor, group: int) -> torch.Tensor:
    """Bytes [n, G * group] -> [n, G, 2, group]: low nibbles then high nibbles of each group."""
    q = q.reshape(q.shape[0], -1, 1, group)
    return torch.cat([q & 0x0F, q >> 4], dim=2)


def _dequant_blocks(b: torch.Tensor, name: str) -> torch.Tensor:
    """Blocks uint8 [n, bytes] -> fp32 [n, elements]."""
    n = b.shape[0]
    if name == "Q8_0":
        return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b[:, 0:2])[:, None]
    if name in ("Q4_0", "Q4_1"):
        off = 2 if name == "Q4_0" else 4
        q = _nibbles(b[:, off:], 16).reshape(n, 32)
        d = _f16(b[:, 0:2])[:, None]
        if name == "Q4_0":
            return d * (q.to(torch.int8) - 8).float()
        return d * q.float() + _f16(b[:, 2:4])[:, None]
    if name in ("Q4_K", "Q5_K"):
        d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
        sc, mn = _k_scale_min(b[:, 4:16])
        ds = (d[:, None] * sc)[:, :, None]
        dm = (dmin[:, None] * mn)[:, :, None]
        if name == "Q4_K":
            q = _nibbles(b[:, 16:], 32).reshape(n, 8, 32)
        else:
            ql = _nibbles(b[:, 48:], 32).reshape(n, 8, 32)
            shifts = torch.arange(8, dtype=torch.uint8, device=b.device).view(1, 8, 1)
            qh = (b[:, 16:48].reshape(n, 1, 32) >> shifts) & 1
            q = ql | (qh << 4)
        return (ds * q.float() - dm).reshape(n, 256)
    if name == "Q6_K":
        ql = _nibbles(b[:, 0:128], 64).reshape(n, 8, 32)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).view(1, 1, 4, 1)
        qh = ((b[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 8, 32)
        q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
        scales = b[:, 192:208].contiguous().view(torch.int8).float()
        d = (_f16(b[:, 208:210])[:, None] * scales)[:, :, None]
        return (d * q).reshape(n, 256)
    raise AssertionError(name)


def dequantize(packed: torch.Tensor, qtype: object, in_features: int | None = None) -> torch.Tensor:
    """fp32 [rows, in_features] from the packed bytes uint8 [rows, bytes_per_row]; bit-identical
    to ``gguf.quants.dequantize``. ``in_features`` defaults to what the row length implies."""
    name = qtype_name(qtype)
    elems, nbytes = block_shape(name)
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(
            f"packed GGUF weight must be uint8 [rows, bytes], got {packed.dtype} {tuple(packed.shape)}"
        )
    if in_features is None:
        in_features = packed.shape[1] // nbytes * elems
    if packed.shape[1] != bytes_per_row(name, in_features):
        raise ValueError(
            f"packed {name} weight has {packed.shape[1]} bytes per row; in_features={in_features} "
            f"needs {bytes_per_row(name, in_features)}"
        )
    rows = packed.shape[0]
    blocks = packed.reshape(-1, nbytes)
    return _dequant_blocks(blocks, name).reshape(rows, in_features)


# ----------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------


@triton.jit
def _f16_at(ptrs, mask):
    """fp32 of the little-endian fp16 at byte pointers ``ptrs``."""
    lo = tl.load(ptrs, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptrs + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _kquant_scale_min(sb, n_mask, s):
    """6-bit (scale, min) of sub-blocks ``s`` [S] from the 12 scale bytes at ``sb`` [BN]."""
    ptr = sb[:, None]
    msk = n_mask[:, None]
    b_s = tl.load(ptr + s[None, :], mask=msk, other=0)  # bytes s (s < 8)
    b_s4 = tl.load(ptr + s[None, :] + 4, mask=msk, other=0)  # bytes s + 4
    b_sm4 = tl.load(ptr + tl.maximum(s - 4, 0)[None, :], mask=msk, other=0)
    low = (s < 4)[None, :]
    sc = tl.where(low, b_s & 0x3F, (b_s4 & 0x0F) | ((b_sm4 >> 2) & 0x30))
    mn = tl.where(low, b_s4 & 0x3F, (b_s4 >> 4) | ((b_s >> 2) & 0x30))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def _planes(w_rows, n_mask, chunk, K, KIND: tl.constexpr):
    """Dequantize one 256-element chunk of BLOCK_N rows as two planes in storage order.

    Returns (lo, cols_lo, hi, cols_hi): fp32 [BLOCK_N, G, S] values and int [G, S] weight
    columns (G * S = 128; columns >= K only past the end of a legacy row, values there 0).
    Q8_0: blocks 0-3 / 4-7 of the chunk; Q4_0/Q4_1: low / high nibbles of 8 blocks; Q4_K/Q5_K:
    even / odd sub-blocks; Q6_K: low / high nibbles of ql."""
    msk = n_mask[:, None, None]
    if KIND <= 2:
        BB: tl.constexpr = 34 if KIND == 0 else (18 if KIND == 1 else 20)
        G: tl.constexpr = 4 if KIND == 0 else 8
        nblk = K // 32
        g = tl.arange(0, G)
        if KIND == 0:
            j = tl.arange(0, 32)
            blk_lo = chunk * 8 + g
            blk_hi = blk_lo + 4
            gm_lo = n_mask[:, None] & (blk_lo < nblk)[None, :]
            gm_hi = n_mask[:, None] & (blk_hi < nblk)[None, :]
            base_lo = w_rows[:, None] + (blk_lo * BB)[None, :]
            base_hi = w_rows[:, None] + (blk_hi * BB)[None, :]
            q_lo = tl.load(
                base_lo[:, :, None] + 2 + j[None, None, :], mask=gm_lo[:, :, None], other=0
            )
            q_hi = tl.load(
                base_hi[:, :, None] + 2 + j[None, None, :], mask=gm_hi[:, :, None], other=0
            )
            lo = q_lo.to(tl.int8, bitcast=True).to(tl.float32) * _f16_at(base_lo, gm_lo)[:, :, None]
            hi = q_hi.to(tl.int8, bitcast=True).to(tl.float32) * _f16_at(base_hi, gm_hi)[:, :, None]
            cols_lo = blk_lo[:, None] * 32 + j[None, :]
            cols_hi = blk_hi[:, None] * 32 + j[None, :]
        else:
            QO: tl.constexpr = 2 if KIND == 1 else 4
            j = tl.arange(0, 16)
            blk = chunk * 8 + g
            gm = n_mask[:, None] & (blk < nblk)[None, :]
            base = w_rows[:, None] + (blk * BB)[None, :]
            d = _f16_at(base, gm)[:, :, None]
            q = tl.load(base[:, :, None] + QO + j[None, None, :], mask=gm[:, :, None], other=0)
            lo = (q & 0xF).to(tl.float32)
            hi = (q >> 4).to(tl.float32)
            if KIND == 1:
                lo = d * (lo - 8.0)
                hi = d * (hi - 8.0)
            else:
                m = _f16_at(base + 2, gm)[:, :, None]
                lo = d * lo + m
                hi = d * hi + m
            cols_lo = blk[:, None] * 32 + j[None, :]
            cols_hi = cols_lo + 16
    elif KIND == 5:
        base = w_rows + chunk * 210  # [BN]
        # ql byte 64h + t: element 128h + t (low nibble), 128h + 64 + t (high nibble)
        h = tl.arange(0, 2)
        t = tl.arange(0, 64)
        ql = tl.load(
            base[:, None, None] + (h[:, None] * 64 + t[None, :])[None, :, :], mask=msk, other=0
        )
        qh = tl.load(
            base[:, None, None] + 128 + (h[:, None] * 32 + t[None, :] % 32)[None, :, :],
            mask=msk,
            other=0,
        )
        shift = (t // 32) * 2
        q_lo = ((ql & 0xF) | (((qh >> shift[None, None, :]) & 3) << 4)).to(tl.float32) - 32.0
        q_hi = ((ql >> 4) | (((qh >> (shift + 4)[None, None, :]) & 3) << 4)).to(tl.float32) - 32.0
        d = _f16_at(base + 208, n_mask)[:, None, None]
        sidx = h[:, None] * 8 + (t // 16)[None, :]  # [2, 64] scale index of the low plane
        sc_lo = tl.load(base[:, None, None] + 192 + sidx[None, :, :], mask=msk, other=0)
        sc_hi = tl.load(base[:, None, None] + 196 + sidx[None, :, :], mask=msk, other=0)
        lo = (d * sc_lo.to(tl.int8, bitcast=True).to(tl.float32)) * q_lo
        hi = (d * sc_hi.to(tl.int8, bitcast=True).to(tl.float32)) * q_hi
        cols_lo = chunk * 256 + h[:, None] * 128 + t[None, :]
        cols_hi = cols_lo + 64
    else:
        BB: tl.constexpr = 144 if KIND == 3 else 176
        QS: tl.constexpr = 16 if KIND == 3 else 48
        base = w_rows + chunk * BB  # [BN]
        c = tl.arange(0, 4)
        el = tl.arange(0, 32)
        d = _f16_at(base, n_mask)[:, None]
        dmin = _f16_at(base + 2, n_mask)[:, None]
        sc_lo, mn_lo = _kquant_scale_min(base + 4, n_mask, c * 2)
        sc_hi, mn_hi = _kquant_scale_min(base + 4, n_mask, c * 2 + 1)
        q = tl.load(
            base[:, None, None] + QS + (c[:, None] * 32 + el[None, :])[None, :, :],
            mask=msk,
            other=0,
        )
        q_lo = q & 0xF
        q_hi = q >> 4
        if KIND == 4:
            qh = tl.load(
                base[:, None, None] + 16 + el[None, None, :], mask=msk, other=0
            )  # [BN,1,32]
            q_lo = q_lo | (((qh >> (c * 2)[None, :, None]) & 1) << 4)
            q_hi = q_hi | (((qh >> (c * 2 + 1)[None, :, None]) & 1) << 4)
        lo = (d * sc_lo)[:, :, None] * q_lo.to(tl.float32) - (dmin * mn_lo)[:, :, None]
        hi = (d * sc_hi)[:, :, None] * q_hi.to(tl.float32) - (dmin * mn_hi)[:, :, None]
        cols_lo = chunk * 256 + c[:, None] * 64 + el[None, :]
        cols_hi = cols_lo + 32
    return lo, cols_lo, hi, cols_hi


@triton.jit
def _plane_dot(
    acc, vals, cols, x_base, offs_m, M, stride_xm, K, BLOCK_N: tl.constexpr, IEEE: tl.constexpr
):
    """acc [BLOCK_M, BLOCK_N] += x[:, cols] @ vals^T for a [BLOCK_N, G, S] plane."""
    v = tl.reshape(vals, [BLOCK_N, 128])
    c = tl.reshape(cols, [128])
    xt = tl.load(
        x_base + offs_m[:, None] * stride_xm + c[None, :],
        mask=(offs_m < M)[:, None] & (c < K)[None, :],
        other=0.0,
    )
    if IEEE:
        acc += tl.dot(xt, tl.trans(v.to(xt.dtype)), input_precision="ieee")
    else:
        acc += tl.dot(xt, tl.trans(v.to(xt.dtype)))
    return acc


@triton.jit
def _split_range(K, SPLIT_K: tl.constexpr):
    """This program's chunks [first, last) when the 256-element chunks are split SPLIT_K ways."""
    n_chunks = tl.cdiv(K, 256)
    per = tl.cdiv(n_chunks, SPLIT_K)
    first = tl.program_id(2) * per
    return first, tl.minimum(first + per, n_chunks)


@triton.jit
def _gguf_gemv_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    stride_ys,
    KIND: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """Grid (row tiles, x rows, K splits). fp32 FMA into per-plane accumulators, reduced once;
    with SPLIT_K > 1, y is an fp32 [SPLIT_K, M, N] buffer of partial sums."""
    pid_n = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64) * stride_wn
    x_row = x_ptr + row * stride_xm
    G: tl.constexpr = 8 if (KIND == 1 or KIND == 2) else (2 if KIND == 5 else 4)
    acc_lo = tl.zeros([BLOCK_N, G, 128 // G], dtype=tl.float32)
    acc_hi = tl.zeros([BLOCK_N, G, 128 // G], dtype=tl.float32)
    first, last = _split_range(K, SPLIT_K)
    for chunk in range(first, last):
        lo, cl, hi, ch = _planes(w_rows, n_mask, chunk, K, KIND)
        acc_lo += lo * tl.load(x_row + cl, mask=cl < K, other=0.0).to(tl.float32)[None, :, :]
        acc_hi += hi * tl.load(x_row + ch, mask=ch < K, other=0.0).to(tl.float32)[None, :, :]
    y = tl.sum(tl.sum(acc_lo, axis=2), axis=1) + tl.sum(tl.sum(acc_hi, axis=2), axis=1)
    y_ptrs = y_ptr + tl.program_id(2).to(tl.int64) * stride_ys + row * stride_ym + offs_n
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _codes(w_rows, n_mask, chunk, K, KIND: tl.constexpr):
    """Like ``_planes`` for Q8_0/Q4_0/Q4_1/Q4_K/Q5_K, but undequantized: per plane the codes
    q [BN, G, S] (fp32) and the affine map of each group, value = a [BN, G] * q + b [BN, G]."""
    msk = n_mask[:, None, None]
    if KIND <= 2:
        BB: tl.constexpr = 34 if KIND == 0 else (18 if KIND == 1 else 20)
        G: tl.constexpr = 4 if KIND == 0 else 8
        nblk = K // 32
        g = tl.arange(0, G)
        if KIND == 0:
            j = tl.arange(0, 32)
            blk_lo = chunk * 8 + g
            blk_hi = blk_lo + 4
            gm_lo = n_mask[:, None] & (blk_lo < nblk)[None, :]
            gm_hi = n_mask[:, None] & (blk_hi < nblk)[None, :]
            base_lo = w_rows[:, None] + (blk_lo * BB)[None, :]
            base_hi = w_rows[:, None] + (blk_hi * BB)[None, :]
            q_lo = tl.load(
                base_lo[:, :, None] + 2 + j[None, None, :], mask=gm_lo[:, :, None], other=0
            )
            q_hi = tl.load(
                base_hi[:, :, None] + 2 + j[None, None, :], mask=gm_hi[:, :, None], other=0
            )
            q_lo = q_lo.to(tl.int8, bitcast=True).to(tl.float32)
            q_hi = q_hi.to(tl.int8, bitcast=True).to(tl.float32)
            a_lo = _f16_at(base_lo, gm_lo)
            a_hi = _f16_at(base_hi, gm_hi)
            b_lo = a_lo * 0.0
            b_hi = b_lo
            cols_lo = blk_lo[:, None] * 32 + j[None, :]
            cols_hi = blk_hi[:, None] * 32 + j[None, :]
        else:
            QO: tl.constexpr = 2 if KIND == 1 else 4
            j = tl.arange(0, 16)
            blk = chunk * 8 + g
            gm = n_mask[:, None] & (blk < nblk)[None, :]
            base = w_rows[:, None] + (blk * BB)[None, :]
            a_lo = _f16_at(base, gm)
            q = tl.load(base[:, :, None] + QO + j[None, None, :], mask=gm[:, :, None], other=0)
            q_lo = (q & 0xF).to(tl.float32)
            q_hi = (q >> 4).to(tl.float32)
            if KIND == 1:
                b_lo = a_lo * -8.0
            else:
                b_lo = _f16_at(base + 2, gm)
            a_hi = a_lo
            b_hi = b_lo
            cols_lo = blk[:, None] * 32 + j[None, :]
            cols_hi = cols_lo + 16
    else:
        BB: tl.constexpr = 144 if KIND == 3 else 176
        QS: tl.constexpr = 16 if KIND == 3 else 48
        base = w_rows + chunk * BB  # [BN]
        c = tl.arange(0, 4)
        el = tl.arange(0, 32)
        d = _f16_at(base, n_mask)[:, None]
        dmin = _f16_at(base + 2, n_mask)[:, None]
        sc_lo, mn_lo = _kquant_scale_min(base + 4, n_mask, c * 2)
        sc_hi, mn_hi = _kquant_scale_min(base + 4, n_mask, c * 2 + 1)
        q = tl.load(
            base[:, None, None] + QS + (c[:, None] * 32 + el[None, :])[None, :, :],
            mask=msk,
            other=0,
        )
        q_lo = q & 0xF
        q_hi = q >> 4
        if KIND == 4:
            qh = tl.load(base[:, None, None] + 16 + el[None, None, :], mask=msk, other=0)
            q_lo = q_lo | (((qh >> (c * 2)[None, :, None]) & 1) << 4)
            q_hi = q_hi | (((qh >> (c * 2 + 1)[None, :, None]) & 1) << 4)
        q_lo = q_lo.to(tl.float32)
        q_hi = q_hi.to(tl.float32)
        a_lo = d * sc_lo
        a_hi = d * sc_hi
        b_lo = -(dmin * mn_lo)
        b_hi = -(dmin * mn_hi)
        cols_lo = chunk * 256 + c[:, None] * 64 + el[None, :]
        cols_hi = cols_lo + 32
    return q_lo, a_lo, b_lo, cols_lo, q_hi, a_hi, b_hi, cols_hi


@triton.jit
def _gguf_gemv_grouped_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    stride_ys,
    KIND: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """GEMV for every format but Q6_K that applies each group's scale (and min) once:
    y += sum_g a_g sum_s q x + b_g sum_s x, so a weight costs an unpack and an FMA."""
    pid_n = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64) * stride_wn
    x_row = x_ptr + row * stride_xm
    G: tl.constexpr = 8 if (KIND == 1 or KIND == 2) else 4
    acc = tl.zeros([BLOCK_N, G], dtype=tl.float32)
    first, last = _split_range(K, SPLIT_K)
    for chunk in range(first, last):
        q_lo, a_lo, b_lo, cl, q_hi, a_hi, b_hi, ch = _codes(w_rows, n_mask, chunk, K, KIND)
        x_lo = tl.load(x_row + cl, mask=cl < K, other=0.0).to(tl.float32)
        x_hi = tl.load(x_row + ch, mask=ch < K, other=0.0).to(tl.float32)
        acc += a_lo * tl.sum(q_lo * x_lo[None, :, :], axis=2) + b_lo * tl.sum(x_lo, axis=1)[None, :]
        acc += a_hi * tl.sum(q_hi * x_hi[None, :, :], axis=2) + b_hi * tl.sum(x_hi, axis=1)[None, :]
    y = tl.sum(acc, axis=1)
    y_ptrs = y_ptr + tl.program_id(2).to(tl.int64) * stride_ys + row * stride_ym + offs_n
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _gguf_gemm_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    stride_ys,
    KIND: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64) * stride_wn
    x_base = x_ptr + (pid_m * BLOCK_M).to(tl.int64) * stride_xm
    offs_mr = tl.arange(0, BLOCK_M)  # rows relative to x_base
    m_left = M - pid_m * BLOCK_M
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    first, last = _split_range(K, SPLIT_K)
    for chunk in range(first, last):
        lo, cl, hi, ch = _planes(w_rows, n_mask, chunk, K, KIND)
        acc = _plane_dot(acc, lo, cl, x_base, offs_mr, m_left, stride_xm, K, BLOCK_N, IEEE)
        acc = _plane_dot(acc, hi, ch, x_base, offs_mr, m_left, stride_xm, K, BLOCK_N, IEEE)
    offs_m = pid_m * BLOCK_M + offs_mr
    y = y_ptr + tl.program_id(2).to(tl.int64) * stride_ys
    y += offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & n_mask[None, :])


@triton.jit
def _gguf_dequant_kernel(
    w_ptr, out_ptr, N, K, stride_wn, stride_on, KIND: tl.constexpr, BLOCK_N: tl.constexpr
):
    """Grid (row tiles, 256-element chunks): write dequant(W) in out's dtype."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64) * stride_wn
    out_rows = (out_ptr + offs_n.to(tl.int64) * stride_on)[:, None, None]
    lo, cl, hi, ch = _planes(w_rows, n_mask, tl.program_id(1), K, KIND)
    dt = out_ptr.dtype.element_ty
    tl.store(
        out_rows + cl[None, :, :], lo.to(dt), mask=n_mask[:, None, None] & (cl < K)[None, :, :]
    )
    tl.store(
        out_rows + ch[None, :, :], hi.to(dt), mask=n_mask[:, None, None] & (ch < K)[None, :, :]
    )


_KIND = {"Q8_0": 0, "Q4_0": 1, "Q4_1": 2, "Q4_K": 3, "Q5_K": 4, "Q6_K": 5}
# Above this many rows of x, gguf_linear dequantizes to a scratch matrix and calls torch's GEMM
# (cuBLAS): the fused kernel re-dequantizes each weight tile for every M tile.
FUSED_MAX_M = 16
# M = 1 through _gguf_gemv_grouped_kernel (scales applied once per group, the trick that made
# GPTQ's GEMV 1.35x faster than bf16) for all but Q6_K. Off until measured on a GPU: it passes
# the interpreter tests, but its H200 A/B run was lost (scripts/quant_kernel_bench.py
# --grouped-gemv against the default).
GROUPED_GEMV = False
# Programs a fused launch aims for: enough to keep every SM of an H100/H200 streaming.
_TARGET_PROGRAMS = 2048


def _split_k(programs: int, n_chunks: int) -> int:
    """K splits that bring ``programs`` up to about _TARGET_PROGRAMS (at least 4 chunks each)."""
    split = 1
    while programs * split * 2 <= _TARGET_PROGRAMS and n_chunks >= split * 2 * 4:
        split *= 2
    return split


def _check(packed: torch.Tensor, name: str, out_features: int, in_features: int) -> None:
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.stride(1) != 1:
        raise ValueError(
            f"packed GGUF weight must be a row-contiguous uint8 matrix, got {packed.dtype} "
            f"{tuple(packed.shape)}"
        )
    if tuple(packed.shape) != (out_features, bytes_per_row(name, in_features)):
        raise ValueError(
            f"packed {name} weight is {tuple(packed.shape)}; expected "
            f"({out_features}, {bytes_per_row(name, in_features)}) for {out_features}x{in_features}"
        )


def gguf_dequantize(
    packed: torch.Tensor,
    qtype: object,
    out_features: int,
    in_features: int,
    dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
    block_n: int = 8,
) -> torch.Tensor:
    """dequant(packed) as ``dtype`` [out_features, in_features], on packed's device (Triton)."""
    name = qtype_name(qtype)
    _check(packed, name, out_features, in_features)
    if out is None:
        out = torch.empty(out_features, in_features, device=packed.device, dtype=dtype)
    grid = (triton.cdiv(out_features, block_n), triton.cdiv(in_features, _CHUNK))
    _gguf_dequant_kernel[grid](
        packed,
        out,
        out_features,
        in_features,
        packed.stride(0),
        out.stride(0),
        KIND=_KIND[name],
        BLOCK_N=block_n,
        num_warps=4,
    )
    return out


def gguf_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    qtype: object,
    out_features: int,
    in_features: int,
    out: torch.Tensor | None = None,
    fused_max_m: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """y = x @ dequant(packed)^T, reading the packed bytes directly.

    x: [..., in_features] (fp32/fp16/bf16, last axis contiguous); packed: uint8
    [out_features, bytes_per_row(qtype, in_features)] on x's device. Returns [..., out_features]
    in x's dtype, accumulated in fp32. M = 1: the GEMV kernel (FMA, one x row per program);
    1 < M <= ``fused_max_m`` (default FUSED_MAX_M): the fused tl.dot kernel; larger M (prefill):
    dequantize into a scratch matrix of x's dtype, then ``torch.matmul``. Narrow outputs split K
    (fp32 partial sums added by torch). Every choice depends on shapes only, so every path can
    be captured in a CUDA graph.
    """
    name = qtype_name(qtype)
    _check(packed, name, out_features, in_features)
    x2, y2, out = as_rows(x, in_features, out_features, out)
    M = x2.shape[0]
    if M == 0:
        return out
    kind = _KIND[name]
    if M > (FUSED_MAX_M if fused_max_m is None else fused_max_m):
        w = gguf_dequantize(packed, name, out_features, in_features, dtype=x.dtype)
        torch.matmul(x2, w.t(), out=y2)
        return out
    gemv = M == 1 and block_m in (None, 1)
    bm = 1 if gemv else (block_m or 16)
    bn = block_n or (8 if gemv else 64)
    programs = triton.cdiv(out_features, bn) * triton.cdiv(M, bm)
    split = split_k or _split_k(programs, triton.cdiv(in_features, _CHUNK))
    dst = (
        y2
        if split == 1
        else torch.empty(split, M, out_features, device=x.device, dtype=torch.float32)
    )
    stride_ys = 0 if split == 1 else dst.stride(0)
    grid = (triton.cdiv(out_features, bn), triton.cdiv(M, bm), split)
    if gemv and GROUPED_GEMV and kind != _KIND["Q6_K"]:
        _gguf_gemv_grouped_kernel[grid](
            x2,
            packed,
            dst,
            out_features,
            in_features,
            x2.stride(0),
            packed.stride(0),
            dst.stride(-2),
            stride_ys,
            KIND=kind,
            BLOCK_N=bn,
            SPLIT_K=split,
            num_warps=num_warps or 4,
        )
    elif gemv:
        _gguf_gemv_kernel[grid](
            x2,
            packed,
            dst,
            out_features,
            in_features,
            x2.stride(0),
            packed.stride(0),
            dst.stride(-2),
            stride_ys,
            KIND=kind,
            BLOCK_N=bn,
            SPLIT_K=split,
            num_warps=num_warps or 4,
        )
    else:
        _gguf_gemm_kernel[grid](
            x2,
            packed,
            dst,
            M,
            out_features,
            in_features,
            x2.stride(0),
            packed.stride(0),
            dst.stride(-2),
            stride_ys,
            KIND=kind,
            BLOCK_M=bm,
            BLOCK_N=bn,
            SPLIT_K=split,
            IEEE=x.dtype == torch.float32,
            num_warps=num_warps or 4,
            num_stages=2,
        )
    if split > 1:
        y2.copy_(dst.sum(0))
    return out


def random_packed(
    qtype: object, rows: int, in_features: int, device: torch.device | str = "cpu", seed: int = 0
) -> torch.Tensor:
    """Random packed blocks with every fp16 scale field finite and small (tests, benchmarks):
    random bytes everywhere else exercise every bit of the quants and sub-block scales."""
    name = qtype_name(qtype)
    elems, nbytes = block_shape(name)
    g = torch.Generator(device="cpu").manual_seed(seed)
    nblk = rows * (in_features // elems)
    b = torch.randint(0, 256, (nblk, nbytes), generator=g, dtype=torch.uint8)
    scale = 0.05 if elems == 32 else 0.002  # K-quants multiply d by a 6/8-bit sub-scale
    offsets = {
        "Q8_0": (0,),
        "Q4_0": (0,),
        "Q4_1": (0, 2),
        "Q4_K": (0, 2),
        "Q5_K": (0, 2),
        "Q6_K": (208,),
    }
    for off in offsets[name]:
        f = (torch.randn(nblk, generator=g) * scale).to(torch.float16)
        b[:, off : off + 2] = f.view(torch.uint8).view(nblk, 2)
    return b.reshape(rows, -1).to(device)
