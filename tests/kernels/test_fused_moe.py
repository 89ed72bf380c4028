"""The fused MoE kernel against a per-expert loop, across token counts and expert loads."""

from __future__ import annotations

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
