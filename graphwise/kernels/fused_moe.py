"""Fused mixture-of-experts MLP: token pairs sorted by expert, then two grouped GEMMs.

Each (token, slot) pair routed to expert e is placed in e's segment of a sorted index list,
padded to a multiple of BLOCK_M, so every BLOCK_M rows of the list belong to one expert. A
program multiplies such a block of gathered rows by that expert's weight tile: expert weights
are read once per block of tokens, and experts with no tokens cost nothing. The alignment is
done with tensor ops of fixed size (no host sync), so the layer can be captured in a CUDA graph.

At decode batch sizes (few pairs per expert) `fused_moe` takes the GEMV path of moe_gemv.py
instead: no alignment, one streaming program per (pair, column tile).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from graphwise.kernels.activation import silu_and_mul
from graphwise.kernels.moe_gemv import fused_moe_small_m, use_small_m


def moe_align(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted pair ids [cap] int32 with padding = T*k, expert of each block [cap/block_m] int32
    with -1 for blocks past the last segment)."""
    flat = topk_ids.reshape(-1).to(torch.int64)
    n = flat.numel()
    device = flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    starts = ends - padded
    order = torch.argsort(flat, stable=True)
    sorted_experts = flat[order]
    first_of_expert = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n, device=device) - first_of_expert[sorted_experts]
    dest = starts[sorted_experts] + rank
    cap = triton.cdiv(n + num_experts * (block_m - 1), block_m) * block_m
    sorted_ids = torch.full((cap,), n, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    block_start = torch.arange(0, cap, block_m, device=device)
    block_expert = torch.searchsorted(ends, block_start, right=True)
    block_expert = torch.where(block_expert >= num_experts, -1, block_expert).to(torch.int32)
    return sorted_ids, block_expert


@triton.jit
def _moe_gemm_kernel(
    a_ptr,
    w_ptr,
    out_ptr,
    sorted_ids_ptr,
    block_expert_ptr,
    weights_ptr,
    N,
    K,
    num_pairs,
    stride_am,
    stride_we,
    stride_wn,
    stride_om,
    TOPK: tl.constexpr,
    A_PER_PAIR: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_ids_ptr + offs_m)
    valid = pairs < num_pairs
    if A_PER_PAIR:
        a_rows = pairs.to(tl.int64)
    else:
        a_rows = (pairs // TOPK).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(
            a_ptr + a_rows[:, None] * stride_am + kk[None, :],
            mask=valid[:, None] & (kk < K)[None, :],
            other=0.0,
        )
        w = tl.load(
            w_base + offs_n[None, :].to(tl.int64) * stride_wn + kk[:, None],
            mask=(offs_n < N)[None, :] & (kk < K)[:, None],
            other=0.0,
        )
        acc += tl.dot(a, w, input_precision=DOT_PRECISION)
    if MUL_WEIGHT:
        gate = tl.load(weights_ptr + pairs, mask=valid, other=0.0).to(tl.float32)
        acc = acc * gate[:, None]
    tl.store(
        out_ptr + pairs[:, None].to(tl.int64) * stride_om + offs_n[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=valid[:, None] & (offs_n < N)[None, :],
    )


def _moe_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    sorted_ids: torch.Tensor,
    block_expert: torch.Tensor,
    topk: int,
    weights: torch.Tensor | None,
    a_per_pair: bool,
    block_m: int,
    block_n: int,
    block_k: int,
    num_warps: int,
) -> None:
    num_pairs = out.shape[0]
    _, n, k = w.shape
    grid = (block_expert.shape[0], triton.cdiv(n, block_n))
    _moe_gemm_kernel[grid](
        a,
        w,
        out,
        sorted_ids,
        block_expert,
        weights if weights is not None else out,
        n,
        k,
        num_pairs,
        a.stride(0),
        w.stride(0),
        w.stride(1),
        out.stride(0),
        TOPK=topk,
        A_PER_PAIR=a_per_pair,
        MUL_WEIGHT=weights is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
    )


def fused_moe(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    block_m: int | None = None,
    block_n: int = 64,
    block_k: int = 64,
    num_warps: int = 4,
    small_m: bool | None = None,
) -> torch.Tensor:
    """Routed experts of a MoE layer: sum_j w_j * down_e(silu(gate_e x) * up_e x), e = ids[:, j].

    x [T, H]; w_gate_up [E, 2I, H]; w_down [E, H, I]; topk_weights [T, k] (x's dtype or fp32);
    topk_ids [T, k]. Returns [T, H] in x's dtype. small_m: force the GEMV path (True) or the
    grouped GEMM (False); None picks by shape (moe_gemv.use_small_m).
    """
    t, h = x.shape
    num_experts, two_i, h_w = w_gate_up.shape
    assert h_w == h and w_down.shape == (num_experts, h, two_i // 2)
    assert x.stride(1) == 1 and w_gate_up.stride(2) == 1 and w_down.stride(2) == 1
    topk = topk_ids.shape[1]
    if t == 0:
        return torch.empty_like(x)
    if small_m is None:
        small_m = use_small_m(t, topk, num_experts)
    if small_m:
        return fused_moe_small_m(x, w_gate_up, w_down, topk_weights, topk_ids)
    if block_m is None:
        # Rows per expert block: small when few tokens reach each expert (padding waste), large
        # when many do (fewer re-reads of the weight tiles). Shapes only: no host sync.
        per_expert = t * topk / num_experts
        block_m = 16 if per_expert <= 16 else 32 if per_expert <= 48 else 64
    sorted_ids, block_expert = moe_align(topk_ids, num_experts, block_m)
    pairs = t * topk
    inter = torch.empty(pairs, two_i, dtype=x.dtype, device=x.device)
    _moe_gemm(
        x,
        w_gate_up,
        inter,
        sorted_ids,
        block_expert,
        topk,
        None,
        False,
        block_m,
        block_n,
        block_k,
        num_warps,
    )
    act = silu_and_mul(inter)
    out = torch.empty(pairs, h, dtype=x.dtype, device=x.device)
    weights = topk_weights.reshape(-1).contiguous()
    _moe_gemm(
        act,
        w_down,
        out,
        sorted_ids,
        block_expert,
        topk,
        weights,
        True,
        block_m,
        block_n,
        block_k,
        num_warps,
    )
    return out.view(t, topk, h).sum(dim=1)
