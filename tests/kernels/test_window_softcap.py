"""Sliding windows, soft-capping, padded head_dim, Gemma norms and GeGLU: Triton kernels against
graphwise.kernels.reference, and the reference against dense attention.

Keys that a window excludes are poisoned with NaN in the cache (see ``poison_before``), so a
kernel that reads outside the window fails even where the mask would have hidden the value.
"""

from __future__ import annotations

import pytest
import torch

from graphwise.kernels import reference as ref
from tests.kernels.test_kernels import (
    CPU,
    CUDA,
    GPU_DTYPES,
    INTERP_DTYPES,
    assert_close,
    check_decode,
    check_extend,
    check_rope,
    check_store_kv,
    gpu,
    interp,
    make_paged,
    rel_err,
)

# ---------------------------------------------------------------------------------------------
# Reference vs. dense attention
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window,softcap", [(5, None), (None, 3.0), (4, 2.5), (1, None)])
def test_reference_decode_window_softcap_matches_dense(window, softcap) -> None:
    lens, hq, hkv, d = [1, 9, 0, 23, 4], 6, 2, 32
    p = make_paged(lens, 4, hkv, d, torch.float32, CPU)
    q = torch.randn(len(lens), hq, d) * 2
    out = ref.decode_attention_ref(
        q, p.k_cache, p.v_cache, p.block_tables, p.seq_lens, 0.3, None, window, softcap
    )
    for b, n in enumerate(lens):
        if n == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b]))
            continue
        dense = ref.dense_causal_attention(
            q[b : b + 1], p.dense_k[b], p.dense_v[b], 0.3, window, softcap
        )[0]
        assert rel_err(out[b], dense) <= 1e-5


