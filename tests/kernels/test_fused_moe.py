"""The fused MoE kernel against a per-expert loop, across token counts and expert loads."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F


def moe_loop(x, w_gate_up, w_down, weights, ids):
    """fp32 reference: for each expert, its tokens through its MLP, weighted, summed."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    inter = w_down.shape[2]
    for e in range(w_gate_up.shape[0]):
        tok, slot = torch.where(ids == e)
        if tok.numel() == 0:
            continue
        h = x[tok].float() @ w_gate_up[e].float().T
        a = F.silu(h[:, :inter]) * h[:, inter:]
        out.index_add_(0, tok, weights[tok, slot].float()[:, None] * (a @ w_down[e].float().T))
    return out


def _route(t, k, e, mode, device):
    if mode == "uniform":
        logits = torch.randn(t, e, device=device)
    elif mode == "skewed":  # most tokens to expert 0, several experts get none
        logits = torch.randn(t, e, device=device)
        logits[:, 0] += 5
        logits[:, e // 2 :] -= 10
    else:  # one expert only gets everything at slot 0
        logits = torch.randn(t, e, device=device)
        logits[:, 3] += 20
    probs = logits.softmax(-1)
    w, ids = probs.topk(k, dim=-1)
    return w, ids


@pytest.mark.parametrize("t", [1, 3, 17])
@pytest.mark.parametrize("mode", ["uniform", "skewed", "one"])
def test_fused_moe_matches_loop_interpreter(kern, t, mode):
    from graphwise.kernels.fused_moe import fused_moe

    device = "cuda" if torch.cuda.is_available() else "cpu"
    e, k, h, i = 8, 2, 32, 48
    x = torch.randn(t, h, device=device)
    wgu = torch.randn(e, 2 * i, h, device=device) * 0.2
    wd = torch.randn(e, h, i, device=device) * 0.2
    w, ids = _route(t, k, e, mode, device)
    got = fused_moe(x, wgu, wd, w, ids)
    ref = moe_loop(x, wgu, wd, w, ids)
    assert torch.isfinite(got).all()
    rel = (got.float() - ref).norm() / ref.norm()
    assert rel < 1e-4, rel


def test_moe_align_segments_are_expert_pure(kern):
    from graphwise.kernels.fused_moe import moe_align

    ids = torch.tensor([[3, 1], [3, 0], [1, 3], [7, 3]])
    sorted_ids, block_expert = moe_align(ids, num_experts=8, block_m=4)
    flat = ids.reshape(-1)
    n = flat.numel()
    seen = []
    for b, e in enumerate(block_expert.tolist()):
        rows = sorted_ids[b * 4 : (b + 1) * 4].tolist()
        real = [r for r in rows if r < n]
        if e < 0:
            assert not real
            continue
        assert all(int(flat[r]) == e for r in real)
        seen += real
    assert sorted(seen) == list(range(n))  # every pair exactly once
    assert 2 not in block_expert.tolist()  # an expert with no tokens gets no block


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 8, 64, 512])
def test_fused_moe_bf16_gpu(kern, t):
    from graphwise.kernels.fused_moe import fused_moe

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    e, k, h, i = 64, 8, 512, 256
    x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
    wgu = (torch.randn(e, 2 * i, h, device="cuda") * 0.05).bfloat16()
    wd = (torch.randn(e, h, i, device="cuda") * 0.05).bfloat16()
    w, ids = _route(t, k, e, "skewed", "cuda")
    got = fused_moe(x, wgu, wd, w.bfloat16(), ids)
    ref = moe_loop(x, wgu, wd, w, ids)
    rel = (got.float() - ref).norm() / ref.norm()
    assert rel < 2e-2, rel


# --- the small-M (GEMV) path: moe_gemv.fused_moe_small_m ---------------------------------


# the interpreter on CPU, the compiled kernels where there is a GPU (as conftest decides)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _moe_inputs(t, k, e, h, i, mode, dtype, device=DEVICE):
    x = torch.randn(t, h, device=device).to(dtype)
    wgu = (torch.randn(e, 2 * i, h, device=device) * 0.2).to(dtype)
    wd = (torch.randn(e, h, i, device=device) * 0.2).to(dtype)
    w, ids = _route(t, k, e, mode, device)
    return x, wgu, wd, w, ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["uniform", "skewed", "one"])
