"""FP8 (e4m3) KV cache: the store kernel's quantization, and decode/extend attention reading an
fp8 cache, against graphwise.kernels.reference.

Oracle: the reference quantizes with torch (``(x.float() / scale).clamp(-448, 448)
.to(torch.float8_e4m3fn)``) and dequantizes the *same* fp8 cache in fp32 (times the scale), so
the kernels are held to the usual tolerances (fp32 1e-4, bf16/fp16 1e-2 relative): the fp8
rounding itself is shared, not an error. The store must match torch's rounding bit for bit.
Unused cache slots hold NaN (e4m3fn has one), so a stray read still shows.
"""

from __future__ import annotations

import pytest
import torch

from graphwise.kernels import reference as ref
from tests.kernels.test_kernels import (
    CPU,
    CUDA,
    assert_close,
    gpu,
    interp,
    make_paged,
    poison_before,
    rel_err,
)

FP8 = torch.float8_e4m3fn


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def fp8_paged(lens, page, hkv, d, device, k_scale, v_scale):
    """A paged cache (make_paged's layout and NaN padding) quantized to e4m3 with the scales;
    keeps the full-precision cache too, for the quantization-error check."""
    p = make_paged(lens, page, hkv, d, torch.float32, device)
    p.k_cache.mul_(3.0)  # spread the values over e4m3's exponents
    k8 = ref.quantize_kv_fp8(p.k_cache, k_scale)
    v8 = ref.quantize_kv_fp8(p.v_cache, v_scale)
    return p, k8, v8


# ---------------------------------------------------------------------------------------------
# Store: x / scale, saturated, nearest-even, exactly torch's cast
# ---------------------------------------------------------------------------------------------


def check_store_fp8(kern, device, dtype, t, hkv, d, page, k_scale, v_scale) -> None:
    num_blocks = -(-t // page) + 2
    hq = 2 * hkv
    qkv = torch.randn(t, (hq + 2 * hkv) * d, dtype=torch.float32, device=device)
    # Every magnitude e4m3 has: subnormals, normals, values past 448 * scale (saturate), zeros
    # of both signs, and exact ties between two e4m3 values.
    qkv *= torch.exp2(torch.randint(-14, 11, qkv.shape, device=device).float())
    qkv[0, hq * d : hq * d + 4] = torch.tensor([0.0, -0.0, 1e6, -1e6])
    qkv[2, hq * d : hq * d + 3] = torch.tensor([17.0, 19.0, 2.0**-10]) * k_scale  # ties
    qkv = qkv.to(dtype)
    k = qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)  # strided views, like the engine's
    v = qkv[:, (hq + hkv) * d :].view(t, hkv, d)
    slots = torch.randperm(num_blocks * page)[:t].to(device)
    slots[1] = -1  # padding lanes write nothing
    slots[-1] = -1
    k_cache = torch.full((num_blocks, page, hkv, d), float("nan"), device=device).to(FP8)
    v_cache = k_cache.clone()
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    ref.store_kv_ref(k, v, k_expected, v_expected, slots, k_scale, v_scale)
    kern.store_kv(k, v, k_cache, v_cache, slots, k_scale=k_scale, v_scale=v_scale)
    assert torch.equal(bits(k_cache), bits(k_expected))
    assert torch.equal(bits(v_cache), bits(v_expected))
    # The reference is torch's own cast of x / scale (and the padding lanes wrote nothing).
    live = slots >= 0
    direct = (k[live].float() / k_scale).clamp(-448, 448).to(FP8)
    assert torch.equal(bits(k_cache.view(-1, hkv, d)[slots[live]]), bits(direct))
    assert k_cache.view(-1, hkv, d)[slots[live]].float().abs().max() == 448.0  # saturated
    untouched = torch.ones(num_blocks * page, dtype=torch.bool)
    untouched[slots[live].cpu()] = False
    assert k_cache.view(-1, hkv, d)[untouched.to(device)].float().isnan().all()


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hkv,d", [(2, 16), (3, 24)])
@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.37, 2.5)])
def test_store_kv_fp8_exact_interp(kern, dtype, hkv, d, scales) -> None:
    check_store_fp8(kern, CPU, dtype, 37, hkv, d, 4, *scales)


