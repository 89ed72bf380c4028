"""Sampling-side kernels over [N, vocab] float32 logits: the penalties in one pass, and the
rank and top-k of sampled logprobs in one pass.

At Qwen2.5-7B's vocabulary (152,064) a batch of 64 rows is 39 MB of float32 per pass; the
torch versions (runner/logits_processors.py `penalize_reference`, runner/logprobs.py) make
about twenty elementwise passes for the penalties and several (compare, sum, radix top-k) for
the logprobs. These read each row once and write it at most once, with the torch versions'
arithmetic in the same order, so the results are bit-identical (the top-k ids may differ only
between equal values, which torch.topk leaves unordered too).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

PENALTY_BLOCK = 2048
TOPK_BLOCK = 4096
# Wider top-k asks (logprobs > this) go to torch.topk: the per-block selection below costs a
# reduction per k.
MAX_KERNEL_TOPK = 32


@triton.jit
def _penalties_kernel(
    logits_ptr,
    rows_ptr,
    counts_ptr,
    rep_ptr,
    pres_ptr,
    freq_ptr,
    stride_l,
    stride_c,
    vocab,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < vocab
    row = tl.load(rows_ptr + r).to(tl.int64)
    x = tl.load(logits_ptr + row * stride_l + offs, mask=mask, other=0.0)
    c = tl.load(counts_ptr + r.to(tl.int64) * stride_c + offs, mask=mask, other=0)
    rep = tl.load(rep_ptr + r)
    pres = tl.load(pres_ptr + r)
    freq = tl.load(freq_ptr + r)
    # counts: bit 0 = the token occurs anywhere so far, bits 1.. = how often it was generated.
    generated = c >> 1
    repeated = tl.where(x > 0, tl.math.div_rn(x, rep), x * rep)
    x = tl.where(c > 0, repeated, x)
    x = x - freq * generated.to(tl.float32)
    x = x - pres * (generated > 0).to(tl.float32)
    tl.store(logits_ptr + row * stride_l + offs, x, mask=mask)


def apply_penalties_(
    logits: torch.Tensor,
    rows: torch.Tensor,
    counts: torch.Tensor,
    repetition: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
) -> None:
    """In place on float32 `logits` [N, V] (unit stride along V): for each r, row `rows[r]`
    gets HF's repetition penalty `repetition[r]` on the tokens seen so far, then OpenAI's
    frequency and presence penalties on the generated ones. `counts` [R, >= V] int32 packs
    both: bit 0 set where the token occurs at all, the rest the generated count times 2."""
    num, vocab = rows.shape[0], logits.shape[1]
    if num == 0:
        return
    assert logits.dtype == torch.float32 and logits.stride(1) == 1 and counts.stride(1) == 1
    grid = (num, triton.cdiv(vocab, PENALTY_BLOCK))
    _penalties_kernel[grid](
        logits,
        rows,
        counts,
        repetition,
        presence,
        frequency,
        logits.stride(0),
        counts.stride(0),
        vocab,
        BLOCK=PENALTY_BLOCK,
        # No fused multiply-add: torch rounds `freq * count` before subtracting it, and so
        # must this, to stay bit-identical.
        enable_fp_fusion=False,
    )


@triton.jit
def _sortable(x):
    """float32 -> int32 keys in the same order (NaN above +inf, as torch.topk puts it)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _rank_topk_kernel(
    lp_ptr,
    token_lp_ptr,
    above_ptr,
    cand_key_ptr,
    cand_id_ptr,
    stride_lp,
    vocab,
    num_blocks,
    K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    offs = block * BLOCK + tl.arange(0, BLOCK)
    mask = offs < vocab
    x = tl.load(lp_ptr + row * stride_lp + offs, mask=mask, other=float("-inf"))
    t = tl.load(token_lp_ptr + row)
    above = tl.sum(((x > t) & mask).to(tl.int32), axis=0)
    out = row * num_blocks + block
    tl.store(above_ptr + out, above)
    lowest = -2147483648  # below every real key (-inf's included): lanes out of the race
    keys = tl.where(mask, _sortable(x), lowest)
    for j in tl.static_range(K):
        best = tl.max(keys, axis=0)
        at = tl.min(tl.where(keys == best, offs, 2147483647), axis=0)
        tl.store(cand_key_ptr + out * K + j, best)
        tl.store(cand_id_ptr + out * K + j, at.to(tl.int64))
        keys = tl.where(offs == at, lowest, keys)


def rank_and_topk(
    logprobs: torch.Tensor, token_lp: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For float32 `logprobs` [N, V] and each row's token logprob `token_lp` [N, 1]: the rank
    (1 + how many logprobs are larger) [N, 1] int64, and the top-k logprobs [N, k] and their
    ids [N, k] int64 (largest first). One read of `logprobs`: each block of a row counts and
    keeps its own k best, then torch picks the row's k among those few candidates."""
    num, vocab = logprobs.shape
    assert logprobs.dtype == torch.float32 and logprobs.stride(1) == 1
    assert 0 < k <= min(vocab, MAX_KERNEL_TOPK)
    num_blocks = triton.cdiv(vocab, TOPK_BLOCK)
    dev = logprobs.device
    above = torch.empty((num, num_blocks), dtype=torch.int32, device=dev)
    cand_key = torch.empty((num, num_blocks * k), dtype=torch.int32, device=dev)
    cand_id = torch.empty((num, num_blocks * k), dtype=torch.int64, device=dev)
    token = token_lp.reshape(num).contiguous()
    _rank_topk_kernel[(num, num_blocks)](
        logprobs,
        token,
        above,
        cand_key,
        cand_id,
        logprobs.stride(0),
        vocab,
        num_blocks,
        K=k,
        BLOCK=TOPK_BLOCK,
    )
    rank = above.sum(dim=1, keepdim=True, dtype=torch.int64) + 1
    pick = cand_key.topk(k, dim=1).indices
    ids = cand_id.gather(1, pick)
    return rank, logprobs.gather(1, ids), ids
