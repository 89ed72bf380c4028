"""Pipeline micro-batches, the scheduler's side (engine/microbatch.py), as pure logic: batches
in flight hold disjoint sequences, share the active ones evenly, never take a token still in
flight, and the runner forgets an ended request only once no batch in flight samples it."""

from __future__ import annotations

import pytest

from graphwise.config import EngineConfig
from graphwise.core.step import ModelRunnerOutput, SchedulerOutput
from graphwise.engine.block_manager import BlockManager
from graphwise.engine.microbatch import MicroBatchPolicy
from graphwise.engine.scheduler import Scheduler
from graphwise.engine.sequence import Sequence
from graphwise.sampling_params import SamplingParams


def make(micro=2, num_blocks=64, block_size=4, max_seqs=8, budget=64):
    bm = BlockManager(num_blocks, block_size, True)
    return Scheduler(bm, max_seqs, budget, micro_batches=micro), bm


def seq(n: int, rid: str, start: int = 0, **params) -> Sequence:
    params.setdefault("max_tokens", 100)
    p = SamplingParams(**params)
    return Sequence(rid, list(range(start, start + n)), p, frozenset({99}), n + p.max_tokens)


def complete(sched: Scheduler, step: SchedulerOutput, token: int = 7):
    rows = [r.request_id for r in step.rows if r.sample]
    return sched.update_from_output(step, ModelRunnerOutput(rows, [token] * len(rows)))


def ids(step: SchedulerOutput) -> list[str]:
    return [r.request_id for r in step.rows]


def test_seq_cap_splits_the_active_sequences_evenly():
    policy = MicroBatchPolicy(2, max_num_seqs=64)
    assert [policy.seq_cap(n) for n in (0, 1, 2, 3, 64, 65, 1000)] == [1, 1, 1, 2, 32, 32, 32]
    assert MicroBatchPolicy(4, 10).seq_cap(10) == 3  # rounds up: every sequence has a batch
    with pytest.raises(ValueError, match="at least 2"):
        MicroBatchPolicy(1, 8)


def test_batches_in_flight_are_disjoint_and_alternate():
    sched, _ = make()
    for i in range(4):
        sched.add(seq(3, f"s{i}", start=10 * i))
    a = sched.schedule()
    b = sched.schedule()
    assert ids(a) == ["s0", "s1"] and ids(b) == ["s2", "s3"]  # two of four each
    assert not sched.schedule().rows  # everyone has a token in flight: nothing to run
    complete(sched, a)
    a2 = sched.schedule()
    assert ids(a2) == ["s0", "s1"]  # their tokens are back: inputs known, no pending row
    assert all(r.pending_row == -1 for r in a2.rows) and a2.is_decode_only
    assert [r.token_ids for r in a2.rows] == [[7], [7]]
    complete(sched, b)
    assert ids(sched.schedule()) == ["s2", "s3"]


def test_a_prompt_goes_on_to_its_next_chunk_in_the_next_batch():
    """Its next chunk's inputs are known (no token in flight): stages run batches in order, so
    the chunk before is in the KV by the time the next one reads it."""
    sched, _ = make(budget=8)
    sched.add(seq(20, "long"))
    a, b = sched.schedule(), sched.schedule()
    assert [(r.num_computed_tokens, r.num_new_tokens, r.sample) for r in a.rows] == [(0, 8, False)]
    assert [(r.num_computed_tokens, r.num_new_tokens, r.sample) for r in b.rows] == [(8, 8, False)]
    c = sched.schedule()
    assert [(r.num_computed_tokens, r.num_new_tokens, r.sample) for r in c.rows] == [(16, 4, True)]
    assert not sched.schedule().rows  # its first token is in flight
    for step in (a, b, c):
        complete(sched, step)
    assert ids(sched.schedule()) == ["long"]


def test_new_requests_fill_the_batch_whose_sequences_are_in_flight():
    sched, _ = make(max_seqs=8)
    for i in range(2):
        sched.add(seq(3, f"s{i}", start=10 * i))
    a = sched.schedule()
    assert ids(a) == ["s0"]  # cap 1: s1 goes in the other batch
    for i in range(2, 4):
        sched.add(seq(3, f"s{i}", start=10 * i))
    b = sched.schedule()
    assert ids(b) == ["s1", "s2"]  # cap 2 of 4 active; s0 is in flight
    complete(sched, a)
    assert ids(sched.schedule()) == ["s0", "s3"]