def test_quantize_reference_saturates_and_rounds() -> None:
    x = torch.tensor([1000.0, -1000.0, 448.0, 17.0, 19.0, 0.5 * 2.0**-9, 1.5 * 2.0**-9])
    q = ref.quantize_kv_fp8(x, 1.0).float()
    # 17 and 19 are ties between e4m3 neighbours (16, 18, 20): nearest-even picks 16 and 20.
    assert q.tolist() == [448.0, -448.0, 448.0, 16.0, 20.0, 0.0, 2.0 * 2.0**-9]
    # 1000 / 4 = 250 rounds to 256 (spacing 16 there), dequantized 1024.
    assert ref.dequantize_kv(ref.quantize_kv_fp8(x, 4.0), 4.0, torch.float32)[0] == 1024.0


# ---------------------------------------------------------------------------------------------
# Decode and extend read the fp8 cache
# ---------------------------------------------------------------------------------------------


def check_decode_fp8(
    kern, device, dtype, hq, hkv, d, lens, page, num_splits, k_scale, v_scale,
    sliding_window=None, softcap=None, block_n=64,
) -> None:  # fmt: skip
    p, k8, v8 = fp8_paged(lens, page, hkv, d, device, k_scale, v_scale)
    if sliding_window:
        poison_before(p, [max(0, n - sliding_window) for n in lens])
        k8 = ref.quantize_kv_fp8(p.k_cache, k_scale)
        v8 = ref.quantize_kv_fp8(p.v_cache, v_scale)
    q = torch.randn(len(lens), hq, d, dtype=dtype, device=device)
    out = torch.full_like(q, float("nan"))
    kern.decode_attention(
        q, k8, v8, p.block_tables, p.seq_lens, d**-0.5, out=out, num_splits=num_splits,
        block_n=block_n, sliding_window=sliding_window, softcap=softcap,
        k_scale=k_scale, v_scale=v_scale,
    )  # fmt: skip
    expected = ref.decode_attention_ref(
        q, k8, v8, p.block_tables, p.seq_lens, d**-0.5, sliding_window=sliding_window,
        softcap=softcap, k_scale=k_scale, v_scale=v_scale,
    )  # fmt: skip
    assert_close(out, expected, dtype)
    pad = p.seq_lens == 0
    assert torch.equal(out[pad], torch.zeros_like(out[pad]))
    # The scales are applied: against the unquantized cache the error is e4m3's (a few %).
    exact = ref.decode_attention_ref(
        q, p.k_cache, p.v_cache, p.block_tables, p.seq_lens, d**-0.5,
        sliding_window=sliding_window, softcap=softcap,
    )  # fmt: skip
    assert rel_err(out, exact) < 0.08


def check_extend_fp8(
    kern, device, dtype, hq, hkv, d, q_lens, lens, page, k_scale, v_scale,
    sliding_window=None, softcap=None, block_m=64, block_n=64,
) -> None:  # fmt: skip
    p, k8, v8 = fp8_paged(lens, page, hkv, d, device, k_scale, v_scale)
    if sliding_window:
        poison_before(
            p, [max(0, n - q - sliding_window + 1) for q, n in zip(q_lens, lens, strict=True)]
        )
        k8 = ref.quantize_kv_fp8(p.k_cache, k_scale)
        v8 = ref.quantize_kv_fp8(p.v_cache, v_scale)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    cu = cu.to(device)
    q = torch.randn(sum(q_lens), hq, d, dtype=dtype, device=device)
    out = torch.full_like(q, float("nan"))
    kern.extend_attention(
        q, k8, v8, cu, p.seq_lens, p.block_tables, d**-0.5, out=out, max_q_len=max(q_lens),
        block_m=block_m, block_n=block_n, sliding_window=sliding_window, softcap=softcap,
        k_scale=k_scale, v_scale=v_scale,
    )  # fmt: skip
    expected = ref.extend_attention_ref(
        q, k8, v8, cu, p.seq_lens, p.block_tables, d**-0.5, sliding_window=sliding_window,
        softcap=softcap, k_scale=k_scale, v_scale=v_scale,
    )  # fmt: skip
    assert_close(out, expected, dtype)
    exact = ref.extend_attention_ref(
        q, p.k_cache, p.v_cache, cu, p.seq_lens, p.block_tables, d**-0.5,
        sliding_window=sliding_window, softcap=softcap,
    )  # fmt: skip
    assert rel_err(out, exact) < 0.08


# A bf16 or fp16 model's dots over an fp8 cache run in fp16 (see decode_attention.py), so bf16
# runs in the interpreter here (its tl.dot on bf16 operands is wrong: numpy on the raw bits).
INTERP_ATTN_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SCALES = [(1.0, 1.0), (0.05, 0.02)]  # unit, and scales that put values near the top of e4m3


