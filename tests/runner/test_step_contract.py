"""The scheduler -> runner contract as data: block tables travel incrementally and the runner's
request states rebuild them exactly, through growth, preemption and re-admission; the rows carry
what the inputs need (pending tokens, sampling, min_tokens bans) and nothing crosses as a live
object."""

from __future__ import annotations

import pickle

import numpy as np
import torch

from graphwise.core.step import ModelRunnerOutput, SchedulerOutput
from graphwise.engine.block_manager import BlockManager
from graphwise.engine.scheduler import Scheduler
from graphwise.engine.sequence import Sequence
from graphwise.runner.inputs import RequestStates, Uploader, build_step_inputs, find_bad_rows
from graphwise.sampling_params import SamplingParams


def seq(rid: str, n: int, start: int = 0, **params) -> Sequence:
    p = SamplingParams(temperature=0, **params)
    return Sequence(rid, list(range(start, start + n)), p, frozenset({99}))


def resolve(sched: Scheduler, step: SchedulerOutput, token: int = 7) -> None:
    rows = [r.request_id for r in step.rows if r.sample]
    sched.update_from_output(step, ModelRunnerOutput(rows, [token] * len(rows)))


def check_tables(sched: Scheduler, states: RequestStates, step: SchedulerOutput) -> None:
    states.update(step)
    tables = states.block_tables(step.rows)
    for i, row in enumerate(step.rows):
        want = sched.requests[row.request_id].block_table
        assert tables[i, : len(want)].tolist() == want
        assert not tables[i, len(want) :].any()


def test_block_tables_travel_incrementally_and_survive_preemption():
    bm = BlockManager(num_blocks=5, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    states = RequestStates()
    a, b = seq("a", 7), seq("b", 7, start=100)
    sched.add(a)
    sched.add(b)
    step = sched.schedule()
    assert [r.reset_block_table for r in step.rows] == [True, True]
    assert [len(r.new_block_ids) for r in step.rows] == [2, 2]
    assert {n.request_id for n in step.new_requests} == {"a", "b"}
    check_tables(sched, states, step)
    resolve(sched, step)
    step = sched.schedule()  # 8 tokens each: no new block
    assert [r.new_block_ids for r in step.rows] == [[], []] and not step.new_requests
    assert not any(r.reset_block_table for r in step.rows)
    check_tables(sched, states, step)
    resolve(sched, step)
    step = sched.schedule()  # a and b each need a third block: 5 blocks do not hold both
    assert step.preempted_request_ids == ["b"]
    assert [r.new_block_ids for r in step.rows] == [[a.block_table[2]]]
    check_tables(sched, states, step)
    resolve(sched, step)
    sched.finish_request("a", "abort")
    step = sched.schedule()  # b re-admitted with other blocks: its whole table, reset
    assert step.finished_request_ids == ["a"] and not step.new_requests
    (row,) = step.rows
    assert row.request_id == "b" and row.reset_block_table and row.num_computed_tokens == 0
    assert row.new_block_ids == b.block_table
    check_tables(sched, states, step)
    assert "a" not in states


def test_rows_are_plain_data_and_build_the_same_inputs_after_pickling():
    bm = BlockManager(num_blocks=16, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    sched.add(seq("a", 5, min_tokens=2, stop_token_ids=[3]))
    sched.add(seq("b", 9, start=20))
    step = sched.schedule()
    wire = pickle.loads(pickle.dumps(step))
    assert wire == step
    assert wire.new_requests[0].min_tokens_banned == (3, 99)
    assert [r.ban_stop_tokens for r in wire.rows] == [True, False]
    upload = Uploader(torch.device("cpu"))
    mine, theirs = RequestStates(), RequestStates()
    mine.update(step)
    theirs.update(wire)
    x = build_step_inputs(step, mine, upload, 4, None)
    y = build_step_inputs(wire, theirs, upload, 4, None)
    for name in ("input_ids", "positions", "logits_indices"):
        assert torch.equal(getattr(x, name), getattr(y, name))
    assert torch.equal(x.meta.slot_mapping, y.meta.slot_mapping)
    assert x.input_ids.tolist() == [0, 1, 2, 3, 4, *range(20, 29)]


def test_a_pending_token_is_taken_from_the_previous_steps_samples():
    bm = BlockManager(num_blocks=16, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    sched.add(seq("a", 3, max_tokens=5))
    sched.add(seq("b", 2, start=50, max_tokens=5))
    first = sched.schedule()  # both sample: rows 0 and 1 of this step's tokens
    second = sched.schedule()  # scheduled before the first step's tokens are known
    assert [(r.pending_row, r.token_ids) for r in second.rows] == [(0, []), (1, [])]
    states = RequestStates()
    states.update(first)
    last = torch.tensor([41, 42])
    inputs = build_step_inputs(second, states, Uploader(torch.device("cpu")), 4, last)
    assert inputs.input_ids.tolist() == [41, 42]
    assert inputs.positions.tolist() == [3, 2]


def test_bad_rows_are_named_one_by_one():
    bm = BlockManager(num_blocks=16, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    sched.add(seq("ok", 3))
    sched.add(seq("bad", 3, min_tokens=1, stop_token_ids=[600]))
    step = sched.schedule()
    bad = find_bad_rows(step, RequestStates(), vocab_size=512, num_blocks=16, max_positions=64)
    assert list(bad) == ["bad"] and "600" in bad["bad"]
    assert isinstance(np.int32(0), np.integer)
