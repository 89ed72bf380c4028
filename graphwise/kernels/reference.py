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


FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_E4M3_MAX = 448.0  # the largest finite e4m3 value


def quantize_kv_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """An FP8 KV cache's entries: ``x / scale`` in fp32, saturated to +-448, rounded to the
    nearest e4m3 value (ties to even). vLLM's per-tensor ``k_scale`` / ``v_scale``."""
    return (x.float() / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_KV_DTYPE)


def dequantize_kv(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Cache entries as ``dtype`` values: an FP8 cache times its scale (in fp32, then cast);
    any other cache as it is (its dtype is the model's)."""
    if x.dtype != FP8_KV_DTYPE:
        return x.to(dtype)
    return (x.float() * scale).to(dtype)


def gather_blocks(cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``cache[index]`` for any cache dtype: an fp8 cache is indexed through its bytes (not every
    indexing kernel of every torch build takes float8)."""
    if cache.dtype != FP8_KV_DTYPE:
        return cache[index]
    return cache.view(torch.uint8)[index].view(FP8_KV_DTYPE)


def store_kv_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Write ``k, v [T, Hkv, D]`` into the paged caches at flat slots; slot < 0 is skipped.
    An FP8 cache gets ``quantize_kv_fp8`` of them."""
    num_blocks, block_size, hkv, d = k_cache.shape
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    if k_cache.dtype == FP8_KV_DTYPE:
        k, v = quantize_kv_fp8(k, k_scale), quantize_kv_fp8(v, v_scale)
        # Indexed writes are not implemented for fp8 on the CPU: write the raw bytes.
        k_cache, v_cache, k, v = (t.view(torch.uint8) for t in (k_cache, v_cache, k, v))
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
    dense = gather_blocks(cache, bt)  # [B, max_blocks, block_size, Hkv, D]
    dense = dense.reshape(bt.shape[0], -1, hkv, d)
    return dense if max_len is None else dense[:, :max_len]


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------
# Two per-layer options shared by every attention path (HF semantics):
# - ``sliding_window`` W: the query at position p sees keys k with p - W < k <= p (W keys,
#   itself included); None or 0 means no window.
# - ``softcap`` c: scores s = scale * q.k become c * tanh(s / c) before the mask and softmax
#   (Gemma 2); None or 0 means no cap.


def softcap_scores(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """``c * tanh(s / c)`` in HF's order of operations (divide, tanh, multiply)."""
    if not softcap:
        return scores
    return torch.tanh(scores / softcap) * softcap


def visible_keys(
    q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: int | None
) -> torch.Tensor:
    """``[Lq, Lk]`` bool: key ``k_pos[j]`` is visible to the query at ``q_pos[i]``."""
    mask = k_pos[None, :] <= q_pos[:, None]
    if sliding_window:
        mask &= k_pos[None, :] > q_pos[:, None] - sliding_window
    return mask


def decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """One query token per sequence against its paged KV. ``q [B, Hq, D]`` -> ``[B, Hq, D]``.

    Vectorised over the batch (no host sync): every sequence is gathered to the full
    ``max_blocks * block_size`` length and positions ``>= seq_len`` (and, with a sliding
    window, ``< seq_len - window``) are masked. A lane with ``seq_len == 0`` outputs zeros.
    An FP8 cache is dequantized (times ``k_scale`` / ``v_scale``) in fp32.
    """
    b, hq, d = q.shape
    hkv = k_cache.shape[2]
    group = hq // hkv
    k = dequantize_kv(gather_kv_ref(k_cache, block_tables), k_scale, torch.float32)
    v = dequantize_kv(gather_kv_ref(v_cache, block_tables), v_scale, torch.float32)
    k = k.repeat_interleave(group, dim=2)  # [B, L, Hq, D]
    v = v.repeat_interleave(group, dim=2)
    scores = softcap_scores(torch.einsum("bhd,blhd->bhl", q.float(), k) * scale, softcap)
    pos = torch.arange(k.shape[1], device=q.device)
    lens = seq_lens.to(q.device).long()[:, None]
    valid = pos[None, :] < lens  # [B, L]
    if sliding_window:
        valid &= pos[None, :] >= lens - sliding_window
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
    sliding_window: int | None = None,
    softcap: float | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Packed causal prefill/extend against the paged cache. ``q [T, Hq, D]`` -> ``[T, Hq, D]``.

    Query ``i`` of sequence ``b`` sits at absolute position ``seq_len - q_len + i`` and sees keys
    at positions ``<= `` that (and, with a sliding window, ``> position - window``). Loops over
    sequences on the host (reads ``cu_seqlens_q``). FP8 caches as in ``decode_attention_ref``.
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
        # Keys before the first query's window are seen by no query (and may hold anything).
        lo = max(0, kv_len - q_len - sliding_window + 1) if sliding_window else 0
        k = gather_kv_ref(k_cache, block_tables[b : b + 1], kv_len)[0, lo:]  # [L, Hkv, D]
        v = gather_kv_ref(v_cache, block_tables[b : b + 1], kv_len)[0, lo:]
        k = dequantize_kv(k, k_scale, torch.float32)
        v = dequantize_kv(v, v_scale, torch.float32)
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        qb = q[q_start:q_end].float()  # [Lq, Hq, D]
        scores = softcap_scores(torch.einsum("qhd,khd->hqk", qb, k) * scale, softcap)
        q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)
        k_pos = torch.arange(lo, kv_len, device=q.device)
        visible = visible_keys(q_pos, k_pos, sliding_window)
        scores = scores.masked_fill(~visible[None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        result[q_start:q_end] = torch.einsum("hqk,khd->qhd", probs, v).to(result.dtype)
    return result


# ---------------------------------------------------------------------------------------------
# Norms, rotary embedding, activation
# ---------------------------------------------------------------------------------------------


def rmsnorm_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
    gemma: bool = False,
) -> torch.Tensor:
    """HF Llama RMSNorm numerics: normalise in fp32, round to the input dtype, then scale.
    With ``gemma``: HF Gemma's ``(x * (1 + weight))`` in fp32, rounded once at the end."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        result = (h * (1.0 + weight.float())).to(x.dtype)
    else:
        result = (weight * h.to(x.dtype)).to(x.dtype)
    if out is None:
        return result
    out.copy_(result)
    return out


def fused_add_rmsnorm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool = False
) -> None:
    """In place: ``residual += x``; ``x = rmsnorm(residual) * weight``."""
    residual.add_(x)
    x.copy_(rmsnorm_ref(residual, weight, eps, gemma=gemma))


def head_rmsnorm_ref_(
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    eps: float,
    gemma: bool = False,
) -> None:
    """In place: RMSNorm over head_dim of the q heads and the k heads of a packed qkv."""
    t = qkv.shape[0]
    q_size, k_size = num_q_heads * head_dim, num_kv_heads * head_dim
    q = qkv[:, :q_size].view(t, num_q_heads, head_dim)
    k = qkv[:, q_size : q_size + k_size].view(t, num_kv_heads, head_dim)
    q.copy_(rmsnorm_ref(q, q_weight, eps, gemma=gemma))
    k.copy_(rmsnorm_ref(k, k_weight, eps, gemma=gemma))


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


def gelu_tanh_and_mul_ref(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``gelu_tanh(x[:, :I]) * x[:, I:]`` (HF ``gelu_pytorch_tanh``, rounded like eager)."""
    inter = x.shape[-1] // 2
    result = F.gelu(x[..., :inter], approximate="tanh") * x[..., inter:]
    if out is None:
        return result
    out.copy_(result)
    return out


def dense_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Plain attention for one sequence: ``q [Lq, Hq, D]``, ``k, v [L, Hkv, D]``, bottom-right
    aligned causal mask (query ``i`` at position ``L - Lq + i``), an optional sliding window
    (a band of the mask) and soft-cap. Independent check for tests: the mask is built as a band
    of a dense matrix, not from positions."""
    lq, hq, _ = q.shape
    lk, hkv, _ = k.shape
    group = hq // hkv
    qh = q.float().transpose(0, 1)  # [Hq, Lq, D]
    kh = k.float().repeat_interleave(group, dim=1).transpose(0, 1)
    vh = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    ones = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
    mask = ones.tril(diagonal=lk - lq)
    if sliding_window:
        mask &= ones.triu(diagonal=lk - lq - sliding_window + 1)
    if not softcap:
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
        return o.transpose(0, 1).to(q.dtype)
    scores = torch.tanh(qh @ kh.transpose(1, 2) * scale / softcap) * softcap
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return (probs @ vh).transpose(0, 1).to(q.dtype)
