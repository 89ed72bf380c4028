"""The scheduler as pure logic: it plans a step, advances state as if the step ran, and takes the
runner's tokens back (`update_from_output`); no engine, no model."""

from __future__ import annotations

from graphwise.core.step import ModelRunnerOutput, SchedulerOutput
from graphwise.engine.block_manager import BlockManager
from graphwise.engine.scheduler import Scheduler
from graphwise.engine.sequence import Sequence, SequenceStatus
from graphwise.sampling_params import SamplingParams


def make(num_blocks=64, block_size=4, max_seqs=8, budget=32, prefix=True, max_model_len=1000):
    bm = BlockManager(num_blocks, block_size, prefix)
    return Scheduler(bm, max_seqs, budget, max_model_len=max_model_len), bm


def seq(n: int, rid: str, start: int = 0, eos=frozenset({99}), **params) -> Sequence:
    params.setdefault("max_tokens", 100)
    p = SamplingParams(**params)
    return Sequence(rid, list(range(start, start + n)), p, eos, max_total_tokens=n + p.max_tokens)


def complete(sched: Scheduler, step: SchedulerOutput, token: int = 7):
    """The runner's answer: every sampling row got `token`."""
    rows = [r.request_id for r in step.rows if r.sample]
    return sched.update_from_output(step, ModelRunnerOutput(rows, [token] * len(rows)))


def ids(step: SchedulerOutput) -> list[str]:
    return [r.request_id for r in step.rows]


def test_chunked_prefill_respects_token_budget():
    sched, _ = make(budget=10)
    a = seq(25, "a")
    sched.add(a)
    chunks = []
    while a.num_computed_tokens < 25:
        step = sched.schedule()
        chunks.append(step.rows[0].num_new_tokens)
        assert step.rows[0].sample == (a.num_computed_tokens == 25)
        complete(sched, step)
    assert chunks == [10, 10, 5]
    step = sched.schedule()
    assert [r.num_new_tokens for r in step.rows] == [1] and step.is_decode_only
    assert step.num_prefill_tokens == 0 and step.num_context_tokens == 26


def test_decodes_go_first_and_new_prompts_fill_the_budget():
    sched, _ = make(budget=8)
    a, b = seq(4, "a"), seq(20, "b")
    sched.add(a)
    complete(sched, sched.schedule())  # a prefilled, one token sampled
    sched.add(b)
    step = sched.schedule()
    assert ids(step) == ["a", "b"]
    assert [r.num_new_tokens for r in step.rows] == [1, 7]
    assert step.num_prefill_tokens == 7


def test_max_num_seqs_limits_admission():
    sched, _ = make(max_seqs=2)
    for i in range(3):
        sched.add(seq(3, f"s{i}", start=10 * i))
    step = sched.schedule()
    assert len(step) == 2 and len(sched.waiting) == 1


def test_preemption_frees_the_newest_and_recomputes_it():
    sched, bm = make(num_blocks=4, block_size=4, budget=64)
    a, b = seq(7, "a"), seq(7, "b", start=100)
    sched.add(a)
    sched.add(b)
    complete(sched, sched.schedule())  # both prefilled: 2 blocks each, pool full
    assert bm.num_free_blocks == 0
    complete(sched, sched.schedule())  # 8 tokens each: still fits (blocks of 4)
    step = sched.schedule()  # a needs a third block: b is preempted
    assert ids(step) == ["a"]
    assert step.preempted_request_ids == ["b"]
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
    step = sched.schedule()
    assert ids(step)[1] == "b"
    assert b.num_cached_tokens == 8 and step.rows[1].num_new_tokens == 4
    assert step.rows[1].num_computed_tokens == 8


def test_finish_request_releases_blocks():
    sched, bm = make()
    sched.add(seq(9, "a"))
    sched.schedule()
    assert sched.finish_request("a", "abort")
    assert bm.num_used_blocks == 0 and not sched.has_unfinished()
    assert not sched.finish_request("a", "abort")  # gone
    assert sched.schedule().finished_request_ids == []  # no step runs: nobody to tell yet
    sched.add(seq(3, "b", start=50))
    assert sched.schedule().finished_request_ids == ["a"]  # the next step that runs does


