"""BlockManager: hands out paged-KV blocks, reference-counts them and caches full prompt blocks.

A full block is identified by the hash of its tokens chained with the hash of the block before
it, so two sequences with the same prefix map to the same blocks. A block whose reference count
drops to zero keeps its contents and its hash in an LRU "free" list: it is reused by a later
sequence with the same prefix, or recycled (and forgotten) when a fresh block is needed.

Parallel sampling (n > 1) forks a sequence once its prompt's KV is computed: the samples share
all of its blocks (`fork`). A shared block that is not full is copied when a sequence first
writes into it while others still hold it (copy-on-write, in `allocate_slots`): the writer gets
a fresh block and the copy (src, dst) is queued for the runner, which makes it on every layer
before the step's forward (`take_copies`). The last holder writes in place, so n samples cost
n - 1 copies of one block, and none when the prompt ends on a block boundary.
"""

from __future__ import annotations

from collections import OrderedDict

from graphwise.engine.sequence import Sequence


def block_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.hashes: list[int | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        # Blocks with no reference, least recently freed first; dict order is the LRU order.
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.prefix_hits = 0
        self.prefix_queries = 0
        # Copy-on-write copies (src, dst) made since the scheduler last took them.
        self.copies: list[tuple[int, int]] = []

    # ---- accounting -------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache -----------------------------------------------------------------
    def _compute_hashes(self, seq: Sequence, num_full_blocks: int) -> None:
        bs = self.block_size
        while len(seq.block_hashes) < num_full_blocks:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if i else None
            seq.block_hashes.append(block_hash(parent, tuple(seq.token_ids[i * bs : (i + 1) * bs])))

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks already holding this sequence's leading tokens (at least one token is left
        to compute, since sampling needs the last position's logits)."""
        if not self.enable_prefix_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        self._compute_hashes(seq, max_blocks)
        hits: list[int] = []
        for h in seq.block_hashes[:max_blocks]:
            block = self.hash_to_block.get(h)
            if block is None:
                break
            hits.append(block)
        self.prefix_queries += max_blocks
        self.prefix_hits += len(hits)
        return hits

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks that the last step filled (their KV is now written)."""
        if not self.enable_prefix_caching:
            return
        # Only tokens whose ids are known can be hashed (a pending token's KV may be computed).
        num_full = min(seq.num_computed_tokens, len(seq.token_ids)) // self.block_size
        start = seq.num_registered_blocks
        if num_full <= start:
            return
        self._compute_hashes(seq, num_full)
        # Blocks before `start` were looked at in an earlier step: each step visits new ones
        # only (all of a sequence's blocks every step costs milliseconds at large batch).
        for i in range(start, num_full):
            block = seq.block_table[i]
            if self.hashes[block] is not None:
                continue
            h = seq.block_hashes[i]
            if h in self.hash_to_block:  # same content computed twice: keep the first copy
                continue
            self.hashes[block] = h
            self.hash_to_block[h] = block
        seq.num_registered_blocks = num_full

    def reset_prefix_cache(self) -> int:
        """Forget every cached block that no sequence holds (benchmarks comparing runs of the
        same prompts must not let the second run reuse the first's KV). Returns the number."""
        forgotten = 0
        for block in self.free:
            h = self.hashes[block]
            if h is not None:
                if self.hash_to_block.get(h) == block:
                    del self.hash_to_block[h]
                self.hashes[block] = None
                forgotten += 1
        return forgotten

    # ---- allocation -------------------------------------------------------------------
    def can_admit(self, seq: Sequence, cached: list[int], num_tokens: int) -> bool:
        reused_free = sum(1 for b in cached if self.ref_counts[b] == 0)
        fresh = self.blocks_needed(num_tokens) - len(cached)
        return fresh + reused_free <= len(self.free)

    def admit(self, seq: Sequence, cached: list[int]) -> None:
        """Give a waiting sequence its cached prefix blocks (before allocate_slots)."""
        assert not seq.block_table, "sequence already holds blocks"
        for b in cached:
            if self.ref_counts[b] == 0:
                del self.free[b]
            self.ref_counts[b] += 1
        seq.block_table = list(cached)
        seq.num_blocks_sent = 0  # the runner gets the whole new table
        seq.num_registered_blocks = len(cached)  # found in the cache: registered already
        seq.num_computed_tokens = len(cached) * self.block_size

    def allocate_slots(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow the block table to hold `num_tokens` tokens; False if the pool is too small.
        The step writes from position `seq.num_computed_tokens` on: if that position lies in a
        block other sequences share (a fork's last prompt block), the sequence first gets its
        own copy of it (copy-on-write). All or nothing."""
        table = seq.block_table
        need = self.blocks_needed(num_tokens) - len(table)
        if need <= 0 and not seq.forked:  # (only a fork shares a block that is not full)
            return True
        first = seq.num_computed_tokens // self.block_size
        cow = seq.forked and first < len(table) and self.ref_counts[table[first]] > 1
        if need <= 0 and not cow:
            return True
        need = max(0, need) + int(cow)
        if need > len(self.free):
            return False
        if cow:
            src, dst = table[first], self._take_free_block()
            self.ref_counts[src] -= 1  # still > 0: the other holders keep it
            table[first] = dst
            self.copies.append((src, dst))
            seq.num_blocks_sent = 0  # the runner gets the whole (changed) table again
            need -= 1
        for _ in range(need):
            table.append(self._take_free_block())
        return True

    def _take_free_block(self) -> int:
        block, _ = self.free.popitem(last=False)
        old = self.hashes[block]
        if old is not None:  # recycled: its cached contents are about to be overwritten
            if self.hash_to_block.get(old) == block:
                del self.hash_to_block[old]
            self.hashes[block] = None
        self.ref_counts[block] = 1
        return block

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """The child shares every block of the parent (whose KV up to its
        num_computed_tokens the child takes as its own): no copy until one of them writes
        into a shared block that is not full (allocate_slots)."""
        assert not child.block_table, "the child already holds blocks"
        for block in parent.block_table:
            self.ref_counts[block] += 1  # held by the parent: never in the free list
        child.block_table = list(parent.block_table)
        parent.forked = child.forked = True
        child.block_hashes = list(parent.block_hashes)
        child.num_registered_blocks = parent.num_registered_blocks
        child.num_blocks_sent = 0

    def take_copies(self) -> list[tuple[int, int]]:
        """The copy-on-write copies queued since the last call, for the next step to make."""
        copies, self.copies = self.copies, []
        return copies

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Free the blocks past those `num_tokens` tokens need (the slots of rejected draft
        tokens: never registered with the prefix cache, since only verified KV is). The runner
        gets the whole, shorter table with the sequence's next row."""
        table = seq.block_table
        keep = self.blocks_needed(num_tokens)
        if len(table) <= keep:
            return
        for block in reversed(table[keep:]):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] == 0, f"block {block} is shared past a draft"
            assert self.hashes[block] is None, f"block {block} holds unverified KV but is cached"
            self.free[block] = None
            self.free.move_to_end(block, last=False)  # uncached: recycled first
        del table[keep:]
        seq.num_blocks_sent = 0

    def release(self, seq: Sequence) -> None:
        """Drop a sequence's blocks; cached ones stay findable until recycled."""
        # Free the tail first so that, under LRU, a prefix outlives its own continuation.
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, f"block {block} freed twice"
            if self.ref_counts[block] == 0:
                if self.hashes[block] is None:
                    # Uncached blocks are recycled first: put them at the LRU front.
                    self.free[block] = None
                    self.free.move_to_end(block, last=False)
                else:
                    self.free[block] = None
        seq.block_table = []
        seq.num_blocks_sent = 0
        seq.num_registered_blocks = 0
