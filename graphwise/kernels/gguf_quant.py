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
def _acc_plane(
    acc, vals, cols, x_ptr, offs_m, M, stride_xm, K, n_mask, MODE: tl.constexpr, IEEE: tl.constexpr
):
    """Consume one plane: vals fp32 [BLOCK_N, P] whose column j is weight column ``cols[j]``.

    MODE 0 (GEMV, one x row): acc [BLOCK_N, P] += vals * x[cols] (reduced once at the end);
    MODE 1 (GEMM): acc [BLOCK_M, BLOCK_N] += x[:, cols] @ vals^T;
    MODE 2 (dequantize): store vals at ``x_ptr`` [BLOCK_N] (row pointers) + cols.
    """
    if MODE == 0:
        xv = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
        acc += vals * xv[None, :]
    elif MODE == 1:
        xt = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + cols[None, :],
            mask=(offs_m < M)[:, None] & (cols < K)[None, :],
            other=0.0,
        )
        w = tl.trans(vals.to(xt.dtype))
        if IEEE:
            acc += tl.dot(xt, w, input_precision="ieee")
        else:
            acc += tl.dot(xt, w)
    else:
        ptrs = x_ptr[:, None] + cols[None, :]
        tl.store(ptrs, vals.to(x_ptr.dtype.element_ty), mask=n_mask[:, None] & (cols < K)[None, :])
    return acc