@interp
@pytest.mark.parametrize("dtype", INTERP_ATTN_DTYPES)
@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("scales", SCALES)
def test_decode_attention_fp8_interp(kern, dtype, num_splits, scales) -> None:
    check_decode_fp8(kern, CPU, dtype, 4, 2, 16, [1, 0, 9, 33], 4, num_splits, *scales,
                     block_n=16)  # fmt: skip


@interp
@pytest.mark.parametrize("window,softcap", [(5, None), (None, 2.0), (6, 3.0)])
def test_decode_attention_fp8_window_softcap_interp(kern, window, softcap) -> None:
    check_decode_fp8(kern, CPU, torch.float32, 4, 2, 16, [1, 0, 9, 33], 4, 2, 0.3, 0.7,
                     sliding_window=window, softcap=softcap, block_n=16)  # fmt: skip


@interp
@pytest.mark.parametrize("dtype", INTERP_ATTN_DTYPES)
@pytest.mark.parametrize("scales", SCALES)
def test_extend_attention_fp8_interp(kern, dtype, scales) -> None:
    check_extend_fp8(kern, CPU, dtype, 4, 2, 16, [3, 1, 20, 0], [3, 10, 25, 5], 4, *scales,
                     block_m=16, block_n=16)  # fmt: skip


@interp
@pytest.mark.parametrize("window,softcap", [(4, None), (None, 1.5), (6, 4.0)])
def test_extend_attention_fp8_window_softcap_interp(kern, window, softcap) -> None:
    check_extend_fp8(kern, CPU, torch.float32, 4, 2, 16, [3, 1, 20], [3, 10, 25], 4, 0.3, 0.7,
                     sliding_window=window, softcap=softcap, block_m=16, block_n=16)  # fmt: skip


@interp
def test_padded_head_dim_fp8_interp(kern) -> None:
    check_decode_fp8(kern, CPU, torch.float32, 6, 2, 24, [5, 17], 4, 2, 0.5, 0.5, block_n=16)
    check_extend_fp8(kern, CPU, torch.float32, 6, 2, 24, [5, 9], [5, 17], 4, 0.5, 0.5,
                     block_m=16, block_n=16)  # fmt: skip


def test_torch_backend_stores_and_reads_like_the_reference() -> None:
    """The CPU path (layers/attention/torch_backend.py): its store writes the reference's bytes,
    its decode/extend read them as the reference does."""
    from graphwise.layers.attention.torch_backend import (
        TorchAttentionBackend,
        decode_attention_torch,
    )

    t, hkv, d, page, nb = 10, 2, 16, 4, 6
    k = torch.randn(t, hkv, d) * 5
    v = torch.randn(t, hkv, d)
    slots = torch.randperm((nb - 1) * page)[:t]  # the last block is the scratch block
    slots[3] = -1
    backend = TorchAttentionBackend(scratch_slot=(nb - 1) * page)
    kc = torch.zeros(nb, page, hkv, d, dtype=FP8)
    vc = torch.zeros_like(kc)
    backend.store_kv(k, v, kc, vc, slots, 0.4, 0.1)
    ke, ve = torch.zeros_like(kc), torch.zeros_like(vc)
    ref.store_kv_ref(k, v, ke, ve, slots, 0.4, 0.1)
    assert kc[nb - 1].float().abs().sum() > 0  # the padding lane went to the scratch block
    kc[nb - 1].zero_()
    vc[nb - 1].zero_()
    assert torch.equal(bits(kc), bits(ke)) and torch.equal(bits(vc), bits(ve))
    bt = torch.tensor([[0, 1, 2], [3, 4, 0]], dtype=torch.int32)
    lens = torch.tensor([11, 6], dtype=torch.int32)
    q = torch.randn(2, 4, d)
    out = decode_attention_torch(q, kc, vc, bt, lens, 0.25, None, None, 0.4, 0.1)
    exp = ref.decode_attention_ref(q, kc, vc, bt, lens, 0.25, k_scale=0.4, v_scale=0.1)
    assert rel_err(out, exp) < 1e-5


# ---------------------------------------------------------------------------------------------
# GPU: real shapes, and a CUDA graph
# ---------------------------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_store_kv_fp8_exact_gpu(kern, dtype) -> None:
    check_store_fp8(kern, CUDA, dtype, 300, 8, 128, 16, 0.37, 2.5)
    check_store_fp8(kern, CUDA, dtype, 300, 4, 96, 16, 1.0, 1.0)


