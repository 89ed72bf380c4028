"""Pure-PyTorch attention over the paged KV cache: the reference, and the CPU path.

Decode is vectorised over the batch with fixed shapes (so it can be captured in a CUDA graph);
prefill/extend loops over sequences with scaled_dot_product_attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
    ) -> None:
        slots = torch.where(slot_mapping < 0, self.scratch_slot, slot_mapping)
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
    ) -> torch.Tensor:
        self.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.is_decode:
            return decode_attention_torch(
                q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale
            )
        return extend_attention_torch(q, k_cache, v_cache, meta, scale)


def decode_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    B, Hq, D = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    L = block_tables.shape[1] * block_size
    k = k_cache[block_tables].reshape(B, L, Hkv, D)
    v = v_cache[block_tables].reshape(B, L, Hkv, D)
    qg = q.view(B, Hkv, Hq // Hkv, D).float()
    scores = torch.einsum("bhgd,blhd->bhgl", qg, k.float()) * scale
    pad = torch.arange(L, device=q.device)[None, :] >= seq_lens[:, None]
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
) -> torch.Tensor:
    _, block_size, Hkv, D = k_cache.shape
    out = torch.empty_like(q)
    start = 0
    for b, (q_len, seq_len) in enumerate(zip(meta.q_lens_cpu, meta.seq_lens_cpu, strict=True)):
        num_blocks = -(-seq_len // block_size)
        blocks = meta.block_tables[b, :num_blocks]
        ks = k_cache[blocks].reshape(-1, Hkv, D)[:seq_len]
        vs = v_cache[blocks].reshape(-1, Hkv, D)[:seq_len]
        qs = q[start : start + q_len]
        # Query i sits at position seq_len - q_len + i and sees keys up to that position.
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]
        o = F.scaled_dot_product_attention(
            qs.transpose(0, 1).unsqueeze(0),
            ks.transpose(0, 1).unsqueeze(0),
            vs.transpose(0, 1).unsqueeze(0),
            attn_mask=mask,
            scale=scale,
            enable_gqa=True,
        )
        out[start : start + q_len] = o.squeeze(0).transpose(0, 1)
        start += q_len
    return out
