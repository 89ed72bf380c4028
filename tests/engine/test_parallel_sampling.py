"""Parallel sampling (SamplingParams.n, issue 15): the prompt is computed once and its KV blocks
are shared copy-on-write by the n samples.

First the block manager and the scheduler as pure logic (refcounts, copies, rows, no leaks after
finish, abort and preemption); then the engine on a tiny model, where each sample must equal a
lone request with seed + i (tokens and logprobs: a wrong shared block would change both), with
the prompt ending on a block boundary and inside a block."""

from __future__ import annotations

import pytest

from graphwise import LLM, SamplingParams
from graphwise.core.step import ModelRunnerOutput, SchedulerOutput
from graphwise.engine.block_manager import BlockManager
from graphwise.engine.scheduler import Scheduler
from graphwise.engine.sequence import Sequence
from tests.conftest import hf_greedy


# ---- the block manager ------------------------------------------------------------------------
def _seq(tokens: list[int], rid: str) -> Sequence:
    return Sequence(rid, tokens, SamplingParams())


def test_fork_shares_blocks_and_each_writer_copies_the_shared_partial_block():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = _seq(list(range(10)), "a")  # 2 full blocks and 2 tokens of a third
    assert bm.allocate_slots(a, 10)
    a.num_computed_tokens = 10
    b, c = _seq(list(range(10)), "b"), _seq(list(range(10)), "c")
    for child in (b, c):
        bm.fork(a, child)
        child.num_computed_tokens = 10
    assert b.block_table == c.block_table == a.block_table
    assert [bm.ref_counts[x] for x in a.block_table] == [3, 3, 3]
    assert bm.num_free_blocks == 13  # forking takes no block
    shared_last = a.block_table[2]
    # b writes position 10, in the shared third block: it gets its own copy.
    a.num_blocks_sent = b.num_blocks_sent = c.num_blocks_sent = 3
    assert bm.allocate_slots(b, 11)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != shared_last
    assert bm.take_copies() == [(shared_last, b.block_table[2])]
    assert b.num_blocks_sent == 0  # the runner gets b's changed table whole
    assert bm.ref_counts[shared_last] == 2 and bm.ref_counts[b.block_table[2]] == 1
    # c copies too; then a is the last holder and writes in place, with no copy.
    assert bm.allocate_slots(c, 11) and len(bm.take_copies()) == 1
    assert bm.allocate_slots(a, 11) and bm.take_copies() == []
    assert a.block_table[2] == shared_last and bm.ref_counts[shared_last] == 1
    assert a.num_blocks_sent == 3  # unchanged table: nothing to resend
    # Writing on (same block, then a new one) copies nothing more.
    for s in (a, b, c):
        s.num_computed_tokens = 11
        assert bm.allocate_slots(s, 13)
    assert bm.take_copies() == [] and bm.num_free_blocks == 16 - 3 - 2 - 3
    for s in (c, a, b):
        bm.release(s)
    assert bm.num_free_blocks == 16 and set(bm.ref_counts) == {0}


def test_prompt_on_a_block_boundary_forks_without_any_copy():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = _seq(list(range(8)), "a")
    assert bm.allocate_slots(a, 8)
    a.num_computed_tokens = 8
    b = _seq(list(range(8)), "b")
    bm.fork(a, b)
    b.num_computed_tokens = 8
    for s in (a, b):
        assert bm.allocate_slots(s, 9)  # a fresh fourth... third block each
    assert bm.take_copies() == []
    assert a.block_table[:2] == b.block_table[:2] and a.block_table[2] != b.block_table[2]
    bm.release(a)
    bm.release(b)
    assert bm.num_free_blocks == 8


def test_copy_on_write_with_no_free_block_fails_and_changes_nothing():
    bm = BlockManager(num_blocks=2, block_size=4)
    a = _seq(list(range(6)), "a")
    assert bm.allocate_slots(a, 6)
    a.num_computed_tokens = 6
    b = _seq(list(range(6)), "b")
    bm.fork(a, b)
    b.num_computed_tokens = 6
    table = list(b.block_table)
    assert not bm.allocate_slots(b, 7)  # needs a copy of block 2, and none is free
    assert b.block_table == table and bm.take_copies() == []
    assert [bm.ref_counts[x] for x in table] == [2, 2]
    bm.release(b)
    assert bm.allocate_slots(a, 7)  # alone again: writes in place
    assert bm.take_copies() == []
    bm.release(a)
    assert bm.num_free_blocks == 2