def _lens(n: int, max_len: int, page: int) -> list[int]:
    return [1, 0, page, page + 1, 2 * page - 1, *torch.randint(1, max_len, (n,)).tolist()]


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hq,hkv,d", [(28, 4, 128), (32, 8, 128), (16, 8, 256), (32, 32, 96)])
@pytest.mark.parametrize("num_splits", [None, 1, 8])
def test_decode_attention_fp8_gpu(kern, dtype, hq, hkv, d, num_splits) -> None:
    check_decode_fp8(kern, CUDA, dtype, hq, hkv, d, _lens(30, 4096, 16), 16, num_splits,
                     0.05, 0.02)  # fmt: skip


@gpu
@pytest.mark.parametrize("window,softcap", [(512, None), (None, 50.0), (1024, 30.0)])
def test_decode_attention_fp8_window_softcap_gpu(kern, window, softcap) -> None:
    check_decode_fp8(kern, CUDA, torch.bfloat16, 16, 8, 256, _lens(20, 3000, 16), 16, None,
                     0.3, 0.7, sliding_window=window, softcap=softcap)  # fmt: skip


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hq,hkv,d", [(28, 4, 128), (32, 8, 128), (16, 8, 256)])
def test_extend_attention_fp8_gpu(kern, dtype, hq, hkv, d) -> None:
    q_lens = [1000, 1, 300, 64, 0, 129, 7]
    lens = [1000, 2000, 1500, 64, 5, 129, 4096]
    check_extend_fp8(kern, CUDA, dtype, hq, hkv, d, q_lens, lens, 16, 0.05, 0.02)


@gpu
@pytest.mark.parametrize("window,softcap", [(512, None), (None, 50.0), (300, 30.0)])
def test_extend_attention_fp8_window_softcap_gpu(kern, window, softcap) -> None:
    check_extend_fp8(kern, CUDA, torch.bfloat16, 16, 8, 256, [700, 1, 64], [1500, 900, 64],
                     16, 0.3, 0.7, sliding_window=window, softcap=softcap)  # fmt: skip


@gpu
def test_decode_fp8_cuda_graph_capture(kern) -> None:
    """store_kv + decode_attention on an fp8 cache captured once (scales fixed at capture),
    replayed with new lengths and inputs."""
    hq, hkv, d, page, b, max_blocks = 28, 4, 128, 16, 8, 64
    ks, vs = 0.05, 0.02
    num_blocks = b * max_blocks
    k_cache = ref.quantize_kv_fp8(torch.randn(num_blocks, page, hkv, d, device=CUDA), ks)
    v_cache = ref.quantize_kv_fp8(torch.randn(num_blocks, page, hkv, d, device=CUDA), vs)
    block_tables = torch.randperm(num_blocks, device=CUDA).int().view(b, max_blocks)
    seq_lens = torch.ones(b, dtype=torch.int32, device=CUDA)
    q = torch.randn(b, hq, d, dtype=torch.bfloat16, device=CUDA)
    k_new = torch.randn(b, hkv, d, dtype=torch.bfloat16, device=CUDA)
    v_new = torch.randn_like(k_new)
    slots = torch.zeros(b, dtype=torch.int64, device=CUDA)
    out = torch.empty_like(q)
    splits = kern.choose_num_splits(b, hkv, max_blocks * page)
    assert splits > 1
    ws = kern.alloc_decode_workspace(b, hq, d, splits, CUDA)

    def step() -> None:
        kern.store_kv(k_new, v_new, k_cache, v_cache, slots, k_scale=ks, v_scale=vs)
        kern.decode_attention(q, k_cache, v_cache, block_tables, seq_lens, d**-0.5, out=out,
                              num_splits=splits, workspace=ws, k_scale=ks, v_scale=vs)  # fmt: skip

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(3):
        new_lens = torch.randint(1, max_blocks * page, (b,), device=CUDA).int()
        seq_lens.copy_(new_lens)
        q.copy_(torch.randn_like(q))
        k_new.copy_(torch.randn_like(k_new))
        last = new_lens.long() - 1
        block = block_tables.gather(1, (last // page)[:, None])[:, 0].long()
        slots.copy_(block * page + last % page)
        graph.replay()
        torch.cuda.synchronize()
        expected = ref.decode_attention_ref(
            q, k_cache, v_cache, block_tables, seq_lens, d**-0.5, k_scale=ks, v_scale=vs
        )
        assert_close(out, expected, torch.bfloat16)
        stored = k_cache.view(-1, hkv, d)[slots]
        assert torch.equal(bits(stored), bits(ref.quantize_kv_fp8(k_new, ks)))