@pytest.mark.parametrize("window,softcap", [(3, None), (None, 1.5), (6, 4.0)])
def test_reference_extend_window_softcap_matches_dense(window, softcap) -> None:
    q_lens, lens, hq, hkv, d = [3, 1, 7, 0, 12], [3, 10, 12, 5, 20], 4, 2, 32
    p = make_paged(lens, 4, hkv, d, torch.float32, CPU)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(q_lens), hq, d) * 2
    out = ref.extend_attention_ref(
        q, p.k_cache, p.v_cache, cu, p.seq_lens, p.block_tables, 0.2, None, window, softcap
    )
    for b in range(len(lens)):
        qb = q[cu[b] : cu[b + 1]]
        if qb.shape[0] == 0:
            continue
        dense = ref.dense_causal_attention(qb, p.dense_k[b], p.dense_v[b], 0.2, window, softcap)
        assert rel_err(out[cu[b] : cu[b + 1]], dense) <= 1e-5
    # One row by hand: query 4 of 12 new tokens on a 20-token context sits at position 12 and,
    # with window 6, sees keys 7..12.
    if window == 6:
        b, i = 4, 4
        k = p.dense_k[b][7:13].repeat_interleave(hq // hkv, dim=1)
        v = p.dense_v[b][7:13].repeat_interleave(hq // hkv, dim=1)
        s = torch.einsum("hd,khd->hk", q[cu[b] + i], k) * 0.2
        probs = torch.softmax(torch.tanh(s / softcap) * softcap, dim=-1)
        assert rel_err(out[cu[b] + i], torch.einsum("hk,khd->hd", probs, v)) <= 1e-5


def test_window_longer_than_context_changes_nothing() -> None:
    lens = [5, 17]
    p = make_paged(lens, 4, 2, 32, torch.float32, CPU)
    q = torch.randn(2, 4, 32)
    args = (q, p.k_cache, p.v_cache, p.block_tables, p.seq_lens, 0.25)
    assert torch.equal(ref.decode_attention_ref(*args), ref.decode_attention_ref(*args, None, 17))


# ---------------------------------------------------------------------------------------------
# Interpreter (CPU, fp32, tiny sizes)
# ---------------------------------------------------------------------------------------------

DECODE_CASES = [
    # hq, hkv, d, lens, page, num_splits, block_n, window, softcap
    pytest.param(4, 2, 64, [1, 17, 0, 40], 8, 1, 16, 7, None, id="window-direct"),
    pytest.param(4, 2, 64, [1, 17, 0, 40], 8, 3, 16, 20, None, id="window-3split"),
    pytest.param(6, 2, 32, [5, 64, 130], 8, 4, 16, 33, 5.0, id="window-softcap-4split"),
    pytest.param(8, 2, 64, [33, 1, 16], 16, None, 64, None, 2.0, id="softcap-auto"),
    pytest.param(4, 4, 64, [16, 32], 16, 2, 16, 16, None, id="window-on-block-edge"),
    pytest.param(6, 2, 48, [9, 100, 0, 1], 12, 2, 32, None, None, id="d48-page12"),
    pytest.param(3, 1, 80, [70, 3], 8, 3, 16, 19, 30.0, id="d80-window-softcap"),
]


@interp
@pytest.mark.parametrize("hq,hkv,d,lens,page,num_splits,block_n,window,softcap", DECODE_CASES)
def test_decode_window_softcap_interp(
    kern, hq, hkv, d, lens, page, num_splits, block_n, window, softcap
) -> None:
    check_decode(
        kern,
        CPU,
        torch.float32,
        hq,
        hkv,
        d,
        lens,
        page,
        num_splits,
        block_n=block_n,
        workspace=True,
        sliding_window=window,
        softcap=softcap,
    )


EXTEND_CASES = [
    # hq, hkv, d, q_lens, lens, page, block_m, block_n, window, softcap
    pytest.param(4, 2, 64, [5, 1, 19, 0, 40], [5, 20, 40, 7, 40], 8, 16, 16, 7, None, id="window7"),
    # The window is shorter than a query tile: rows see nothing in the band's first tiles.
    pytest.param(4, 2, 32, [40, 3], [50, 30], 8, 32, 16, 3, None, id="window3-tile32"),
    # Chunked prefill: the chunk's first rows reach back into the cached prefix.
    pytest.param(6, 2, 32, [17, 9], [60, 33], 8, 16, 16, 20, 4.0, id="window-prefix-softcap"),
    pytest.param(4, 2, 32, [33, 1], [33, 70], 8, 16, 16, None, 3.0, id="softcap"),
    pytest.param(4, 4, 32, [32, 16], [32, 48], 16, 16, 16, 16, None, id="window-tile-aligned"),
    pytest.param(6, 3, 48, [11, 1, 20], [11, 9, 37], 12, 16, 32, None, None, id="d48"),
    pytest.param(2, 1, 96, [25, 7], [25, 40], 8, 16, 16, 9, 50.0, id="d96-window-softcap"),
]


@interp
@pytest.mark.parametrize("hq,hkv,d,q_lens,lens,page,block_m,block_n,window,softcap", EXTEND_CASES)
def test_extend_window_softcap_interp(
    kern, hq, hkv, d, q_lens, lens, page, block_m, block_n, window, softcap
) -> None:
    check_extend(
        kern,
        CPU,
        torch.float32,
        hq,
        hkv,
        d,
        q_lens,
        lens,
        page,
        block_m=block_m,
        block_n=block_n,
        sliding_window=window,
        softcap=softcap,
    )


@interp
def test_wide_heads_default_tiles_interp(kern) -> None:
    """head_dim 256 (Gemma) with the wrappers' own tile sizes (32-wide for such heads)."""
    check_decode(kern, CPU, torch.float32, 4, 2, 256, [40, 3, 0], 16, 2, None,
                 sliding_window=20, softcap=50.0)  # fmt: skip
    check_extend(kern, CPU, torch.float32, 4, 2, 256, [37, 1], [37, 50], 16, None, None,
                 sliding_window=20, softcap=50.0)  # fmt: skip


@interp
def test_window_softcap_fp16_interp(kern) -> None:
    check_decode(kern, CPU, torch.float16, 8, 2, 64, [33, 1, 0, 100], 16, 3, 16, False, False,
                 sliding_window=40, softcap=10.0)  # fmt: skip
    check_extend(kern, CPU, torch.float16, 6, 2, 64, [5, 1, 19], [5, 20, 40], 16, 16, 16,
                 sliding_window=9, softcap=10.0)  # fmt: skip


@interp
@pytest.mark.parametrize("dtype", INTERP_DTYPES)
@pytest.mark.parametrize("hq,hkv,d", [(4, 2, 48), (3, 1, 96)])
def test_store_kv_and_rope_odd_head_dim_interp(kern, dtype, hq, hkv, d) -> None:
    check_store_kv(kern, CPU, dtype, 7, hq, hkv, d, 4)
    check_rope(kern, CPU, dtype, 5, hq, hkv, d)


def check_gemma_rmsnorm(kern, device, dtype, t: int, h: int) -> None:
    x = torch.randn(t, h, dtype=dtype, device=device) * 3
    weight = torch.randn(h, dtype=dtype, device=device) * 0.5  # Gemma weights sit around 0
    expected = ref.rmsnorm_ref(x, weight, 1e-6, gemma=True)
    assert_close(kern.rmsnorm(x, weight, 1e-6, gemma=True), expected, dtype)
    residual = torch.randn(t, h, dtype=dtype, device=device)
    x_ref, res_ref = x.clone(), residual.clone()
    ref.fused_add_rmsnorm_ref(x_ref, res_ref, weight, 1e-6, gemma=True)
    kern.fused_add_rmsnorm(x, residual, weight, 1e-6, gemma=True)
    assert_close(residual, res_ref, dtype)
    assert_close(x, x_ref, dtype)


def check_head_rmsnorm(kern, device, dtype, t, hq, hkv, d, gemma: bool) -> None:
    qkv = torch.randn(t, (hq + 2 * hkv) * d, dtype=dtype, device=device) * 2
    qw = torch.randn(d, dtype=dtype, device=device)
    kw = torch.randn(d, dtype=dtype, device=device)
    expected = qkv.clone()
    ref.head_rmsnorm_ref_(expected, qw, kw, hq, hkv, d, 1e-6, gemma=gemma)
    kern.head_rmsnorm_(qkv, qw, kw, hq, hkv, d, 1e-6, gemma=gemma)
    v_part = slice((hq + hkv) * d, None)
    assert torch.equal(qkv[:, v_part], expected[:, v_part]), "v heads must be untouched"
    assert_close(qkv, expected, dtype)


def check_gelu(kern, device, dtype, t: int, inter: int) -> None:
    x = torch.randn(t, 2 * inter, dtype=dtype, device=device) * 4
    out = torch.full((t, inter), float("nan"), dtype=dtype, device=device)
    kern.gelu_tanh_and_mul(x, out=out)
    assert_close(out, ref.gelu_tanh_and_mul_ref(x), dtype)


@interp
@pytest.mark.parametrize("dtype", INTERP_DTYPES)
def test_gemma_rmsnorm_interp(kern, dtype) -> None:
    check_gemma_rmsnorm(kern, CPU, dtype, 3, 96)


@interp
@pytest.mark.parametrize("dtype", INTERP_DTYPES)
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("hq,hkv,d", [(4, 2, 32), (3, 1, 48)])
def test_head_rmsnorm_interp(kern, dtype, gemma, hq, hkv, d) -> None:
    check_head_rmsnorm(kern, CPU, dtype, 5, hq, hkv, d, gemma)


@interp
@pytest.mark.parametrize("dtype", INTERP_DTYPES)
def test_gelu_tanh_and_mul_interp(kern, dtype) -> None:
    check_gelu(kern, CPU, dtype, 3, 100)


# ---------------------------------------------------------------------------------------------
# GPU (bf16 and fp32, realistic sizes)
# ---------------------------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("hq,hkv,d", [(16, 8, 256), (32, 8, 128), (32, 32, 96)])
@pytest.mark.parametrize("num_splits", [None, 7])
@pytest.mark.parametrize("window,softcap", [(4096, None), (512, 50.0), (None, 50.0)])
def test_decode_window_softcap_gpu(kern, dtype, hq, hkv, d, num_splits, window, softcap) -> None:
    lens = [1, 0, 511, 512, 513, 4095, 4096, 4097, 6000, 300]
    check_decode(kern, CUDA, dtype, hq, hkv, d, lens, 16, num_splits, workspace=True,
                 sliding_window=window, softcap=softcap)  # fmt: skip


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("hq,hkv,d", [(16, 8, 256), (32, 8, 128), (32, 32, 96)])
@pytest.mark.parametrize("window,softcap", [(1024, None), (100, 50.0), (None, 50.0)])
def test_extend_window_softcap_gpu(kern, dtype, hq, hkv, d, window, softcap) -> None:
    q_lens = [1000, 1, 300, 64, 0, 129, 7, 2000]
    lens = [1000, 2000, 1500, 64, 5, 129, 300, 2600]
    check_extend(kern, CUDA, dtype, hq, hkv, d, q_lens, lens, 16, strided_q=True,
                 sliding_window=window, softcap=softcap)  # fmt: skip


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_row_kernels_new_variants_gpu(kern, dtype) -> None:
    check_gemma_rmsnorm(kern, CUDA, dtype, 77, 3584)
    check_head_rmsnorm(kern, CUDA, dtype, 300, 32, 8, 128, gemma=False)
    check_head_rmsnorm(kern, CUDA, dtype, 300, 16, 8, 256, gemma=True)
    check_gelu(kern, CUDA, dtype, 77, 14336)
    check_rope(kern, CUDA, dtype, 300, 32, 32, 96)
    check_store_kv(kern, CUDA, dtype, 300, 32, 32, 96, 16)
