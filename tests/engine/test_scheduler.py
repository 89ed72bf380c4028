from __future__ import annotations

from graphwise.engine.block_manager import BlockManager
from graphwise.engine.scheduler import Scheduler
from graphwise.engine.sequence import Sequence, SequenceStatus
from graphwise.sampling_params import SamplingParams


def make(num_blocks=64, block_size=4, max_seqs=8, budget=32, prefix=True):
    bm = BlockManager(num_blocks, block_size, prefix)
    return Scheduler(bm, max_seqs, budget), bm


def seq(n: int, rid: str, start: int = 0) -> Sequence:
    return Sequence(rid, None, list(range(start, start + n)), SamplingParams())


def complete(sched: Scheduler, batch, sample: bool = True) -> None:
    """What the engine does after the model step: advance, cache, append a sampled token."""
    for s, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
        s.num_computed_tokens += n
        sched.block_manager.cache_full_blocks(s)
        if sample and s.num_computed_tokens == s.num_tokens:
            s.append_token(7)


def test_chunked_prefill_respects_token_budget():
    sched, _ = make(budget=10)
    a = seq(25, "a")
    sched.add(a)
    chunks = []
    while a.num_computed_tokens < 25:
        batch = sched.schedule()
        chunks.append(batch.num_new_tokens[0])
        complete(sched, batch)
    assert chunks == [10, 10, 5]
    batch = sched.schedule()
    assert batch.num_new_tokens == [1] and batch.is_decode_only


def test_decodes_go_first_and_new_prompts_fill_the_budget():
    sched, _ = make(budget=8)
    a, b = seq(4, "a"), seq(20, "b")
    sched.add(a)
    complete(sched, sched.schedule())  # a prefilled, one token sampled
    sched.add(b)
    batch = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["a", "b"]
    assert batch.num_new_tokens == [1, 7]


def test_max_num_seqs_limits_admission():
    sched, _ = make(max_seqs=2)
    for i in range(3):
        sched.add(seq(3, f"s{i}", start=10 * i))
    batch = sched.schedule()
    assert len(batch) == 2 and len(sched.waiting) == 1


def test_preemption_frees_the_newest_and_recomputes_it():
    sched, bm = make(num_blocks=4, block_size=4, budget=64)
    a, b = seq(7, "a"), seq(7, "b", start=100)
    sched.add(a)
    sched.add(b)
    complete(sched, sched.schedule())  # both prefilled: 2 blocks each, pool full
    assert bm.num_free_blocks == 0
    complete(sched, sched.schedule())  # 8 tokens each: still fits (blocks of 4)
    batch = sched.schedule()  # a needs a third block: b is preempted
    assert [s.request_id for s in batch.seqs] == ["a"]
    assert batch.preempted == [b]
    assert b.status == SequenceStatus.WAITING and b.num_computed_tokens == 0
    assert b.block_table == [] and sched.waiting[0] is b
    assert sched.num_preemptions == 1


def test_waiting_prompt_reuses_cached_prefix():
    sched, _ = make(block_size=4, budget=64)
    a = seq(12, "a")
    sched.add(a)
    complete(sched, sched.schedule())
    b = seq(12, "b")  # same tokens as a's prompt
    sched.add(b)
    batch = sched.schedule()
    assert batch.seqs[1] is b
    assert b.num_cached_tokens == 8 and batch.num_new_tokens[1] == 4


def test_abort_releases_blocks():
    sched, bm = make()
    a = seq(9, "a")
    sched.add(a)
    sched.schedule()
    sched.abort(a)
    assert bm.num_used_blocks == 0 and not sched.has_unfinished()
