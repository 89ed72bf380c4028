from __future__ import annotations

import pytest

from graphwise.engine.block_manager import BlockManager
from graphwise.engine.sequence import Sequence
from graphwise.sampling_params import SamplingParams


def seq(tokens: list[int], rid: str = "r") -> Sequence:
    return Sequence(rid, tokens, SamplingParams())


def test_allocate_and_release_returns_every_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = seq(list(range(10)))
    assert bm.allocate_slots(s, 10)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 5
    assert bm.allocate_slots(s, 12) and len(s.block_table) == 3  # fits in the last block
    assert bm.allocate_slots(s, 13) and len(s.block_table) == 4
    bm.release(s)
    assert bm.num_free_blocks == 8 and s.block_table == []


def test_allocation_fails_cleanly_when_pool_is_short():
    bm = BlockManager(num_blocks=2, block_size=4)
    s = seq(list(range(12)))
    assert not bm.allocate_slots(s, 12)
    assert s.block_table == [] and bm.num_free_blocks == 2


def test_prefix_cache_hits_full_blocks_only_and_leaves_one_token():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(list(range(12)), "a")
    assert bm.allocate_slots(a, 12)
    a.num_computed_tokens = 12
    bm.cache_full_blocks(a)
    # Same 12 tokens: only 2 blocks reused, since the last token must be recomputed for logits.
    b = seq(list(range(12)), "b")
    hits = bm.find_cached_prefix(b)
    assert hits == a.block_table[:2]
    # Diverging in the second block: one hit.
    c = seq([0, 1, 2, 3, 9, 9, 9, 9, 9], "c")
    assert bm.find_cached_prefix(c) == a.block_table[:1]
    bm.admit(b, hits)
    assert bm.ref_counts[hits[0]] == 2 and b.num_computed_tokens == 8


def test_cached_blocks_survive_release_until_recycled():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq([1, 2, 3, 4, 5], "a")
    assert bm.allocate_slots(a, 5)
    a.num_computed_tokens = 5
    bm.cache_full_blocks(a)
    bm.release(a)
    assert bm.num_free_blocks == 4
    b = seq([1, 2, 3, 4, 7], "b")
    assert len(bm.find_cached_prefix(b)) == 2  # still findable while free
    # Fill the pool with an unrelated sequence: the cached blocks get recycled and forgotten.
    c = seq(list(range(100, 108)), "c")
    assert bm.allocate_slots(c, 8)
    assert bm.find_cached_prefix(b) == []
    assert bm.hash_to_block == {}


def test_uncached_blocks_are_recycled_before_cached_ones():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq([1, 2, 3, 4], "a")
    assert bm.allocate_slots(a, 5)  # 3 blocks, two full and cached, one partial
    a.num_computed_tokens = 4
    bm.cache_full_blocks(a)
    bm.release(a)
    fresh = seq([9, 9], "x")
    assert bm.allocate_slots(fresh, 2)
    b = seq([1, 2, 3, 4, 5], "b")
    assert len(bm.find_cached_prefix(b)) == 2


def test_double_release_is_caught():
    bm = BlockManager(num_blocks=2, block_size=2)
    a = seq([1, 2], "a")
    bm.allocate_slots(a, 2)
    table = list(a.block_table)
    bm.release(a)
    a.block_table = table
    with pytest.raises(AssertionError):
        bm.release(a)


def test_zero_blocks_is_an_error():
    with pytest.raises(ValueError, match="at least one block"):
        BlockManager(num_blocks=0, block_size=16)


def test_reset_prefix_cache_forgets_free_blocks_only():
    bm = BlockManager(num_blocks=8, block_size=2)
    a, b = seq([1, 2, 3, 4, 5], "a"), seq([7, 8, 9, 10, 11], "b")
    for s in (a, b):
        assert bm.allocate_slots(s, 5)
        s.num_computed_tokens = 5
        bm.cache_full_blocks(s)
    bm.release(a)  # a's blocks are free but findable; b still holds its blocks
    assert bm.reset_prefix_cache() == 2
    assert bm.find_cached_prefix(seq([1, 2, 3, 4, 6], "x")) == []
    assert bm.find_cached_prefix(seq([7, 8, 9, 10, 6], "y")) == b.block_table[:2]  # held: kept
    assert bm.num_free_blocks == 8 - 3


def test_pending_tokens_are_not_hashed():
    """A block is cached only up to the tokens the host knows (async scheduling computes the KV
    of a token whose id is still on the GPU)."""
    bm = BlockManager(num_blocks=8, block_size=2)
    a = seq([1, 2, 3], "a")
    a.num_placeholders = 1  # token 4 is being sampled
    assert bm.allocate_slots(a, 4)
    a.num_computed_tokens = 4  # its KV is being computed too
    bm.cache_full_blocks(a)
    assert len(a.block_hashes) == 1  # [1, 2] only; [3, ?] waits for the id
    a.token_ids.append(4)
    a.num_placeholders = 0
    bm.cache_full_blocks(a)
    assert len(a.block_hashes) == 2


def test_blocks_are_registered_incrementally_and_after_readmission():
    bm = BlockManager(num_blocks=16, block_size=2)
    a = seq(list(range(1, 9)), "a")  # 8 tokens: 4 blocks
    assert bm.allocate_slots(a, 8)
    a.num_computed_tokens = 4
    bm.cache_full_blocks(a)
    assert a.num_registered_blocks == 2 and len(bm.hash_to_block) == 2
    a.num_computed_tokens = 8
    bm.cache_full_blocks(a)
    assert a.num_registered_blocks == 4 and len(bm.hash_to_block) == 4
    bm.release(a)  # preemption: the counter starts over with the next block table
    assert a.num_registered_blocks == 0
    hits = bm.find_cached_prefix(a)  # 7 of 8 tokens reusable: 3 blocks
    bm.admit(a, hits)
    assert a.num_registered_blocks == 3 and a.num_computed_tokens == 6
    assert bm.allocate_slots(a, 10)
    a.token_ids += [9, 10]
    a.num_computed_tokens = 10
    bm.cache_full_blocks(a)
    assert a.num_registered_blocks == 5
    b = seq(list(range(1, 11)) + [99], "b")
    hits = bm.find_cached_prefix(b)
    # [7, 8] was computed twice (before and after preemption): the first copy is the one found
    assert len(hits) == 5 and hits[:3] == a.block_table[:3] and hits[4] == a.block_table[4]
