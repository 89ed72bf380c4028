"""Pipeline micro-batches on CPU (gloo, one process per stage): two batches in flight with
disjoint sequences, and the same outputs as one device (greedy and seeded sampling, stops,
preemption, chunked prefill, prefix caching, aborts, n > 1, penalties and logprobs)."""

from __future__ import annotations

import time

import pytest

from graphwise import SamplingParams
from graphwise.engine.engine import LLMEngine
from tests.distributed.conftest import GREEDY, generate, prompts

pytestmark = pytest.mark.slow


def _mixed(n: int) -> list[SamplingParams]:
    kinds = [
        SamplingParams(temperature=0, max_tokens=10, stop_token_ids=list(range(0, 512, 5))),
        SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=7, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=8, min_tokens=4, stop_token_ids=[1, 2, 3]),
    ]
    return [kinds[i % len(kinds)] for i in range(n)]


def _record_launches(engine: LLMEngine) -> list[tuple[set[str], set[str]]]:
    """(ids of each launched step, ids that the steps still in flight when it was launched
    sample: a prompt's next chunk may follow in the next batch, a sequence waiting for its
    token may not)."""
    seen: list[tuple[set[str], set[str]]] = []
    launch = engine.executor.execute_model

    def recording(step):
        in_flight = {r.request_id for lau in engine._inflight for r in lau.step.rows if r.sample}
        seen.append(({r.request_id for r in step.rows}, in_flight))
        return launch(step)

    engine.executor.execute_model = recording  # type: ignore[method-assign]
    return seen


def test_two_micro_batches_in_flight_match_one_device(tiny_model_dir, make_llm):
    path = tiny_model_dir("llama")
    ps = prompts(6) + prompts(7)
    params = _mixed(len(ps))
    small_pool = dict(num_gpu_blocks_override=14, max_num_batched_tokens=24, max_model_len=80)

    def run(llm) -> list[tuple[list[int], str]]:
        outs = llm.generate([{"prompt_token_ids": p} for p in ps], params, use_tqdm=False)
        assert llm.llm_engine.block_manager.num_used_blocks == 0
        return [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs]

    single = run(make_llm(path, **small_pool))
    assert {r for _, r in single} == {"stop", "length"}
    one_at_a_time = make_llm(path, pipeline_parallel_size=2, pipeline_micro_batches=1, **small_pool)
    assert one_at_a_time.llm_engine.num_micro_batches == 1
    assert run(one_at_a_time) == single
    one_at_a_time.shutdown()  # one parallel engine per process at a time

    llm = make_llm(path, pipeline_parallel_size=2, **small_pool)
    engine = llm.llm_engine
    assert engine.num_micro_batches == 2 and engine.executor.driver.num_micro_batches == 2
    launches = _record_launches(engine)
    assert run(llm) == single
    assert engine.scheduler.num_preemptions > 0
    overlapped = [new for new, old in launches if old]
    assert len(overlapped) > len(launches) // 2  # most batches run beside another one
    assert all(not new & old for new, old in launches)  # ... with sequences of their own
    assert not engine.executor.driver._staged  # every launched batch was finished
    # Prefix caching across batches: the same prompts again hit the cache, same tokens.
    hits = engine.block_manager.prefix_hits
    assert run(llm) == single and engine.block_manager.prefix_hits > hits


def test_aborts_n_samples_penalties_and_logprobs_under_micro_batches(tiny_model_dir, make_llm):
    path = tiny_model_dir("llama")
    ps = prompts(8)[:4]
    params = [
        SamplingParams(n=3, seed=7, temperature=0.9, max_tokens=8, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, repetition_penalty=1.5,
                       frequency_penalty=0.5, logit_bias={3: 2.0}, min_p=0.1),
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3),
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),  # aborted
    ]  # fmt: skip

    def run(llm):
        engine = llm.llm_engine
        rids = [
            engine.add_request(None, p, prompt_token_ids=ids)
            for ids, p in zip(ps, params, strict=True)
        ]
        final = {}
        steps = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    final[out.request_id] = out
            steps += 1
            if steps == 6:
                assert engine.abort_request(rids[3])
        assert engine.block_manager.num_used_blocks == 0
        samples = [o.token_ids for o in final[rids[0]].outputs]
        lps = [
            [(t, round(lp[t].logprob, 4)) for t in lp] for lp in final[rids[2]].outputs[0].logprobs
        ]
        return samples, final[rids[1]].outputs[0].token_ids, lps, rids[3] in final

    single = run(make_llm(path))
    assert len({tuple(t) for t in single[0]}) == 3
    assert not single[3]  # an aborted request's output ends with the abort call
    got = run(make_llm(path, pipeline_parallel_size=2))
    assert got == single


@pytest.mark.parametrize("micro", [None, 3])
def test_micro_batches_keep_greedy_tokens_of_hf(tiny_model_dir, make_llm, micro):
    """Many sequences, two (or three: more batches than stages) of them in flight: HF's greedy
    tokens."""
    from tests.conftest import hf_greedy

    path = tiny_model_dir("qwen2")
    ps = prompts() + prompts(3)
    llm = make_llm(path, pipeline_parallel_size=2, max_num_seqs=6, pipeline_micro_batches=micro)
    assert llm.llm_engine.num_micro_batches == (micro or 2)
    assert generate(llm, ps) == hf_greedy(path, ps, GREEDY.max_tokens)


def test_failing_stage_under_micro_batches_is_an_error(tiny_model_dir, make_llm, monkeypatch):
    monkeypatch.setenv("GRAPHWISE_TEST_FAIL_RANK", "1")
    monkeypatch.setenv("GRAPHWISE_TEST_FAIL_MODE", "raise")
    llm = make_llm(tiny_model_dir("llama"), pipeline_parallel_size=2)
    with pytest.raises(RuntimeError, match="(?s)rank 1 raised:.*injected failure"):
        generate(llm, prompts()[:3])
    assert not llm.llm_engine.alive


def test_shutdown_with_micro_batches_in_flight_leaves_no_workers(tiny_model_dir, make_llm):
    from tests.distributed.conftest import alive, worker_pids

    llm = make_llm(tiny_model_dir("llama"), pipeline_parallel_size=2)
    engine = llm.llm_engine
    for p in prompts()[:4]:
        engine.add_request(None, GREEDY, prompt_token_ids=p)
    while len(engine._inflight) < 1 or not engine.executor.driver._staged:
        engine.step()
    assert engine.executor.driver._staged  # a launched batch stage 0 has not finished
    pids = worker_pids(llm)
    llm.shutdown()
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids)