def test_token_stops_length_and_min_tokens():
    sched, bm = make(max_model_len=12)
    sched.add(seq(3, "stop", stop_token_ids=[5]))
    sched.add(seq(3, "eos", start=10))
    sched.add(seq(3, "min", start=20, min_tokens=2, stop_token_ids=[5]))
    sched.add(seq(3, "ignore", start=30, ignore_eos=True, max_tokens=2))
    sched.add(seq(10, "ctx", start=40, ignore_eos=True))  # max_model_len 12: room for two
    step = sched.schedule()
    up = {u.request_id: u for u in complete(sched, step, token=5)}
    assert (up["stop"].finish_reason, up["stop"].stop_reason) == ("stop", 5)
    assert up["min"].finish_reason is None  # below min_tokens: the stop id does not count
    assert up["eos"].finish_reason is None
    up = {u.request_id: u for u in complete(sched, sched.schedule(), token=99)}
    assert (up["eos"].finish_reason, up["eos"].stop_reason) == ("stop", None)
    assert up["ignore"].finish_reason == "length"  # max_tokens 2; EOS ignored
    assert up["ctx"].finish_reason == "length"  # 12 tokens: max_model_len
    assert up["min"].finish_reason == "stop"  # EOS after min_tokens
    assert not sched.requests and bm.num_used_blocks == 0


def test_min_tokens_rows_ban_their_stop_ids_until_reached():
    sched, _ = make()
    sched.add(seq(3, "a", min_tokens=2, stop_token_ids=[5]))
    step = sched.schedule()
    assert step.new_requests[0].min_tokens_banned == (5, 99)
    assert step.rows[0].ban_stop_tokens
    complete(sched, step)
    assert sched.schedule().rows[0].ban_stop_tokens  # one output so far: still banned
    complete(sched, sched.schedule())


def test_async_placeholders_count_for_scheduling_but_not_for_stops():
    sched, bm = make()
    a = seq(3, "a", max_tokens=2)
    sched.add(a)
    first = sched.schedule()
    assert a.num_placeholders == 1 and a.num_tokens == 4 and len(a.token_ids) == 3
    second = sched.schedule()  # launched before the first step's token is known
    assert second.rows[0].pending_row == 0 and second.rows[0].token_ids == []
    assert a.num_tokens == 5 == a.max_total_tokens
    complete(sched, first, token=8)
    assert a.token_ids == [0, 1, 2, 8] and a.num_placeholders == 1
    assert not sched.schedule().rows  # its pending token is its last: no more steps
    up = complete(sched, second, token=9)
    assert up[0].finish_reason == "length" and bm.num_used_blocks == 0


def test_a_request_finished_while_its_step_runs_gets_nothing():
    sched, bm = make()
    sched.add(seq(3, "a"))
    step = sched.schedule()
    sched.finish_request("a", "abort")
    assert complete(sched, step) == [] and bm.num_used_blocks == 0


def test_rollback_recomputes_and_errors_fail_alone():
    sched, bm = make()
    sched.add(seq(3, "a"))
    sched.add(seq(3, "b", start=10))
    step = sched.schedule()
    sched.rollback(step)
    a, b = sched.requests["a"], sched.requests["b"]
    assert a.num_placeholders == 0 and a.num_computed_tokens == 0 and a.block_table == []
    assert list(sched.waiting) == [b, a] or list(sched.waiting) == [a, b]
    up = sched.fail_requests({"b": "token id 600 is outside the vocabulary"})
    assert [(u.request_id, u.finish_reason) for u in up] == [("b", "error")]
    step = sched.schedule()
    assert ids(step) == ["a"] and step.new_requests[0].request_id == "a"  # sent again
    assert complete(sched, step)[0].new_token_ids == [7]
    assert bm.num_used_blocks == 1