@pytest.mark.parametrize("k,e", [(1, 8), (2, 8), (8, 8), (2, 64), (8, 64)])
def test_small_m_matches_loop_interpreter(kern, k, e, mode, dtype):
    from graphwise.kernels.moe_gemv import fused_moe_small_m

    tol = 1e-5 if dtype == torch.float32 else 2e-2
    # t = 1..8 for each (k, E, dtype), shared out among the three routing modes (interpreter time)
    for t in {"uniform": (1, 4, 7), "skewed": (2, 5, 8), "one": (3, 6)}[mode]:
        x, wgu, wd, w, ids = _moe_inputs(t, k, e, 32, 48, mode, dtype)
        # fp32 routing weights as Mixtral passes them, the model dtype as Qwen does
        weights = w if t % 2 else w.to(dtype)
        got = fused_moe_small_m(x, wgu, wd, weights, ids)
        assert got.dtype == dtype and got.shape == x.shape
        ref = moe_loop(x, wgu, wd, weights, ids)
        rel = (got.float() - ref).norm() / ref.norm()
        assert rel < tol, (t, float(rel))


@pytest.mark.parametrize("tile_elems", [64, 256])
def test_small_m_loops_over_k_and_masks_ragged_shapes(kern, tile_elems):
    """H and I not multiples of the tiles, several K steps per program, top-k not a power of 2."""
    from graphwise.kernels.moe_gemv import fused_moe_small_m

    for t, k in [(1, 3), (5, 3), (2, 6)]:
        x, wgu, wd, w, ids = _moe_inputs(t, k, 16, 40, 72, "uniform", torch.float32)
        got = fused_moe_small_m(x, wgu, wd, w, ids, tile_elems=tile_elems)
        ref = moe_loop(x, wgu, wd, w, ids)
        assert (got - ref).norm() / ref.norm() < 1e-5


def test_small_m_expert_parallel_masking(kern):
    """As SparseMoE calls it under TP: this rank holds experts 4..7 of 8; the other ranks'
    pairs get weight 0 and ids clamped into range. Those pairs must add nothing and read no
    bytes: the clamped-to expert is poisoned with NaN for its zero-weight pairs to prove it."""
    from graphwise.kernels.moe_gemv import fused_moe_small_m

    t, k, e, start, n_local = 6, 2, 8, 4, 4
    x, wgu, wd, w, ids = _moe_inputs(t, k, e, 32, 48, "uniform", torch.float32)
    local = ids - start
    mine = (local >= 0) & (local < n_local)
    weights = w * mine
    clamped = local.clamp(0, n_local - 1)
    ref = moe_loop(x, wgu, wd, weights, ids)
    got = fused_moe_small_m(x, wgu[start:], wd[start:], weights, clamped)
    assert (got - ref).norm() / ref.norm() < 1e-5
    # all pairs of expert 0 of 8 are another rank's: clamp them onto a local expert of NaNs
    only_other = torch.zeros_like(ids)
    poisoned_wgu = wgu[start:].clone()
    poisoned_wgu[0] = float("nan")
    got = fused_moe_small_m(x, poisoned_wgu, wd[start:], torch.zeros_like(w), only_other)
    assert torch.equal(got, torch.zeros_like(got))


