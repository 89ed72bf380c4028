"""Pure-PyTorch references for every kernel in ``graphwise.kernels``.

These are the numerical ground truth for the tests and the fallback when Triton cannot run.
They work on any device and any dtype, compute in fp32 where the kernels do, and follow the
same layouts (see README.md in this folder). They favour clarity over speed; they are not
meant to be captured in CUDA graphs (``extend_attention_ref`` reads offsets on the host).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# Paged KV cache
# ---------------------------------------------------------------------------------------------


def store_kv_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write ``k, v [T, Hkv, D]`` into the paged caches at flat slots; slot < 0 is skipped."""
    num_blocks, block_size, hkv, d = k_cache.shape
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    k_cache.view(num_blocks * block_size, hkv, d)[slots] = k[valid].to(k_cache.dtype)
    v_cache.view(num_blocks * block_size, hkv, d)[slots] = v[valid].to(v_cache.dtype)


def gather_kv_ref(
    cache: torch.Tensor, block_tables: torch.Tensor, max_len: int | None = None
) -> torch.Tensor:
    """Gather a paged cache into dense ``[B, max_blocks * block_size, Hkv, D]`` per sequence.

    Block-table entries past a sequence's end may hold anything (padding), so they are clamped
    into range; callers mask those positions out by ``seq_lens``.
    """
    num_blocks, block_size, hkv, d = cache.shape
    bt = block_tables.long().clamp(0, num_blocks - 1)
    dense = cache[bt]  # [B, max_blocks, block_size, Hkv, D]
    dense = dense.reshape(bt.shape[0], -1, hkv, d)
    return dense if max_len is None else dense[:, :max_len]


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


def decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query token per sequence against its paged KV. ``q [B, Hq, D]`` -> ``[B, Hq, D]``.

    Vectorised over the batch (no host sync): every sequence is gathered to the full
    ``max_blocks * block_size`` length and positions ``>= seq_len`` are masked. A lane with
    ``seq_len == 0`` outputs zeros.
    """
    b, hq, d = q.shape
    hkv = k_cache.shape[2]
    group = hq // hkv
    k = gather_kv_ref(k_cache, block_tables).float()  # [B, L, Hkv, D]
    v = gather_kv_ref(v_cache, block_tables).float()
    k = k.repeat_interleave(group, dim=2)  # [B, L, Hq, D]
    v = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bhd,blhd->bhl", q.float(), k) * scale  # [B, Hq, L]
    pos = torch.arange(k.shape[1], device=q.device)
    valid = pos[None, :] < seq_lens.to(q.device).long()[:, None]  # [B, L]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    # Slots past a sequence's end may hold garbage (even NaN); 0 * NaN would leak through.
    v = v.masked_fill(~valid[:, :, None, None], 0.0)
    probs = torch.softmax(scores, dim=-1)
    # An all-masked row (padding lane) gives NaN from softmax; its output is defined as zero.
    probs = torch.nan_to_num(probs, nan=0.0)
    result = torch.einsum("bhl,blhd->bhd", probs, v).to(q.dtype)
    if out is None:
        return result
    out.copy_(result)
    return out


def extend_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Packed causal prefill/extend against the paged cache. ``q [T, Hq, D]`` -> ``[T, Hq, D]``.

    Query ``i`` of sequence ``b`` sits at absolute position ``seq_len - q_len + i`` and sees keys
    at positions ``<= `` that. Loops over sequences on the host (reads ``cu_seqlens_q``).
    """
    _, hq, d = q.shape
    hkv = k_cache.shape[2]
    group = hq // hkv
    result = torch.zeros_like(q) if out is None else out
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    for b in range(len(lens)):
        q_start, q_end = cu[b], cu[b + 1]
        q_len, kv_len = q_end - q_start, lens[b]
        if q_len == 0:
            continue
        k = gather_kv_ref(k_cache, block_tables[b : b + 1], kv_len)[0].float()  # [L, Hkv, D]
        v = gather_kv_ref(v_cache, block_tables[b : b + 1], kv_len)[0].float()
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        qb = q[q_start:q_end].float()  # [Lq, Hq, D]
        scores = torch.einsum("qhd,khd->hqk", qb, k) * scale
        q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)
        k_pos = torch.arange(kv_len, device=q.device)
        causal = k_pos[None, :] <= q_pos[:, None]
        scores = scores.masked_fill(~causal[None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        result[q_start:q_end] = torch.einsum("hqk,khd->qhd", probs, v).to(result.dtype)
    return result


# ---------------------------------------------------------------------------------------------
# Norms, rotary embedding, activation
# ---------------------------------------------------------------------------------------------


def rmsnorm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """HF Llama RMSNorm numerics: normalise in fp32, round to the input dtype, then scale."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    result = (weight * h.to(x.dtype)).to(x.dtype)
    if out is None:
        return result
    out.copy_(result)
    return out


def fused_add_rmsnorm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> None:
    """In place: ``residual += x``; ``x = rmsnorm(residual) * weight``."""
    residual.add_(x)
    x.copy_(rmsnorm_ref(residual, weight, eps))


def rope_qkv_ref_(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> None:
    """In place NeoX/rotate_half rotary embedding on the q and k heads of a packed qkv."""
    t = qkv.shape[0]
    half = head_dim // 2
    n_rot = num_q_heads + num_kv_heads
    cs = cos_sin_cache[positions.long()].float()  # [T, D]
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    qk = qkv[:, : n_rot * head_dim].view(t, n_rot, head_dim)
    x1, x2 = qk[..., :half].float(), qk[..., half:].float()
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    qk.copy_(rotated.to(qkv.dtype))


def silu_and_mul_ref(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(x[:, :I]) * x[:, I:]``, rounding like the eager HF MLP (silu in dtype, then mul)."""
    inter = x.shape[-1] // 2
    result = F.silu(x[..., :inter]) * x[..., inter:]
    if out is None:
        return result
    out.copy_(result)
    return out


def dense_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Plain attention for one sequence: ``q [Lq, Hq, D]``, ``k, v [L, Hkv, D]``, bottom-right
    aligned causal mask (query ``i`` at position ``L - Lq + i``). Independent check for tests."""
    lq, hq, _ = q.shape
    lk, hkv, _ = k.shape
    group = hq // hkv
    qh = q.float().transpose(0, 1)  # [Hq, Lq, D]
    kh = k.float().repeat_interleave(group, dim=1).transpose(0, 1)
    vh = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
    o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return o.transpose(0, 1).to(q.dtype)
