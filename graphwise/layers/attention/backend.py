"""The attention backend interface and the metadata one forward step passes to it.

The graph runner knows nothing about kernels: it asks the backend for metadata that lives in
static buffers (`capture_metadata`) and, before each replay, to copy the real step's metadata into
them (`fill_replay_metadata`). Padding lanes get slot -1 (write nothing) and context length 0.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64, flat KV slot of each new token; -1 = padding lane
    seq_lens: torch.Tensor  # [B] int32, KV length of each sequence including the new tokens
    block_tables: torch.Tensor  # [B, max_blocks] int32
    cu_seqlens_q: torch.Tensor  # [B+1] int32, offsets of each sequence's new tokens
    is_decode: bool  # every sequence has exactly one new token
    max_q_len: int
    max_seq_len: int
    # Host copies, for paths that loop over sequences (the torch prefill reference).
    q_lens_cpu: list[int] = field(default_factory=list)
    seq_lens_cpu: list[int] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return int(self.seq_lens.shape[0])


@dataclass
class ForwardContext:
    """Everything a forward pass needs besides the token ids and positions."""

    meta: AttentionMetadata
    backend: AttentionBackend
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (k_cache, v_cache)


class AttentionBackend(ABC):
    name = "abstract"

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        softcap: float | None = None,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> torch.Tensor:  # [T, Hq, D]
        """Store the new tokens' K/V in the paged cache, then attend.

        Per-layer options (HF semantics): `sliding_window` W lets the query at position p see
        keys p - W < k <= p only; `softcap` c turns scores s into c * tanh(s / c). An FP8
        (`torch.float8_e4m3fn`) cache stores k / k_scale and v / v_scale (vLLM's per-tensor
        scales; plain floats, so a captured graph keeps them) and attention dequantizes;
        other caches ignore the scales."""

    # ---- CUDA-graph hooks -------------------------------------------------------------
    def init_graph_buffers(self, max_bs: int, max_blocks: int, device: torch.device) -> None:
        self.graph_max_blocks = max_blocks
        self.g_slot_mapping = torch.full((max_bs,), -1, dtype=torch.int64, device=device)
        self.g_seq_lens = torch.zeros(max_bs, dtype=torch.int32, device=device)
        self.g_block_tables = torch.zeros(max_bs, max_blocks, dtype=torch.int32, device=device)
        self.g_cu_seqlens_q = torch.arange(max_bs + 1, dtype=torch.int32, device=device)

    def capture_metadata(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.g_slot_mapping[:bs],
            seq_lens=self.g_seq_lens[:bs],
            block_tables=self.g_block_tables[:bs],
            cu_seqlens_q=self.g_cu_seqlens_q[: bs + 1],
            is_decode=True,
            max_q_len=1,
            max_seq_len=-1,  # unknown at capture time; decode kernels read seq_lens instead
        )

    def fill_replay_metadata(self, bs: int, meta: AttentionMetadata) -> None:
        """Copy a real decode step (n <= bs sequences) into the static buffers, padding the rest."""
        n = meta.batch_size
        self.g_slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.g_slot_mapping[n:bs].fill_(-1)
        self.g_seq_lens[:n].copy_(meta.seq_lens, non_blocking=True)
        self.g_seq_lens[n:bs].zero_()
        width = meta.block_tables.shape[1]
        self.g_block_tables[:n, :width].copy_(meta.block_tables, non_blocking=True)