# ---- the scheduler ----------------------------------------------------------------------------
def _make(num_blocks=64, block_size=4, max_seqs=8, budget=64, prefix=True):
    bm = BlockManager(num_blocks, block_size, prefix)
    return Scheduler(bm, max_seqs, budget, max_model_len=1000), bm


def _group(n: int, prompt_len: int, rid: str = "r", start: int = 0, **params) -> list[Sequence]:
    params.setdefault("max_tokens", 100)
    base = SamplingParams(n=n, **params)
    prompt = list(range(start, start + prompt_len))
    return [
        Sequence(f"{i}_{rid}", prompt, base.for_sample(i), frozenset({99}),
                 max_total_tokens=prompt_len + base.max_tokens)
        for i in range(n)
    ]  # fmt: skip


def _add(sched: Scheduler, group: list[Sequence]) -> None:
    sched.add(group[0], forks=group[1:])


def _complete(sched: Scheduler, step: SchedulerOutput, token: int = 7):
    rows = [r.request_id for r in step.rows if r.sample]
    return sched.update_from_output(step, ModelRunnerOutput(rows, [token] * len(rows)))


def test_prompt_computed_once_then_samples_fork_and_copy_on_first_write():
    sched, bm = _make()
    group = _group(3, 10)
    _add(sched, group)
    step = sched.schedule()
    # One row computes the prompt; the two forks sample from its last position.
    assert [(r.request_id, r.num_new_tokens, r.sample, r.fork_of) for r in step.rows] == [
        ("0_r", 10, True, None),
        ("1_r", 0, True, "0_r"),
        ("2_r", 0, True, "0_r"),
    ]
    assert step.num_prefill_tokens == 10 and step.block_copies == []
    assert {r.request_id for r in step.new_requests} == {"0_r", "1_r", "2_r"}
    assert [r.new_block_ids for r in step.rows] == [group[0].block_table] * 3
    assert [bm.ref_counts[b] for b in group[0].block_table] == [3, 3, 3]
    updates = _complete(sched, step)
    assert [u.request_id for u in updates] == ["0_r", "1_r", "2_r"]
    assert all(s.output_token_ids == [7] for s in group)
    step = sched.schedule()  # each writes position 10, in the shared third block
    assert [r.num_new_tokens for r in step.rows] == [1, 1, 1]
    assert step.num_prefill_tokens == 0 and step.is_decode_only
    assert len(step.block_copies) == 2  # two copies; the last holder writes in place
    src = {s for s, _ in step.block_copies}
    assert len(src) == 1 and len({s.block_table[2] for s in group}) == 3
    assert all(r.reset_block_table for r in step.rows[:2]) and not step.rows[2].reset_block_table
    assert [r.new_block_ids for r in step.rows[:2]] == [group[0].block_table, group[1].block_table]
    _complete(sched, step)
    for rid in ("0_r", "1_r", "2_r"):
        sched.finish_request(rid, "abort")
    assert bm.num_free_blocks == 64 and not sched.has_unfinished()


def test_chunked_prefill_forks_after_the_last_chunk_only():
    sched, bm = _make(budget=4)
    group = _group(2, 10)
    _add(sched, group)
    chunks, prefill = [], 0
    while True:
        step = sched.schedule()
        chunks.append([(r.request_id, r.num_new_tokens) for r in step.rows])
        prefill += step.num_prefill_tokens
        _complete(sched, step)
        if len(step.rows) > 1:
            break
    assert chunks == [[("0_r", 4)], [("0_r", 4)], [("0_r", 2), ("1_r", 0)]]
    assert prefill == 10
    assert group[1].num_computed_tokens == 10 and group[1].output_token_ids == [7]


def test_abort_before_and_after_the_fork_frees_every_block():
    for steps_before in (0, 1, 3):  # queued; prompt half computed; forked and decoding
        sched, bm = _make(budget=6)
        group = _group(3, 10)
        _add(sched, group)
        for _ in range(steps_before):
            _complete(sched, sched.schedule())
        for s in group:
            sched.finish_request(s.request_id, "abort")
        assert bm.num_free_blocks == 64, steps_before
        assert not sched.has_unfinished() and not sched.requests
        assert sched._reserved_seats == 0
        assert all(s.is_finished and s.finish_reason == "abort" for s in group)


