"""Async scheduling (step N+1 launched before step N's tokens reach the host) changes when the
host learns a token, never which token: outputs must equal the synchronous engine's, and every
KV block must come back."""

from __future__ import annotations

import random

import pytest

from graphwise import LLM, SamplingParams
from graphwise.engine.engine import LLMEngine


def _prompts(n: int, seed: int, vocab: int = 512) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(vocab) for _ in range(20)]  # a common prefix: prefix-cache hits
    return [
        (shared if i % 2 else []) + [rng.randrange(vocab) for _ in range(rng.randrange(3, 40))]
        for i in range(n)
    ]


def _mixed_params(n: int) -> list[SamplingParams]:
    """Greedy with different lengths, stop tokens, min_tokens, and seeded random sampling."""
    out = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            out.append(SamplingParams(temperature=0, max_tokens=5 + i, ignore_eos=True))
        elif kind == 1:  # stops early on a token the tiny model emits often
            out.append(
                SamplingParams(temperature=0, max_tokens=30, stop_token_ids=list(range(0, 512, 3)))
            )
        elif kind == 2:
            out.append(
                SamplingParams(
                    temperature=0,
                    max_tokens=12,
                    min_tokens=6,
                    stop_token_ids=list(range(0, 512, 3)),
                )
            )
        else:
            out.append(SamplingParams(temperature=0.8, top_p=0.9, seed=100 + i, max_tokens=9))
    return out


def _run(model_dir, async_scheduling: bool, **kw):
    llm = LLM(
        model=str(model_dir),
        async_scheduling=async_scheduling,
        max_num_seqs=kw.pop("max_num_seqs", 6),
        **kw,
    )
    prompts = _prompts(10, seed=1)
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts], _mixed_params(len(prompts)), use_tqdm=False
    )
    engine = llm.llm_engine
    assert not engine._inflight and not engine.has_unfinished_requests()  # generate drained
    return engine, [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs]


@pytest.mark.parametrize(
    "engine_kw",
    [
        {},
        # 12 blocks of 8: sequences are preempted while their next token is still pending
        dict(block_size=8, num_gpu_blocks_override=12, max_num_batched_tokens=32, max_model_len=96),
    ],
    ids=["plain", "preemption+chunked"],
)
def test_async_and_sync_scheduling_give_identical_outputs(tiny_model_dir, engine_kw):
    model_dir = tiny_model_dir("llama")
    sync_engine, sync_out = _run(model_dir, False, **dict(engine_kw))
    async_engine, async_out = _run(model_dir, True, **dict(engine_kw))
    assert async_engine.async_scheduling and not sync_engine.async_scheduling
    assert async_out == sync_out
    reasons = {r for _, r in sync_out}
    assert reasons == {"length", "stop"}, reasons  # both kinds of ending were exercised
    if engine_kw:
        assert async_engine.scheduler.num_preemptions > 0
    for engine in (sync_engine, async_engine):
        _drain(engine)
        bm = engine.block_manager
        assert bm.num_free_blocks == bm.num_blocks, "KV blocks leaked"
        assert not engine.scheduler.requests and not engine.output_processor.requests


def _drain(engine: LLMEngine) -> None:
    while engine.has_unfinished_requests():
        engine.step()
    assert not engine._inflight


def test_async_engine_launches_before_it_resolves(tiny_model_dir):
    """The first step only launches (its tokens are resolved by the next call); a sequence's
    pending token counts for scheduling but is not in its token ids."""
    engine = LLM(model=str(tiny_model_dir("llama")), max_num_seqs=4).llm_engine
    rid = engine.add_request(
        None, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), [5, 6, 7]
    )
    seq = engine.scheduler.requests[rid]
    assert engine.step() == []
    assert seq.num_placeholders == 1 and seq.num_tokens == 4 and len(seq.token_ids) == 3
    out = engine.step()  # launches the decode of the pending token, resolves the prefill
    assert [o.delta_token_ids for o in out] == [[seq.token_ids[3]]]
    assert seq.num_placeholders == 1 and seq.num_computed_tokens == 4
    out = engine.step()
    assert len(seq.token_ids) == 5 and not out[0].finished
    # The third token is the last (max_tokens): it is not given another step while pending.
    step = engine.scheduler.schedule()
    assert seq.num_tokens == seq.max_total_tokens and step.rows == []
    out = engine.step()
    assert out[0].finished and len(out[0].outputs[0].token_ids) == 3
    _drain(engine)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_abort_while_a_step_is_in_flight_frees_everything(tiny_model_dir):
    engine = LLM(model=str(tiny_model_dir("llama")), max_num_seqs=4).llm_engine
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    a = engine.add_request(None, params, [1, 2, 3, 4])
    b = engine.add_request(None, params, [9, 8, 7])
    for _ in range(3):
        engine.step()
    assert engine.scheduler.requests[a].num_placeholders == 1  # a step sampling for it is in flight
    assert engine.abort_request(a)
    outs = []
    while engine.has_unfinished_requests():
        outs.extend(engine.step())
    assert {o.request_id for o in outs} == {b}  # nothing more for the aborted one
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 20
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_async_scheduling_flag_and_sglang_alias():
    import argparse

    from graphwise.config import add_engine_args, engine_config_from_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert engine_config_from_args(parser.parse_args([])).async_scheduling is True
    for flag in ("--no-async-scheduling", "--disable-overlap-schedule"):
        assert engine_config_from_args(parser.parse_args([flag])).async_scheduling is False


def test_a_reused_request_id_never_gets_the_old_requests_token(tiny_model_dir):
    """Abort "x" while a step samples for it, then add a new "x": the stray token goes nowhere."""
    engine = LLM(model=str(tiny_model_dir("llama")), max_num_seqs=4).llm_engine
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    engine.add_request(None, params, [9, 8, 7, 6], request_id="x")
    for _ in range(3):
        engine.step()
    assert engine.abort_request("x")
    engine.add_request(None, params, [1, 2, 3], request_id="x")
    got = [o for o in _drain_outputs(engine) if o.finished]
    alone = LLM(model=str(tiny_model_dir("llama")), max_num_seqs=4).generate(
        {"prompt_token_ids": [1, 2, 3]}, params, use_tqdm=False
    )
    assert [o.outputs[0].token_ids for o in got] == [alone[0].outputs[0].token_ids]


def test_the_runner_forgets_finished_and_aborted_requests(tiny_model_dir):
    llm = LLM(model=str(tiny_model_dir("llama")), max_num_seqs=4)
    engine, runner = llm.llm_engine, llm.llm_engine.executor.driver
    stop = SamplingParams(temperature=0, max_tokens=20, stop_token_ids=list(range(0, 512, 2)))
    for i in range(6):
        rids = [engine.add_request(None, stop, [i + 1, 7, 9]) for _ in range(2)]
        engine.step()
        engine.abort_request(rids[1])
        _drain_outputs(engine)
        # What the runner still holds is at most this round's (told with the next step).
        assert set(runner.requests) <= set(rids), (i, set(runner.requests))


def _drain_outputs(engine: LLMEngine) -> list:
    outs = []
    while engine.has_unfinished_requests():
        outs.extend(engine.step())
    return outs
