"""Mixture-of-experts MLP for a handful of tokens: two streaming GEMV kernels, no sorting.

At decode batch sizes each routed (token, slot) pair is one row against its expert's weights:
a GEMV, bound by the bytes of the expert rows it streams. The grouped-GEMM path
(fused_moe.py) sorts pairs into BLOCK_M-row blocks for tl.dot; at 1-16 tokens nearly every
row of a block is padding and the sort costs several small kernels per layer. Here:

1. gate_up: grid (pair, column tile). A program reads its pair's token row and the gate and
   up rows of the same I-columns of its expert, accumulates both in fp32 (elementwise
   multiply-add over the K steps, one tl.sum at the end: M=1 has no use for tensor cores) and
   writes silu(gate) * up, so the [pairs, 2I] pre-activation never goes to memory.
2. down: grid (token, column tile). A program reads the down rows of all k experts of its
   token at once ([k, BLOCK_N, BLOCK_K] tiles, so k streams are in flight together, not one
   after another) and writes sum_j w_j * down_j(act_j) for its H-columns. The top-k sum is
   done in registers in a fixed order: deterministic, no fp32 atomics, no zero-fill of an
   accumulator, no extra reduction kernel.

A pair with routing weight 0 is skipped (no bytes read): under tensor parallelism the caller
gives other ranks' experts weight 0, so a rank streams only its own experts' rows.

Pairs that share an expert each stream its rows; the pair axis is the fastest-varying grid
axis, so such programs run side by side and the repeats mostly hit L2. `use_small_m` keeps this
path to batches where that re-reading stays small. Only shapes decide anything: no host sync,
so the layer can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# Expected weight re-reads (pairs / distinct experts hit, uniform routing) up to which the GEMV
# path is used. Each pair streams its expert's rows, so at factor f the kernels move f x the
# bytes of the grouped GEMM through L2 (repeats run as concurrent programs: expected L2 hits) and do
# f x the CUDA-core FMAs; past that the grouped GEMM, which reads each expert once per block of
# tokens with tensor cores, is the better bet.
#
# Measured on the H200 (benchmarks/results/moe-kernels-h200.json, 777b8ad, expert shapes of the
# presets, t tokens): Mixtral (E=8, k=2) GEMV wins at t=1 (0.21 vs 0.30 ms) and t=2 (re-read
# 1.14), loses from t=4 (1.46: 0.60 vs 0.51 ms); Qwen3-30B-A3B (E=128, k=8) wins up to t=16
# (re-read 1.55, by 4%) and loses at t=32 (0.42 vs 0.34 ms). 1.3 takes every clear win and
# leaves only Qwen3's t=16 near-tie to the grouped GEMM. GRAPHWISE_MOE_SMALL_M_MAX_REREAD
# overrides it (0 switches the GEMV path off).
SMALL_M_MAX_REREAD = float(os.environ.get("GRAPHWISE_MOE_SMALL_M_MAX_REREAD", "1.3") or 0)
# Launch at least this many programs per SM (when the shape has enough columns) so that
# enough loads are in flight to cover HBM latency: Little's law at ~4.8 TB/s and ~1 us needs
# ~36 KB per SM in flight, i.e. several programs with several KB each.
PROGRAMS_PER_SM = 8
# Weight elements one program loads per loop step (each of gate and up in the first kernel):
# 4096 bf16 = 8 KB, 32 elements (4 x 16-byte loads) per thread at 4 warps, plus as many fp32
# partial sums. Compiled for sm_90: gate_up ~128 registers a thread (4 programs resident per
# SM, 64 KB of loads in flight per SM), down ~80.
TILE_ELEMS = 4096
# Shortest K step worth narrowing the column tile for: 256 bf16 = 512 contiguous bytes of each
# weight row per step (a few DRAM bursts rather than one 128-byte line per row).
MIN_BLOCK_K = 256
# Launch settings; scripts/moe_kernel_bench.py sweeps these and the constants above. No
# num_stages: Triton (3.6 and 3.9, sm_90) software-pipelines only loads that feed tl.dot; these
# kernels compile to the same SASS at 1 and 3 stages. Loads in flight come from wide tiles (one
# loop step loads 4 x 16 bytes per thread per weight tile) and several resident programs per SM.
NUM_WARPS = 4


def expected_reread(tokens: int, topk: int, num_experts: int) -> float:
    """Pairs per distinct expert hit when `tokens` tokens each pick `topk` of `num_experts`
    experts uniformly: pairs / (E * (1 - (1 - k/E)^t))."""
    pick = min(1.0, topk / num_experts)  # under TP a rank may hold fewer experts than k
    hit = num_experts * (1.0 - (1.0 - pick) ** tokens)
    return tokens * topk / max(hit, 1e-9)


def use_small_m(tokens: int, topk: int, num_experts: int) -> bool:
    """Whether fused_moe takes the GEMV path for this shape (shapes only: graph-safe)."""
    return tokens >= 1 and expected_reread(tokens, topk, num_experts) <= SMALL_M_MAX_REREAD


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # interpreter: few programs, fast tests
    return torch.cuda.get_device_properties(device).multi_processor_count


def _tiles(rows: int, n: int, k: int, slots: int, target: int, tile_elems: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) for `rows` x cdiv(n, BLOCK_N) programs, each loading `slots` weight
    tiles of BLOCK_N x BLOCK_K per step. BLOCK_N: the largest power of two in [2, 64] that
    gives `target` programs, but no wider than leaves BLOCK_K >= MIN_BLOCK_K (long contiguous
    runs of each weight row per step). BLOCK_K: the rest of the `tile_elems` budget."""
    k_pow2 = triton.next_power_of_2(k)
    widest = max(2, tile_elems // (slots * min(MIN_BLOCK_K, k_pow2)))
    block_n = min(64, triton.next_power_of_2(widest + 1) // 2)
    while block_n > 2 and rows * triton.cdiv(n, block_n) < target:
        block_n //= 2
    block_k = max(16, min(k_pow2, tile_elems // (slots * block_n)))
    return block_n, block_k


@triton.jit
def _gate_up_silu_kernel(
    x_ptr,
    w_ptr,
    act_ptr,
    ids_ptr,
    weights_ptr,
    N,
    K,
    stride_xm,
    stride_we,
    stride_wn,
    stride_am,
    TOPK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    if tl.load(weights_ptr + pair).to(tl.float32) == 0.0:
        return  # another rank's expert (or a zero weight): the down kernel skips it too
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    x_row = x_ptr + (pair // TOPK).to(tl.int64) * stride_xm
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    # rows [0, N) of w are the gate projection, [N, 2N) the up projection
    gate_rows = w_ptr + expert * stride_we + offs_n[:, None].to(tl.int64) * stride_wn
    up_rows = gate_rows + N * stride_wn
    # elementwise fp32 partial sums, reduced over K once after the loop: a tl.sum per step
    # crosses warps (shared memory + barriers every step) whenever the layout splits K
    acc_gate = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < K
        w_mask = n_mask[:, None] & k_mask[None, :]
        # x's chunk loaded at the weight tile's full shape (repeats hit L1), so that it lands in
        # the same register layout: a [BLOCK_K] load broadcast later costs a shared-memory
        # layout conversion and barriers every step
        x_ptrs = tl.broadcast_to(x_row + kk[None, :], (BLOCK_N, BLOCK_K))
        xk = tl.load(x_ptrs, mask=w_mask, other=0.0).to(tl.float32)
        g = tl.load(gate_rows + kk[None, :], mask=w_mask, other=0.0).to(tl.float32)
        u = tl.load(up_rows + kk[None, :], mask=w_mask, other=0.0).to(tl.float32)
        acc_gate += g * xk
        acc_up += u * xk
    gate = tl.sum(acc_gate, axis=1)
    act = gate * tl.sigmoid(gate) * tl.sum(acc_up, axis=1)
    tl.store(
        act_ptr + pair.to(tl.int64) * stride_am + offs_n,
        act.to(act_ptr.dtype.element_ty),
        mask=n_mask,
    )


@triton.jit
def _down_sum_kernel(
    act_ptr,
    w_ptr,
    out_ptr,
    ids_ptr,
    weights_ptr,
    N,
    K,
    stride_am,
    stride_we,
    stride_wn,
    stride_om,
    TOPK: tl.constexpr,
    TOPK_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    token = tl.program_id(0)
    pid_n = tl.program_id(1)
    slots = tl.arange(0, TOPK_PAD)
    pairs = token * TOPK + slots
    gate = tl.load(weights_ptr + pairs, mask=slots < TOPK, other=0.0).to(tl.float32)
    live = gate != 0.0  # padding slots and zero-weight pairs: masked, so never read
    experts = tl.load(ids_ptr + pairs, mask=live, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    w_rows = (
        w_ptr + experts[:, None, None] * stride_we + offs_n[None, :, None].to(tl.int64) * stride_wn
    )  # [TOPK_PAD, BLOCK_N, 1]
    # act rows loaded at the weight tile's full shape, as x in the gate_up kernel
    a_rows = tl.broadcast_to(
        act_ptr + pairs[:, None, None].to(tl.int64) * stride_am, (TOPK_PAD, BLOCK_N, 1)
    )
    row_mask = live[:, None, None] & n_mask[None, :, None]
    acc = tl.zeros((TOPK_PAD, BLOCK_N, BLOCK_K), dtype=tl.float32)  # reduced after the loop
    for k0 in range(0, K, BLOCK_K):
        kk = (k0 + offs_k)[None, None, :]
        k_mask = kk < K
        a = tl.load(a_rows + kk, mask=row_mask & k_mask, other=0.0)
        w = tl.load(w_rows + kk, mask=row_mask & k_mask, other=0.0)
        acc += w.to(tl.float32) * a.to(tl.float32)
    out = tl.sum(tl.sum(acc, axis=2) * gate[:, None], axis=0)
    tl.store(
        out_ptr + token.to(tl.int64) * stride_om + offs_n,
        out.to(out_ptr.dtype.element_ty),
        mask=n_mask,
    )


def fused_moe_small_m(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    tile_elems: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """fused_moe's result by two GEMV kernels (same arguments; see fused_moe). The launch
    settings default to the module's constants (read at call time, so a sweep can set them)."""
    tile_elems = tile_elems or TILE_ELEMS
    num_warps = num_warps or NUM_WARPS
    t, h = x.shape
    num_experts, two_i, _ = w_gate_up.shape
    inter = two_i // 2
    topk = topk_ids.shape[1]
    pairs = t * topk
    ids = topk_ids.contiguous()
    weights = topk_weights.contiguous()
    target = PROGRAMS_PER_SM * _num_sms(x.device)

    act = torch.empty(pairs, inter, dtype=x.dtype, device=x.device)
    bn, bk = _tiles(pairs, inter, h, 1, target, tile_elems)
    _gate_up_silu_kernel[(pairs, triton.cdiv(inter, bn))](
        x,
        w_gate_up,
        act,
        ids,
        weights,
        inter,
        h,
        x.stride(0),
        w_gate_up.stride(0),
        w_gate_up.stride(1),
        act.stride(0),
        TOPK=topk,
        BLOCK_N=bn,
        BLOCK_K=bk,
        num_warps=num_warps,
    )

    out = torch.empty(t, h, dtype=x.dtype, device=x.device)
    topk_pad = triton.next_power_of_2(topk)
    bn, bk = _tiles(t, h, inter, topk_pad, target, tile_elems)
    _down_sum_kernel[(t, triton.cdiv(h, bn))](
        act,
        w_down,
        out,
        ids,
        weights,
        h,
        inter,
        act.stride(0),
        w_down.stride(0),
        w_down.stride(1),
        out.stride(0),
        TOPK=topk,
        TOPK_PAD=topk_pad,
        BLOCK_N=bn,
        BLOCK_K=bk,
        num_warps=num_warps,
    )
    return out