def test_preempted_sample_recomputes_its_own_tokens_and_nothing_leaks():
    sched, bm = _make(num_blocks=8, block_size=4, budget=64, prefix=False)
    group = _group(3, 6, max_tokens=10)
    _add(sched, group)
    token = 20
    rows_seen = []
    while sched.has_unfinished():
        step = sched.schedule()
        rows_seen.append(step.rows)
        # distinct tokens per sample, so a mix-up would show
        rows = [r.request_id for r in step.rows if r.sample]
        toks = [token + int(rid[0]) for rid in rows]
        sched.update_from_output(step, ModelRunnerOutput(rows, toks))
    assert sched.num_preemptions > 0
    for i, s in enumerate(group):
        assert s.output_token_ids == [20 + i] * 10
    # A preempted sample came back recomputing its prompt and its own outputs.
    recomputed = [
        r for rows in rows_seen for r in rows if r.num_new_tokens > 1 and r.request_id != "0_r"
    ]
    assert recomputed and all(r.num_computed_tokens == 0 for r in recomputed)
    assert bm.num_free_blocks == 8 and set(bm.ref_counts) == {0}


def test_seats_are_held_for_forks_and_samples_beyond_max_num_seqs_wait_on_their_own():
    sched, _ = _make(max_seqs=4, budget=4)
    group = _group(3, 6)
    _add(sched, group)
    other = Sequence("o", [50, 51], SamplingParams(max_tokens=5), max_total_tokens=7)
    others = [Sequence(f"o{i}", [60 + i, 1], SamplingParams(max_tokens=5), max_total_tokens=7)
              for i in range(3)]  # fmt: skip
    sched.add(other)
    for o in others:
        sched.add(o)
    step = sched.schedule()  # 4 prompt tokens for 0_r; its forks hold 2 of the 4 seats
    assert [r.request_id for r in step.rows] == ["0_r"]
    _complete(sched, step)
    step = sched.schedule()  # 0_r's last 2 tokens, forks; 'o' takes the last seat
    assert [r.request_id for r in step.rows] == ["0_r", "1_r", "2_r", "o"]
    assert len(sched.running) == 4 and len(sched.waiting) == 3

    sched2, _ = _make(max_seqs=2, budget=64)
    big = _group(4, 5, rid="b")
    _add(sched2, big)
    step = sched2.schedule()
    assert [r.request_id for r in step.rows] == ["0_b", "1_b"]  # one fork fits
    assert [s.request_id for s in sched2.waiting] == ["2_b", "3_b"]  # on their own, in order
    while sched2.has_unfinished():
        step = sched2.schedule()
        for rid in [r.request_id for r in step.rows]:
            if rid in sched2.requests and len(sched2.requests[rid].output_token_ids) >= 3:
                sched2.finish_request(rid, "stop")
        _complete(sched2, step)
    assert all(len(s.output_token_ids) >= 3 for s in big)


def test_a_failed_prompt_fails_the_samples_waiting_on_it():
    sched, bm = _make(budget=4)
    group = _group(3, 10)
    _add(sched, group)
    _complete(sched, sched.schedule())
    updates = sched.fail_requests({"0_r": "boom"})
    assert [(u.request_id, u.finish_reason, u.error) for u in updates] == [
        ("0_r", "error", "boom"),
        ("1_r", "error", "boom"),
        ("2_r", "error", "boom"),
    ]
    assert bm.num_free_blocks == 64 and not sched.requests and sched._reserved_seats == 0


def test_n_is_validated():
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="^n must"):
            SamplingParams(n=bad)
    p = SamplingParams(n=3, seed=10, temperature=0.5)
    assert [(q.n, q.seed, q.temperature) for q in map(p.for_sample, range(3))] == [
        (1, 10, 0.5),
        (1, 11, 0.5),
        (1, 12, 0.5),
    ]
    assert SamplingParams(n=2).for_sample(1).seed is None


# ---- the engine on a tiny model ---------------------------------------------------------------
BLOCK = 4
MID_BLOCK = [5, 9, 13, 2, 77, 5, 9]  # 7 tokens: the last block is shared half full
ON_BOUNDARY = [100, 3, 3, 41, 8, 8, 1, 2]  # 8 tokens: two full blocks, nothing to copy
OTHER = [[7, 8] * 6, [300, 301, 302]]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


def _llm(model_dir, **kw) -> LLM:
    return LLM(model=str(model_dir), block_size=BLOCK, **kw)


def _seeded(n: int = 1, seed: int = 11, **kw) -> SamplingParams:
    kw.setdefault("max_tokens", 9)
    return SamplingParams(n=n, seed=seed, temperature=1.0, ignore_eos=True, logprobs=2, **kw)


def _assert_same_sample(got, want) -> None:
    assert got.token_ids == want.token_ids
    for a, b in zip(got.logprobs, want.logprobs, strict=True):
        assert list(a) == list(b)
        assert all(abs(a[t].logprob - b[t].logprob) < 1e-4 for t in a)


