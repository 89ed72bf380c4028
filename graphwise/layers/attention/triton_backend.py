"""Triton attention on CUDA: paged KV store, split-K decode, packed variable-length extend."""

from __future__ import annotations

import torch

from graphwise.kernels import (
    alloc_decode_workspace,
    choose_num_splits,
    decode_attention,
    extend_attention,
    store_kv,
)
from graphwise.layers.attention.backend import AttentionBackend, AttentionMetadata


class TritonAttentionBackend(AttentionBackend):
    name = "triton"

    def __init__(self, scratch_slot: int) -> None:
        self.scratch_slot = scratch_slot  # unused: the Triton store skips padding lanes itself
        self.workspace: tuple[torch.Tensor, torch.Tensor] | None = None
        self._num_sms: int | None = None

    def _splits(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        block_tables: torch.Tensor,
        sliding_window: int | None,
    ) -> int:
        if self._num_sms is None:
            self._num_sms = torch.cuda.get_device_properties(q.device).multi_processor_count
        max_context = block_tables.shape[1] * k_cache.shape[1]
        if sliding_window:  # a windowed layer reads at most that many keys: fewer splits
            max_context = min(max_context, sliding_window)
        return choose_num_splits(q.shape[0], k_cache.shape[2], max_context, self._num_sms)

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
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping, k_scale=k_scale, v_scale=v_scale)
        if meta.is_decode:
            splits = self._splits(q, k_cache, meta.block_tables, sliding_window)
            if self.workspace is None:
                self._eager_workspace(q, k_cache)
            ws = self.workspace
            fits = (
                ws is not None
                and ws[0].shape[0] >= q.shape[0]
                and ws[0].shape[2] >= splits
                and ws[0].shape[1] == q.shape[1]
            )
            return decode_attention(
                q,
                k_cache,
                v_cache,
                meta.block_tables,
                meta.seq_lens,
                scale,
                num_splits=splits,
                workspace=ws if fits else None,
                sliding_window=sliding_window,
                softcap=softcap,
                k_scale=k_scale,
                v_scale=v_scale,
            )
        return extend_attention(
            q,
            k_cache,
            v_cache,
            meta.cu_seqlens_q,
            meta.seq_lens,
            meta.block_tables,
            scale,
            max_q_len=meta.max_q_len,
            sliding_window=sliding_window,
            softcap=softcap,
            k_scale=k_scale,
            v_scale=v_scale,
        )

    def _eager_workspace(self, q: torch.Tensor, k_cache: torch.Tensor) -> None:
        """Split-K only happens while batch x KV heads is below the SM count, so one buffer of
        that many rows and the maximum split count serves every eager decode step."""
        sms = self._num_sms or torch.cuda.get_device_properties(q.device).multi_processor_count
        rows = -(-sms // k_cache.shape[2])
        self.workspace = alloc_decode_workspace(rows, q.shape[1], q.shape[2], 32, q.device)

    def init_graph_buffers(self, max_bs: int, max_blocks: int, device: torch.device) -> None:
        super().init_graph_buffers(max_bs, max_blocks, device)
        self.graph_max_bs = max_bs

    def init_workspace(
        self,
        buckets: list[int],
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        device: torch.device,
    ) -> None:
        """One split-K scratch buffer big enough for every captured bucket (shared by graphs)."""
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        max_context = self.graph_max_blocks * page_size
        need = [(bs, choose_num_splits(bs, num_kv_heads, max_context, sms)) for bs in buckets]
        split_buckets = [(bs, s) for bs, s in need if s > 1]
        if not split_buckets:
            return
        self.workspace = alloc_decode_workspace(
            max(bs for bs, _ in split_buckets),
            num_q_heads,
            head_dim,
            max(s for _, s in split_buckets),
            device,
        )
