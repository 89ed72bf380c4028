"""INT4 (AWQ, GPTQ) packed weights: the unpacking against the formats' own packing loops, and
the Triton kernel against an fp32 dequantize-then-matmul.

The packing loops below restate, element by element, what AutoAWQ (``WQLinear_GEMM.from_linear``:
column ``8p + order[j]`` into bits ``4j``, order 0 2 4 6 1 3 5 7) and AutoGPTQ
(``QuantLinear.pack``: input rows ``8i + j`` into bits ``4j``; ``zeros -= 1`` before packing the
zero points in plain column order) write; they do not share code with ``int4_quant``.
Tolerances (relative to max |reference|): fp32 interpreter 1e-5; bf16 on a GPU 1.5e-2.
"""

from __future__ import annotations

import pytest
import torch

iq = pytest.importorskip("graphwise.kernels.int4_quant", reason="triton is not installed")


def _u32_to_i32(v: int) -> int:
    return v - (1 << 32) if v >= 1 << 31 else v


def awq_pack_loop(w: torch.Tensor) -> torch.Tensor:
    """AutoAWQ: int [rows, cols] -> int32 [rows, cols / 8]."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    rows, cols = w.shape
    out = torch.zeros(rows, cols // 8, dtype=torch.int32)
    for r in range(rows):
        for p in range(cols // 8):
            v = 0
            for j in range(8):
                v |= int(w[r, 8 * p + order[j]]) << (4 * j)
            out[r, p] = _u32_to_i32(v)
    return out


def gptq_pack_loop(codes: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoGPTQ v1: codes [in, out] -> qweight [in / 8, out]; zeros [g, out] -> qzeros [g, out / 8]."""
    k, n = codes.shape
    qweight = torch.zeros(k // 8, n, dtype=torch.int32)
    for i in range(k // 8):
        for c in range(n):
            v = 0
            for j in range(8):
                v |= int(codes[8 * i + j, c]) << (4 * j)
            qweight[i, c] = _u32_to_i32(v)
    stored = zeros - 1
    qzeros = torch.zeros(zeros.shape[0], n // 8, dtype=torch.int32)
    for g in range(zeros.shape[0]):
        for p in range(n // 8):
            v = 0
            for j in range(8):
                v |= int(stored[g, 8 * p + j]) << (4 * j)
            qzeros[g, p] = _u32_to_i32(v)
    return qweight, qzeros


def _random_codes(k, n, gs, lo):
    codes = torch.randint(0, 16, (k, n))
    zeros = torch.randint(lo, lo + 16, (k // gs, n))
    scales = torch.rand(k // gs, n) * 0.01 + 0.001
    return codes, zeros, scales


def test_awq_unpack_matches_autoawq_packing():
    codes, zeros, scales = _random_codes(64, 32, 32, 0)
    qweight, qzeros = awq_pack_loop(codes), awq_pack_loop(zeros)
    got_codes, got_zeros = iq.unpack_codes(qweight, qzeros, "awq")
    assert torch.equal(got_codes, codes.int()) and torch.equal(got_zeros, zeros.int())
    w = iq.dequantize(qweight, scales, qzeros, 32, "awq")
    ref = (codes - zeros.repeat_interleave(32, 0)).float() * scales.repeat_interleave(32, 0)
    assert torch.equal(w, ref)
    p_w, p_z = iq.pack_codes(codes, zeros, "awq")
    assert torch.equal(p_w, qweight) and torch.equal(p_z, qzeros)


def test_gptq_unpack_matches_autogptq_packing():
    codes, zeros, scales = _random_codes(64, 32, 32, 1)  # zero points 1..16 (stored 0..15)
    qweight, qzeros = gptq_pack_loop(codes, zeros)
    got_codes, got_zeros = iq.unpack_codes(qweight, qzeros, "gptq")
    assert torch.equal(got_codes, codes.int()) and torch.equal(got_zeros, zeros.int())
    p_w, p_z = iq.pack_codes(codes, zeros, "gptq")
    assert torch.equal(p_w, qweight) and torch.equal(p_z, qzeros)


def test_gptq_symmetric_zero_point_is_eight():
    """A symmetric AutoGPTQ export stores 0x77777777 in every qzeros word: zero point 8."""
    qzeros = torch.full((2, 4), 0x77777777, dtype=torch.int32)
    qweight = torch.zeros(32, 32, dtype=torch.int32)  # every code 0
    scales = torch.full((2, 32), 0.5)
    w = iq.dequantize(qweight, scales, qzeros, 128, "gptq")
    assert torch.equal(w, torch.full((256, 32), -4.0))


def test_int4_errors():
    qw, s, qz = iq.random_int4("gptq", 32, 256, 128)
    with pytest.raises(ValueError, match="act-order"):
        iq.check_gptq_g_idx(torch.arange(256).flip(0) // 128, 256, 128)
    iq.check_gptq_g_idx(torch.arange(256, dtype=torch.int32) // 128, 256, 128)
    with pytest.raises(ValueError, match="not supported"):
        iq.int4_linear(torch.randn(1, 256), qw, s, qz, 128, "marlin")
    with pytest.raises(ValueError, match="do not match"):
        iq.int4_linear(torch.randn(1, 256), qw, s, qz, 64, "gptq")
    with pytest.raises(ValueError, match="features"):
        iq.int4_linear(torch.randn(1, 128), qw, s, qz, 128, "gptq")


@pytest.mark.parametrize("fmt", ["awq", "gptq"])
@pytest.mark.parametrize("gs,k,n", [(128, 256, 48), (32, 96, 40)])
@pytest.mark.parametrize("m,fused_max_m", [(1, None), (5, None), (70, 128), (70, None)])
def test_int4_linear_interpreter(kern, fmt, gs, k, n, m, fused_max_m):
    """GEMV (M=1), fused tl.dot (M=5; M=70 forced), dequantize + matmul (M=70)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    qw, s, qz = iq.random_int4(fmt, n, k, gs, device, seed=m, dtype=torch.float32)
    w = iq.dequantize(qw, s, qz, gs, fmt)
    assert torch.equal(iq.int4_dequantize(qw, s, qz, gs, fmt, dtype=torch.float32), w)
    x = torch.randn(m, k, device=device)
    got = iq.int4_linear(x, qw, s, qz, gs, fmt, fused_max_m=fused_max_m)
    ref = x.double() @ w.double()
    err = (got.double() - ref).abs().max() / ref.abs().max()
    assert got.shape == (m, n) and err < 1e-5, err


@pytest.mark.parametrize("fmt", ["awq", "gptq"])
@pytest.mark.parametrize("m,split", [(1, 3), (6, 2)])
def test_int4_linear_split_k_interpreter(kern, fmt, m, split):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    qw, s, qz = iq.random_int4(fmt, 32, 256, 32, device, seed=split, dtype=torch.float32)
    w = iq.dequantize(qw, s, qz, 32, fmt)
    x = torch.randn(m, 256, device=device)
    got = iq.int4_linear(x, qw, s, qz, 32, fmt, block_k=32, split_k=split)
    ref = x.double() @ w.double()
    err = (got.double() - ref).abs().max() / ref.abs().max()
    assert err < 1e-5, err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt", ["awq", "gptq"])
@pytest.mark.parametrize("n,k", [(4096, 4096), (14336, 4096), (4096, 14336)])
def test_int4_linear_gpu(fmt, n, k):
    qw, s, qz = iq.random_int4(fmt, n, k, 128, "cuda", dtype=torch.float16)
    w = iq.dequantize(qw, s, qz, 128, fmt)
    for m in (1, 8, 64, 512):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        got = iq.int4_linear(x, qw, s, qz, 128, fmt)
        ref = x.float() @ w
        err = ((got.float() - ref).abs().max() / ref.abs().max()).item()
        assert err < 1.5e-2, (m, err)