@pytest.mark.parametrize(
    "options",
    [
        {"enable_prefix_caching": True, "async_scheduling": True},
        {"enable_prefix_caching": False, "async_scheduling": True},
        {"enable_prefix_caching": True, "async_scheduling": False},
        {"enable_prefix_caching": False, "async_scheduling": False, "max_num_batched_tokens": 3},
    ],
    ids=["prefix-async", "noprefix-async", "prefix-sync", "noprefix-sync-chunked"],
)
def test_each_sample_equals_a_lone_request_with_seed_plus_i(model_dir, options):
    llm = _llm(model_dir, **options)
    free = llm.llm_engine.block_manager.num_free_blocks
    n = 3
    for prompt in (MID_BLOCK, ON_BOUNDARY):
        # Batched with other requests (which sample unseeded and greedy) ...
        outs = llm.generate(
            [{"prompt_token_ids": prompt}, *({"prompt_token_ids": p} for p in OTHER)],
            [_seeded(n), SamplingParams(max_tokens=5), SamplingParams(temperature=0, max_tokens=7)],
            use_tqdm=False,
        )
        out = outs[0]
        assert out.finished and [o.index for o in out.outputs] == [0, 1, 2]
        assert len({tuple(o.token_ids) for o in out.outputs}) == n  # distinct samples
        # ... each sample is the lone request with seed + i, alone.
        for i, o in enumerate(out.outputs):
            lone = llm.generate({"prompt_token_ids": prompt}, _seeded(seed=11 + i), use_tqdm=False)
            _assert_same_sample(o, lone[0].outputs[0])
            assert o.finish_reason == "length" and len(o.token_ids) == 9
        # and again alone (reproducible)
        again = llm.generate({"prompt_token_ids": prompt}, _seeded(n), use_tqdm=False)[0]
        assert [o.token_ids for o in again.outputs] == [o.token_ids for o in out.outputs]
    assert llm.llm_engine.block_manager.num_free_blocks == free
    assert not llm.llm_engine.has_unfinished_requests()


def test_greedy_samples_are_identical_and_equal_hf(model_dir):
    llm = _llm(model_dir)
    params = SamplingParams(n=3, temperature=0, max_tokens=8, ignore_eos=True)
    out = llm.generate({"prompt_token_ids": MID_BLOCK}, params, use_tqdm=False)[0]
    want = hf_greedy(model_dir, [MID_BLOCK], 8)[0]
    assert [o.token_ids for o in out.outputs] == [want] * 3


def test_the_prompt_is_computed_once_and_unseeded_samples_differ(model_dir):
    llm = _llm(model_dir, enable_prefix_caching=False)
    engine = llm.llm_engine
    prefill = []
    copies = []
    original = engine.scheduler.schedule

    def schedule():
        step = original()
        prefill.append(step.num_prefill_tokens)
        copies.extend(step.block_copies)
        return step

    engine.scheduler.schedule = schedule
    try:
        out = llm.generate(
            {"prompt_token_ids": MID_BLOCK},
            SamplingParams(n=4, temperature=1.0, max_tokens=6, ignore_eos=True),
            use_tqdm=False,
        )[0]
    finally:
        del engine.scheduler.schedule
    assert sum(prefill) == len(MID_BLOCK)  # not 4 x
    assert len(copies) == 3  # the half-full last block: n - 1 copies
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    stats = engine.get_stats()  # the engine's counters: the prompt once, every sample's tokens
    assert (stats.prompt_tokens, stats.generation_tokens) == (len(MID_BLOCK), 4 * 6)


def test_preempted_samples_recompute_to_the_same_tokens(model_dir):
    roomy = _llm(model_dir)
    want = roomy.generate({"prompt_token_ids": MID_BLOCK}, _seeded(4, max_tokens=16),
                          use_tqdm=False)[0]  # fmt: skip
    # 12 blocks of 4 tokens: four samples of 23 tokens need 4 x 6 blocks, so some are preempted.
    tight = _llm(model_dir, num_gpu_blocks_override=12, max_model_len=40)
    engine = tight.llm_engine
    got = tight.generate({"prompt_token_ids": MID_BLOCK}, _seeded(4, max_tokens=16),
                         use_tqdm=False)[0]  # fmt: skip
    assert engine.scheduler.num_preemptions > 0
    for a, b in zip(got.outputs, want.outputs, strict=True):
        _assert_same_sample(a, b)
    assert engine.block_manager.num_free_blocks == 12


