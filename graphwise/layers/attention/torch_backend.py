"""Pure-PyTorch attention over the paged KV cache: the reference, and the CPU path.

Decode is vectorised over the batch with fixed shapes (so it can be captured in a CUDA graph);
prefill/extend loops over sequences with scaled_dot_product_attention, or, for a soft-capped
layer (which SDPA cannot express), with HF's eager arithmetic.

An FP8 (e4m3) cache is written with ``quantize_kv_fp8`` (x / scale, saturated) and the
gathered K/V are dequantized (times the scale) before the arithmetic, which is unchanged: the
CPU path computes what the Triton kernels compute, from the same cache contents.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from graphwise.kernels.reference import (
    FP8_KV_DTYPE,
    dequantize_kv,
    gather_blocks,
    quantize_kv_fp8,
)
from graphwise.layers.attention.backend import AttentionBackend, AttentionMetadata


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def __init__(self, scratch_slot: int) -> None:
        # Padding lanes (slot -1) write into a slot no sequence owns, so the store needs no
        # data-dependent indexing (which would sync the host and break graph capture).
        self.scratch_slot = scratch_slot

    def store_kv(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> None:
        slots = torch.where(slot_mapping < 0, self.scratch_slot, slot_mapping)
        if k_cache.dtype == FP8_KV_DTYPE:
            k, v = quantize_kv_fp8(k, k_scale), quantize_kv_fp8(v, v_scale)
            # index_copy_ has no fp8 kernel on the CPU: copy the raw bytes.
            k_cache, v_cache, k, v = (t.view(torch.uint8) for t in (k_cache, v_cache, k, v))
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k)
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        softcap: float | None = None,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> torch.Tensor:
        self.store_kv(k, v, k_cache, v_cache, meta.slot_mapping, k_scale, v_scale)
        if meta.is_decode:
            return decode_attention_torch(
                q,
                k_cache,
                v_cache,
                meta.block_tables,
                meta.seq_lens,
                scale,
                sliding_window,
                softcap,
                k_scale,
                v_scale,
            )
        return extend_attention_torch(
            q, k_cache, v_cache, meta, scale, sliding_window, softcap, k_scale, v_scale
        )


def _softcap(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    # HF's order of operations: divide, tanh, multiply.
    return scores if not softcap else torch.tanh(scores / softcap) * softcap


def decode_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    B, Hq, D = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    L = block_tables.shape[1] * block_size
    k = gather_blocks(k_cache, block_tables).reshape(B, L, Hkv, D)
    v = gather_blocks(v_cache, block_tables).reshape(B, L, Hkv, D)
    k, v = dequantize_kv(k, k_scale, torch.float32), dequantize_kv(v, v_scale, torch.float32)
    qg = q.view(B, Hkv, Hq // Hkv, D).float()
    scores = _softcap(torch.einsum("bhgd,blhd->bhgl", qg, k.float()) * scale, softcap)
    pos = torch.arange(L, device=q.device)[None, :]
    pad = pos >= seq_lens[:, None]
    if sliding_window:  # only the last `sliding_window` keys (shapes stay fixed: graph-safe)
        pad |= pos < seq_lens[:, None] - sliding_window
    scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # empty (padding) lanes give zeros
    out = torch.einsum("bhgl,blhd->bhgd", probs, v.float())
    return out.to(q.dtype).reshape(B, Hq, D)


def extend_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    _, block_size, Hkv, D = k_cache.shape
    out = torch.empty_like(q)
    start = 0
    for b, (q_len, seq_len) in enumerate(zip(meta.q_lens_cpu, meta.seq_lens_cpu, strict=True)):
        # Keys before the first query's window are seen by no query of this chunk: skip them.
        first = max(0, seq_len - q_len - sliding_window + 1) if sliding_window else 0
        num_blocks = -(-seq_len // block_size)
        blocks = meta.block_tables[b, first // block_size : num_blocks]
        skip = first - first // block_size * block_size
        ks = gather_blocks(k_cache, blocks).reshape(-1, Hkv, D)[skip : skip + seq_len - first]
        vs = gather_blocks(v_cache, blocks).reshape(-1, Hkv, D)[skip : skip + seq_len - first]
        ks, vs = dequantize_kv(ks, k_scale, q.dtype), dequantize_kv(vs, v_scale, q.dtype)
        qs = q[start : start + q_len]
        # Query i sits at position seq_len - q_len + i and sees keys up to that position (and,
        # with a window, after position - window).
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        k_pos = torch.arange(first, seq_len, device=q.device)
        mask = k_pos[None, :] <= q_pos[:, None]
        if sliding_window:
            mask &= k_pos[None, :] > q_pos[:, None] - sliding_window
        qh, kh, vh = (x.transpose(0, 1).unsqueeze(0) for x in (qs, ks, vs))
        if softcap:
            o = _eager_softcap_attention(qh, kh, vh, mask, scale, softcap)
        else:
            o = F.scaled_dot_product_attention(
                qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True
            )
        out[start : start + q_len] = o.squeeze(0).transpose(0, 1)
        start += q_len
    return out


def _eager_softcap_attention(
    q: torch.Tensor,  # [1, Hq, Lq, D]
    k: torch.Tensor,  # [1, Hkv, L, D]
    v: torch.Tensor,
    mask: torch.Tensor,  # [Lq, L] bool, True = visible
    scale: float,
    softcap: float,
) -> torch.Tensor:
    """HF Gemma 2's eager attention: q.k * scale, soft-cap, mask, softmax in fp32, times v."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = _softcap(torch.matmul(q, k.transpose(2, 3)) * scale, softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)
