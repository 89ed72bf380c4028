"""Scheduler: continuous batching with chunked prefill, a token budget and preemption.

Every step each sequence gets some number of new tokens to compute: 1 for a sequence that is
decoding, a chunk of its prompt for one that is prefilling. Running sequences go first (oldest
first); waiting ones are admitted while the token budget, `max_num_seqs` and the KV pool allow.
When a running sequence needs a block and none is free, the newest running sequence is preempted:
its blocks are released and it re-enters the waiting queue to be recomputed later (its prefix
will usually still be in the cache).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from graphwise.engine.block_manager import BlockManager
from graphwise.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_decode_only(self) -> bool:
        return all(n == 1 for n in self.num_new_tokens) and all(
            s.num_computed_tokens + 1 == s.num_tokens for s in self.seqs
        )

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool = True,
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, seq: Sequence) -> None:
        """Remove a sequence wherever it is and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.release(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.release(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        bm = self.block_manager

        # 1. Running sequences, oldest first; the newest is the first to give way.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.num_tokens >= seq.max_total_tokens:
                # Its pending token is its last (length limit): it finishes when that resolves.
                i += 1
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not bm.allocate_slots(seq, seq.num_computed_tokens + n):
                victim = self.running.pop()
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            else:
                batch.seqs.append(seq)
                batch.num_new_tokens.append(n)
                budget -= n
                i += 1

        # 2. Waiting sequences, in arrival order, unless this step already had to preempt.
        while (
            self.waiting
            and not batch.preempted
            and budget > 0
            and len(self.running) < self.max_num_seqs
        ):
            seq = self.waiting[0]
            cached = bm.find_cached_prefix(seq)
            num_cached = len(cached) * bm.block_size
            remaining = seq.num_tokens - num_cached
            if remaining > budget and not self.enable_chunked_prefill:
                break
            n = min(remaining, budget)
            if not bm.can_admit(seq, cached, num_cached + n):
                break
            self.waiting.popleft()
            bm.admit(seq, cached)
            ok = bm.allocate_slots(seq, num_cached + n)
            assert ok, "can_admit promised room"
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
                seq.num_cached_tokens = num_cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
        return batch

    def finish(self, seq: Sequence) -> None:
        """A sequence is done: free its blocks (it may have been preempted while its last token
        was being sampled, so it can be in either queue)."""
        self.abort(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finished_time = time.monotonic()