def test_abort_ends_every_sample_and_frees_every_block(model_dir):
    llm = _llm(model_dir, max_num_batched_tokens=4)
    engine = llm.llm_engine
    free = engine.block_manager.num_free_blocks
    for steps in (1, 6, 2):  # the prompt half computed; forked and decoding; just forked
        rid = engine.add_request(None, _seeded(3, max_tokens=30), prompt_token_ids=MID_BLOCK)
        for _ in range(steps):
            engine.step()
        assert engine.unfinished_request_ids() == [rid]
        assert engine.abort_request(rid)
        assert not engine.abort_request(rid)
        engine.drain()
        assert not engine.has_unfinished_requests()
        assert engine.block_manager.num_free_blocks == free
        # The runner drops ended samples when told (with the next step that runs): it holds
        # at most this round's.
        assert set(engine.executor.driver.requests) <= {f"{i}_{rid}" for i in range(3)}


def test_outputs_stream_each_samples_deltas_then_all_whole(model_dir):
    llm = _llm(model_dir)
    engine = llm.llm_engine
    rid = engine.add_request(None, _seeded(3, max_tokens=5), prompt_token_ids=MID_BLOCK)
    seen: dict[int, list[int]] = {0: [], 1: [], 2: []}
    finals = []
    reasons = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == rid
            if out.finished:
                finals.append(out)
                continue
            for o in out.outputs:
                seen[o.index] += o.token_ids
                assert len(o.logprobs) == len(o.token_ids)
                if o.finish_reason:
                    reasons[o.index] = o.finish_reason
    (final,) = finals
    assert [o.index for o in final.outputs] == [0, 1, 2]
    assert {o.index: o.token_ids for o in final.outputs} == seen
    assert reasons == {0: "length", 1: "length", 2: "length"}
    assert all(len(o.logprobs) == 5 for o in final.outputs)


def test_per_sample_stops_min_tokens_and_penalties_equal_lone_requests(tiny_chat_llm):
    llm = tiny_chat_llm
    prompt = "Once upon a time"
    base = dict(temperature=1.0, max_tokens=12, ignore_eos=True, seed=3, logprobs=1,
                repetition_penalty=1.3, frequency_penalty=0.4, min_tokens=2)  # fmt: skip
    # A stop string that sample 1 meets midway (taken from its own unstopped text).
    unstopped = llm.generate(prompt, SamplingParams(**{**base, "seed": 4}), use_tqdm=False)
    text = unstopped[0].outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    params = SamplingParams(n=3, stop=[stop], **base)
    out = llm.generate(prompt, params, use_tqdm=False)[0]
    for i, o in enumerate(out.outputs):
        lone = llm.generate(prompt, params.for_sample(i), use_tqdm=False)[0].outputs[0]
        _assert_same_sample(o, lone)
        assert (o.text, o.finish_reason, o.stop_reason) == (
            lone.text,
            lone.finish_reason,
            lone.stop_reason,
        )
    assert out.outputs[1].finish_reason == "stop" and out.outputs[1].stop_reason == stop
    assert llm.llm_engine.block_manager.num_used_blocks == 0


def test_every_sample_penalizes_the_prompt_like_hf(model_dir):
    """Repetition penalty counts the prompt: each forked sample starts from a copy of its
    prompt's token history (which it never computed itself)."""
    import torch

    from tests.conftest import hf_reference

    llm = _llm(model_dir)
    prompt = [356, 252, 356, 9, 252, 13]  # the tokens this model favours, in the prompt
    params = SamplingParams(n=3, temperature=0, max_tokens=8, ignore_eos=True,
                            repetition_penalty=3.0)  # fmt: skip
    out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    with torch.no_grad():
        ref = hf_reference(model_dir).generate(
            torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
            repetition_penalty=3.0, pad_token_id=0,
        )[0, len(prompt) :].tolist()  # fmt: skip
    assert [o.token_ids for o in out.outputs] == [ref] * 3


def test_request_ids_of_samples_cannot_collide(model_dir):
    engine = _llm(model_dir).llm_engine
    rid = engine.add_request(None, _seeded(2), prompt_token_ids=MID_BLOCK, request_id="x")
    for taken in ("x", "0_x", "1_x"):
        with pytest.raises(ValueError, match="already in use"):
            engine.add_request(None, _seeded(1), prompt_token_ids=MID_BLOCK, request_id=taken)
    assert engine.unfinished_request_ids() == [rid]
    while engine.has_unfinished_requests():
        engine.step()
    # Once it ended, the id is free again (with any n).
    engine.add_request(None, _seeded(3), prompt_token_ids=MID_BLOCK, request_id="x")
    assert engine.abort_request("x")
    engine.drain()
    assert engine.block_manager.num_used_blocks == 0