@triton.jit
def _legacy_step(
    acc,
    w_rows,
    n_mask,
    chunk,
    K,
    x_ptr,
    offs_m,
    M,
    stride_xm,
    KIND: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    """8 blocks of 32 (Q8_0 = 0, Q4_0 = 1, Q4_1 = 2) from block ``chunk * 8``; blocks past
    the row's end are masked (K need only be a multiple of 32)."""
    BB: tl.constexpr = 34 if KIND == 0 else (18 if KIND == 1 else 20)
    nblk = K // 32
    if KIND == 0:
        j = tl.arange(0, 32)
        for half in tl.static_range(2):
            hb = chunk * 8 + half * 4 + tl.arange(0, 4)
            hmask = n_mask[:, None] & (hb < nblk)[None, :]
            hbase = w_rows[:, None] + (hb * BB)[None, :]
            dh = _f16_at(hbase, hmask)
            q = tl.load(hbase[:, :, None] + 2 + j[None, None, :], mask=hmask[:, :, None], other=0)
            v = q.to(tl.int8, bitcast=True).to(tl.float32) * dh[:, :, None]
            cols = (hb[:, None] * 32 + j[None, :]).reshape(128)
            acc = _acc_plane(
                acc,
                v.reshape(BLOCK_N, 128),
                cols,
                x_ptr,
                offs_m,
                M,
                stride_xm,
                K,
                n_mask,
                MODE,
                IEEE,
            )
    else:
        QO: tl.constexpr = 2 if KIND == 1 else 4
        blk = chunk * 8 + tl.arange(0, 8)
        gmask = n_mask[:, None] & (blk < nblk)[None, :]
        base = w_rows[:, None] + (blk * BB)[None, :]  # [BN, 8] byte offset of each block
        d = _f16_at(base, gmask)
        j = tl.arange(0, 16)
        q = tl.load(base[:, :, None] + QO + j[None, None, :], mask=gmask[:, :, None], other=0)
        lo = (q & 0xF).to(tl.float32)
        hi = (q >> 4).to(tl.float32)
        if KIND == 1:
            lo = d[:, :, None] * (lo - 8.0)
            hi = d[:, :, None] * (hi - 8.0)
        else:
            m = _f16_at(base + 2, gmask)
            lo = d[:, :, None] * lo + m[:, :, None]
            hi = d[:, :, None] * hi + m[:, :, None]
        cols = (blk[:, None] * 32 + j[None, :]).reshape(128)
        acc = _acc_plane(
            acc, lo.reshape(BLOCK_N, 128), cols, x_ptr, offs_m, M, stride_xm, K, n_mask, MODE, IEEE
        )
        acc = _acc_plane(
            acc,
            hi.reshape(BLOCK_N, 128),
            cols + 16,
            x_ptr,
            offs_m,
            M,
            stride_xm,
            K,
            n_mask,
            MODE,
            IEEE,
        )
    return acc


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
def _kquant_step(
    acc,
    w_rows,
    n_mask,
    chunk,
    K,
    x_ptr,
    offs_m,
    M,
    stride_xm,
    KIND: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    """One super-block of 256 (Q4_K = 3, Q5_K = 4, Q6_K = 5)."""
    BB: tl.constexpr = 144 if KIND == 3 else (176 if KIND == 4 else 210)
    base = w_rows + chunk * BB  # [BN]
    k0 = chunk * 256
    msk = n_mask[:, None, None]
    if KIND == 5:
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
        shift = (t // 32) * 2  # [64]
        qh_lo = (qh >> shift[None, None, :]) & 3
        qh_hi = (qh >> (shift + 4)[None, None, :]) & 3
        q_lo = ((ql & 0xF) | (qh_lo << 4)).to(tl.float32) - 32.0
        q_hi = ((ql >> 4) | (qh_hi << 4)).to(tl.float32) - 32.0
        d = _f16_at(base + 208, n_mask)  # [BN]
        sidx = h[:, None] * 8 + (t // 16)[None, :]  # [2, 64] scale index of the low plane
        sc_lo = tl.load(base[:, None, None] + 192 + sidx[None, :, :], mask=msk, other=0)
        sc_hi = tl.load(base[:, None, None] + 196 + sidx[None, :, :], mask=msk, other=0)
        ds_lo = d[:, None, None] * sc_lo.to(tl.int8, bitcast=True).to(tl.float32)
        ds_hi = d[:, None, None] * sc_hi.to(tl.int8, bitcast=True).to(tl.float32)
        cols = k0 + (h[:, None] * 128 + t[None, :]).reshape(128)
        acc = _acc_plane(
            acc,
            (ds_lo * q_lo).reshape(BLOCK_N, 128),
            cols,
            x_ptr,
            offs_m,
            M,
            stride_xm,
            K,
            n_mask,
            MODE,
            IEEE,
        )
        acc = _acc_plane(
            acc,
            (ds_hi * q_hi).reshape(BLOCK_N, 128),
            cols + 64,
            x_ptr,
            offs_m,
            M,
            stride_xm,
            K,
            n_mask,
            MODE,
            IEEE,
        )
    else:
        QS: tl.constexpr = 16 if KIND == 3 else 48
        c = tl.arange(0, 4)
        el = tl.arange(0, 32)
        d = _f16_at(base, n_mask)
        dmin = _f16_at(base + 2, n_mask)
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
        v_lo = (d[:, None] * sc_lo)[:, :, None] * q_lo.to(tl.float32) - (dmin[:, None] * mn_lo)[
            :, :, None
        ]
        v_hi = (d[:, None] * sc_hi)[:, :, None] * q_hi.to(tl.float32) - (dmin[:, None] * mn_hi)[
            :, :, None
        ]
        cols = k0 + (c[:, None] * 64 + el[None, :]).reshape(128)
        acc = _acc_plane(
            acc,
            v_lo.reshape(BLOCK_N, 128),
            cols,
            x_ptr,
            offs_m,
            M,
            stride_xm,
            K,
            n_mask,
            MODE,
            IEEE,
        )
        acc = _acc_plane(
            acc,
            v_hi.reshape(BLOCK_N, 128),
            cols + 32,
            x_ptr,
            offs_m,
            M,
            stride_xm,
            K,
            n_mask,
            MODE,
            IEEE,
        )
    return acc


@triton.jit
def _step(
    acc,
    w_rows,
    n_mask,
    chunk,
    K,
    x_ptr,
    offs_m,
    M,
    stride_xm,
    KIND: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    if KIND <= 2:
        acc = _legacy_step(
            acc, w_rows, n_mask, chunk, K, x_ptr, offs_m, M, stride_xm, KIND, MODE, BLOCK_N, IEEE
        )
    else:
        acc = _kquant_step(
            acc, w_rows, n_mask, chunk, K, x_ptr, offs_m, M, stride_xm, KIND, MODE, BLOCK_N, IEEE
        )
    return acc


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
    KIND: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    """One x row per program (grid axis 1), BLOCK_N weight rows; fp32 FMA, one reduction."""
    pid_n = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64) * stride_wn
    x_row = x_ptr + row * stride_xm
    acc = tl.zeros([BLOCK_N, 128], dtype=tl.float32)
    for chunk in range(0, tl.cdiv(K, 256)):
        acc = _step(acc, w_rows, n_mask, chunk, K, x_row, offs_n, 1, 0, KIND, 0, BLOCK_N, IEEE)
    y = tl.sum(acc, axis=1)
    tl.store(y_ptr + row * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)


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
    KIND: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
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
    for chunk in range(0, tl.cdiv(K, 256)):
        acc = _step(
            acc,
            w_rows,
            n_mask,
            chunk,
            K,
            x_base,
            offs_mr,
            m_left,
            stride_xm,
            KIND,
            1,
            BLOCK_N,
            IEEE,
        )
    offs_m = pid_m * BLOCK_M + offs_mr
    y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & n_mask[None, :])


@triton.jit
def _gguf_dequant_kernel(
    w_ptr, out_ptr, N, K, stride_wn, stride_on, KIND: tl.constexpr, BLOCK_N: tl.constexpr
):
    """Grid (row tiles, 256-element chunks): write dequant(W) in out's dtype."""
    pid_n = tl.program_id(0)
    chunk = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64) * stride_wn
    out_rows = out_ptr + offs_n.to(tl.int64) * stride_on
    _step(0.0, w_rows, n_mask, chunk, K, out_rows, offs_n, 0, 0, KIND, 2, BLOCK_N, False)


_KIND = {"Q8_0": 0, "Q4_0": 1, "Q4_1": 2, "Q4_K": 3, "Q5_K": 4, "Q6_K": 5}
# Above this many rows of x, gguf_linear dequantizes to a scratch matrix and calls torch's GEMM
# (cuBLAS): the fused kernel re-dequantizes each weight tile for every M tile.
FUSED_MAX_M = 16


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
    block_n: int = 16,
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
) -> torch.Tensor:
    """y = x @ dequant(packed)^T, reading the packed bytes directly.

    x: [..., in_features] (fp32/fp16/bf16, last axis contiguous); packed: uint8
    [out_features, bytes_per_row(qtype, in_features)] on x's device. Returns [..., out_features]
    in x's dtype, accumulated in fp32. M = 1: the GEMV kernel (FMA, one x row per program);
    1 < M <= ``fused_max_m`` (default FUSED_MAX_M): the fused tl.dot kernel; larger M (prefill):
    dequantize into a scratch matrix of x's dtype, then ``F.linear``. The M-dependent choice is
    made from shapes only, so every path can be captured in a CUDA graph.
    """
    name = qtype_name(qtype)
    _check(packed, name, out_features, in_features)
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
    kind = _KIND[name]
    ieee = x.dtype == torch.float32
    if M > (FUSED_MAX_M if fused_max_m is None else fused_max_m):
        w = gguf_dequantize(packed, name, out_features, in_features, dtype=x.dtype)
        torch.matmul(x2, w.t(), out=y2)
        return out
    if M == 1 and block_m in (None, 1):
        bn = block_n or 8
        grid = (triton.cdiv(out_features, bn), 1)
        _gguf_gemv_kernel[grid](
            x2,
            packed,
            y2,
            out_features,
            in_features,
            x2.stride(0),
            packed.stride(0),
            y2.stride(0),
            KIND=kind,
            BLOCK_N=bn,
            IEEE=ieee,
            num_warps=num_warps or 4,
        )
        return out
    bm = block_m or 16
    bn = block_n or 32
    grid = (triton.cdiv(out_features, bn), triton.cdiv(M, bm))
    _gguf_gemm_kernel[grid](
        x2,
        packed,
        y2,
        M,
        out_features,
        in_features,
        x2.stride(0),
        packed.stride(0),
        y2.stride(0),
        KIND=kind,
        BLOCK_M=bm,
        BLOCK_N=bn,
        IEEE=ieee,
        num_warps=num_warps or 4,
        num_stages=2,
    )
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