def test_an_ended_request_is_forgotten_once_its_batch_resolved():
    sched, _ = make()
    for i in range(4):
        sched.add(seq(3, f"s{i}", start=10 * i))
    a, b = sched.schedule(), sched.schedule()
    assert sched.finish_request("s0", "abort")  # while batch a still samples it
    assert sched.held_ids() == {"s0"}
    with pytest.raises(ValueError, match="already in use"):
        sched.add(seq(3, "s0"))  # the runner still holds the old s0 for batch a
    complete(sched, b)
    b2 = sched.schedule()
    assert ids(b2) == ["s2", "s3"] and b2.finished_request_ids == []  # a still in flight
    updates = complete(sched, a)
    assert [u.request_id for u in updates] == ["s1"]  # the aborted one gets nothing
    assert sched.held_ids() == set()
    sched.add(seq(3, "s0", start=50))  # free again
    a2 = sched.schedule()
    assert a2.finished_request_ids == ["s0"] and "s0" in ids(a2)
    assert a2.new_requests[-1].request_id == "s0"  # forgotten first, then learnt anew


def test_a_preempted_sequence_waits_for_its_token_in_flight():
    """Preempting a sequence whose token is in flight is safe (stages run batches in order),
    but it is readmitted only once that token is known."""
    sched, bm = make(num_blocks=4, block_size=4, max_seqs=4)
    a_seq, b_seq = seq(4, "a"), seq(4, "b", start=100)
    sched.add(a_seq)
    sched.add(b_seq)
    first, second = sched.schedule(), sched.schedule()
    assert ids(first) == ["a"] and ids(second) == ["b"]
    complete(sched, first)
    complete(sched, second)
    # a and b each hold one full block (4 tokens) and decode into a second one.
    x, y = sched.schedule(), sched.schedule()
    assert ids(x) == ["a"] and ids(y) == ["b"]
    complete(sched, x)
    for _ in range(3):  # a fills its second block while b's token is still in flight
        step = sched.schedule()
        assert ids(step) == ["a"]
        complete(sched, step)
    step = sched.schedule()  # a needs a third block: the pool is full, b gives way
    assert ids(step) == ["a"] and step.preempted_request_ids == ["b"]
    assert b_seq.num_placeholders == 1 and b_seq in sched.waiting
    assert not b_seq.block_table and bm.num_free_blocks == 1  # a holds 3 of the 4
    complete(sched, step)
    blocked = sched.schedule()
    assert ids(blocked) == ["a"]  # b is not readmitted before y resolves
    assert b_seq in sched.waiting
    complete(sched, y, token=5)
    assert b_seq.token_ids[-1] == 5 and b_seq.num_placeholders == 0
    complete(sched, blocked)
    sched.finish_request("a", "abort")
    (row,) = sched.schedule().rows  # b recomputes after its cached prompt block, and samples
    assert row.request_id == "b" and row.num_computed_tokens == 4 and row.sample
    assert row.token_ids == b_seq.token_ids[4:] == [7, 5] and row.pending_row == -1


def test_engine_config_refuses_micro_batches_it_cannot_run():
    assert EngineConfig(pipeline_parallel_size=2).num_pipeline_batches == 2
    assert (
        EngineConfig(pipeline_parallel_size=4, pipeline_micro_batches=2).num_pipeline_batches == 2
    )
    assert EngineConfig(pipeline_parallel_size=2, async_scheduling=False).num_pipeline_batches == 1
    assert EngineConfig().num_pipeline_batches == 1
    with pytest.raises(ValueError, match="needs pipeline_parallel_size > 1"):
        EngineConfig(pipeline_micro_batches=2)
    with pytest.raises(ValueError, match="needs async_scheduling"):
        EngineConfig(pipeline_parallel_size=2, pipeline_micro_batches=2, async_scheduling=False)
    with pytest.raises(ValueError, match="pipeline_micro_batches must be a positive integer"):
        EngineConfig(pipeline_parallel_size=2, pipeline_micro_batches=0)


def test_the_cli_flag_sets_the_option():
    import argparse

    from graphwise.config import add_engine_args, engine_config_from_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(["--pp", "4", "--pipeline-micro-batches", "2"])
    config = engine_config_from_args(args)
    assert config.pipeline_micro_batches == 2 and config.num_pipeline_batches == 2
    assert engine_config_from_args(parser.parse_args(["--pp", "2"])).num_pipeline_batches == 2