def test_small_m_dispatch_by_shape(kern, monkeypatch):
    import graphwise.kernels.fused_moe as fm
    import graphwise.kernels.moe_gemv as gemv
    from graphwise.kernels.moe_gemv import expected_reread, use_small_m

    # the default is the threshold measured on the H200 (moe_gemv.py); 0 switches it off
    if "GRAPHWISE_MOE_SMALL_M_MAX_REREAD" not in os.environ:
        assert gemv.SMALL_M_MAX_REREAD == pytest.approx(1.3)
    monkeypatch.setattr(gemv, "SMALL_M_MAX_REREAD", 0.0)
    assert not use_small_m(1, 2, 8)
    monkeypatch.setattr(gemv, "SMALL_M_MAX_REREAD", 1.3)
    # Mixtral-8x7B (E=8, k=2): decode up to 2 tokens; Qwen3-30B-A3B (E=128, k=8): up to 8
    assert [use_small_m(t, 2, 8) for t in (1, 2, 4, 8, 64)] == [True] * 2 + [False] * 3
    assert [use_small_m(t, 8, 128) for t in (1, 4, 8, 16, 64)] == [True] * 3 + [False] * 2
    assert expected_reread(1, 8, 128) == pytest.approx(1.0)
    assert expected_reread(8, 2, 8) == pytest.approx(16 / (8 * (1 - 0.75**8)))
    # a TP rank holding fewer experts than k: every local expert is hit by every token
    assert expected_reread(3, 2, 1) == pytest.approx(6.0) and not use_small_m(3, 2, 1)

    calls = []
    real_small, real_align = fm.fused_moe_small_m, fm.moe_align
    monkeypatch.setattr(fm, "fused_moe_small_m", lambda *a: calls.append("gemv") or real_small(*a))
    monkeypatch.setattr(fm, "moe_align", lambda *a: calls.append("align") or real_align(*a))
    for t, expect in [(1, "gemv"), (2, "gemv"), (4, "align")]:
        x, wgu, wd, w, ids = _moe_inputs(t, 2, 8, 32, 48, "uniform", torch.float32)
        calls.clear()
        got = fm.fused_moe(x, wgu, wd, w, ids)
        assert calls == [expect], (t, calls)
        ref = moe_loop(x, wgu, wd, w, ids)
        assert (got - ref).norm() / ref.norm() < 1e-4
    calls.clear()
    fm.fused_moe(x, wgu, wd, w, ids, small_m=True)  # forced either way
    fm.fused_moe(x[:1], wgu, wd, w[:1], ids[:1], small_m=False)
    assert calls == ["gemv", "align"]


MOE_SHAPES = {  # name: (E, k, H, I)
    "mixtral-8x7b": (8, 2, 4096, 14336),
    "qwen3-30b-a3b": (128, 8, 2048, 768),
}


@pytest.mark.gpu
@pytest.mark.parametrize("small_m", [True, None])
@pytest.mark.parametrize("t", [1, 4, 16])
@pytest.mark.parametrize("shape", sorted(MOE_SHAPES))
def test_small_m_model_shapes_gpu(kern, shape, t, small_m):
    from graphwise.kernels.fused_moe import fused_moe

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    e, k, h, i = MOE_SHAPES[shape]
    x, wgu, wd, w, ids = _moe_inputs(t, k, e, h, i, "uniform", torch.bfloat16, "cuda")
    wgu, wd = wgu * (0.5 / h**0.5), wd * (0.5 / i**0.5)  # unit-scale activations
    weights = w if shape == "mixtral-8x7b" else w.bfloat16()  # fp32 routing for Mixtral
    got = fused_moe(x, wgu, wd, weights, ids, small_m=small_m)
    ref = moe_loop(x, wgu, wd, weights, ids)
    rel = (got.float() - ref).norm() / ref.norm()
    assert rel < 2e-2, rel


@pytest.mark.gpu
def test_small_m_cuda_graph_replay_gpu(kern):
    """Captured once, replayed with new tokens and new routing: no host sync, no stale shapes."""
    from graphwise.kernels.fused_moe import fused_moe

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    e, k, h, i = MOE_SHAPES["qwen3-30b-a3b"]
    x, wgu, wd, w, ids = _moe_inputs(4, k, e, h, i, "uniform", torch.bfloat16, "cuda")
    wgu, wd = wgu * (0.5 / h**0.5), wd * (0.5 / i**0.5)
    w = w.bfloat16()
    fused_moe(x, wgu, wd, w, ids, small_m=True)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, wgu, wd, w, ids, small_m=True)
    for mode in ["skewed", "one"]:
        x2, _, _, w2, ids2 = _moe_inputs(4, k, e, h, i, mode, torch.bfloat16, "cuda")
        x.copy_(x2)
        w.copy_(w2)
        ids.copy_(ids2)
        graph.replay()
        ref = moe_loop(x, wgu, wd, w, ids)
        assert (out.float() - ref).norm() / ref.norm() < 2e-2
