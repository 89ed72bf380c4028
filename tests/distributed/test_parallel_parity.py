"""TP / PP / DP on CPU (gloo, one process per rank): the same greedy tokens as HF transformers."""

from __future__ import annotations

import pytest
import torch

from graphwise import SamplingParams
from graphwise.engine.validation import InvalidRequest
from tests.conftest import hf_greedy
from tests.distributed.conftest import GREEDY, generate, prompts, worker_pids

# Starts processes (servers, ranks): run by .ci/run, left out of the inner loop (-m "not slow").
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def expected(tiny_model_dir):
    cache: dict[str, list[list[int]]] = {}

    def get(arch: str) -> list[list[int]]:
        if arch not in cache:
            cache[arch] = hf_greedy(tiny_model_dir(arch), prompts(), GREEDY.max_tokens)
        return cache[arch]

    return get


@pytest.mark.parametrize(
    "arch, tp, pp",
    [
        ("llama", 2, 1),
        ("qwen2", 2, 1),
        ("qwen2-moe", 2, 1),
        ("llama", 1, 2),
        ("qwen2-moe", 1, 2),
        ("llama-tied", 2, 2),
    ],
)
def test_tp_pp_greedy_tokens_match_hf(arch, tp, pp, tiny_model_dir, expected, make_llm):
    llm = make_llm(tiny_model_dir(arch), tensor_parallel_size=tp, pipeline_parallel_size=pp)
    assert len(worker_pids(llm)) == tp * pp - 1
    engine = llm.llm_engine
    # Each rank holds its KV heads of its stage's layers, and the pool is sized by that share.
    full = engine.model_config.kv_bytes_per_token(engine.dtype)
    assert engine.executor.driver.kv_bytes_per_token() * tp * pp == full
    assert engine.memory_plan.block_bytes * tp * pp == full * engine.config.block_size
    assert engine.async_scheduling  # tokens reach the workers device to device
    assert generate(llm, prompts()) == expected(arch)
    assert llm.llm_engine.block_manager.num_used_blocks == 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch, tp, pp",
    [
        ("qwen3", 2, 1),  # 3 query heads per rank, q/k norms replicated
        ("qwen3-moe", 1, 2),
        ("gemma2", 2, 1),  # soft-caps, alternating windows, tied vocab shards
        ("gemma3", 2, 1),  # one KV head, replicated on both ranks
        ("gemma3", 1, 2),
        ("mistral", 1, 2),
        ("mixtral", 2, 1),  # experts split over the ranks
        ("phi3", 2, 2),  # fused checkpoint tensors cut per rank
    ],
)
def test_new_families_tp_pp_greedy_tokens_match_hf(
    arch, tp, pp, tiny_model_dir, expected, make_llm
):
    """Issue 16's families under TP=2 / PP=2 (windows shorter than the prompts)."""
    llm = make_llm(tiny_model_dir(arch), tensor_parallel_size=tp, pipeline_parallel_size=pp)
    assert len(worker_pids(llm)) == tp * pp - 1
    assert generate(llm, prompts()) == expected(arch)
    assert llm.llm_engine.block_manager.num_used_blocks == 0


def test_tp_replicated_kv_head_matches_hf(tiny_single_kv_dir, make_llm):
    ps = [[t % 509 for t in p] for p in prompts(5)]
    llm = make_llm(tiny_single_kv_dir, tensor_parallel_size=2)
    runner = llm.llm_engine.executor.driver
    assert runner.model_config.num_key_value_heads == 1  # one head, on both ranks
    assert runner.kv_caches[0][0].shape[2] == 1
    assert generate(llm, ps) == hf_greedy(tiny_single_kv_dir, ps, GREEDY.max_tokens)


@pytest.mark.parametrize("arch", ["llama", pytest.param("gemma2", marks=pytest.mark.slow)])
def test_tp_with_chunked_prefill_prefix_cache_and_preemption(arch, tiny_model_dir, make_llm):
    """Block tables that grow, restart (preemption) and share cached blocks reach the workers;
    with gemma2, chunks and cached prefixes also cross its 12-token windows."""
    path = tiny_model_dir(arch)
    ps = prompts(2)
    want = hf_greedy(path, ps, GREEDY.max_tokens)
    llm = make_llm(
        path,
        tensor_parallel_size=2,
        num_gpu_blocks_override=12,
        max_num_batched_tokens=24,
        max_model_len=80,
    )
    assert generate(llm, [ps[2]]) == [want[2]]
    assert generate(llm, ps) == want
    engine = llm.llm_engine
    assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.num_used_blocks == 0


def test_tp_prompt_logits_and_seeded_sampling_match_single_device(tiny_model_dir, make_llm):
    path = tiny_model_dir("qwen2-moe")
    ids = prompts(3)[4]
    single = make_llm(path)
    tp = make_llm(path, tensor_parallel_size=2)
    logits = []
    for llm in (single, tp):
        engine = llm.llm_engine
        rid = engine.add_request(None, GREEDY, prompt_token_ids=ids)
        logits.append(
            engine.executor.collective_rpc("prompt_logits", engine.scheduler.schedule())[0]
        )
        engine.abort_request(rid)
    assert logits[1].shape == logits[0].shape == (len(ids), 512)
    assert (logits[1] - logits[0]).abs().max().item() < 1e-4
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=8, ignore_eos=True)
    ps = prompts(4)[:3]
    assert generate(tp, ps, seeded) == generate(single, ps, seeded)


def test_dp_splits_the_batch_and_matches_hf(tiny_model_dir, expected, make_llm):
    llm = make_llm(tiny_model_dir("qwen2"), data_parallel_size=2)
    engine = llm.llm_engine
    assert generate(llm, prompts()) == expected("qwen2")
    assert [r.requests_routed for r in engine.replicas] == [3, 2]
    assert not engine.has_unfinished_requests()
    stats = engine.get_stats()
    assert stats.generation_tokens == 5 * GREEDY.max_tokens
    assert stats.kv_blocks_total > 0 and stats.kv_usage == 0.0
    # Streaming-style use, as the server drives an engine: deltas, abort, load counts.
    a = engine.add_request(None, GREEDY, prompt_token_ids=prompts()[0])
    b = engine.add_request(None, GREEDY, prompt_token_ids=prompts()[1])
    assert (engine.requests[a].replica, engine.requests[b].replica) == (0, 1)
    assert engine.abort_request(b) and not engine.abort_request(b)
    seen: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == a
            seen.extend(out.delta_token_ids)
            assert out.outputs[0].token_ids == seen
            assert out.prompt_token_ids == prompts()[0]
    assert seen == expected("qwen2")[0]
    with pytest.raises(ValueError, match="not a token id"):
        engine.add_request(None, GREEDY, prompt_token_ids=[512])


def test_dp_of_tp_replicas(tiny_model_dir, expected, make_llm):
    llm = make_llm(tiny_model_dir("llama"), data_parallel_size=2, tensor_parallel_size=2)
    assert generate(llm, prompts()) == expected("llama")


def test_engine_rejects_bad_sizes(tiny_model_dir):
    from graphwise import LLM

    path = str(tiny_model_dir("llama"))
    with pytest.raises(ValueError, match="tensor_parallel_size=3 does not divide the 4 attention"):
        LLM(model=path, tensor_parallel_size=3)
    with pytest.raises(ValueError, match="pipeline_parallel_size=3 exceeds the model's 2 layers"):
        LLM(model=path, pipeline_parallel_size=3)
    with pytest.raises(ValueError, match="does not divide the 4 attention"):
        LLM(model=path, tensor_parallel_size=8, data_parallel_size=2)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            LLM(model=path, tensor_parallel_size=2, device="cuda")


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_async_scheduling_on_and_off_agree_under_tp_and_pp(tiny_model_dir, make_llm, tp, pp):
    """Stops that end sequences while their next step is in flight, seeded sampling, and a
    pool small enough to preempt: the same outputs with and without async scheduling."""
    path = tiny_model_dir("llama")
    ps = prompts(6)
    kinds = [
        SamplingParams(temperature=0, max_tokens=10, stop_token_ids=list(range(0, 512, 5))),
        SamplingParams(temperature=0.8, seed=3, max_tokens=7, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=9, ignore_eos=True),
    ]
    params = [kinds[i % 3] for i in range(len(ps))]
    outs = {}
    for mode in (True, False):
        llm = make_llm(
            path,
            tensor_parallel_size=tp,
            pipeline_parallel_size=pp,
            async_scheduling=mode,
            num_gpu_blocks_override=12,
            max_num_batched_tokens=24,
            max_model_len=80,
        )
        assert llm.llm_engine.async_scheduling is mode
        got = llm.generate([{"prompt_token_ids": p} for p in ps], params, use_tqdm=False)
        outs[mode] = [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in got]
        assert llm.llm_engine.block_manager.num_used_blocks == 0
        assert llm.llm_engine.scheduler.num_preemptions > 0
        llm.shutdown()
    assert outs[True] == outs[False]
    assert {r for _, r in outs[True]} == {"stop", "length"}


def test_dp_reset_prefix_cache_after_requests_that_stopped_early(tiny_model_dir, make_llm):
    """A replica steps once more after a stop-token finish (the step in flight); the front must
    not take that empty message for the reset's answer."""
    llm = make_llm(tiny_model_dir("llama"), data_parallel_size=2)
    stop = SamplingParams(temperature=0, max_tokens=20, stop_token_ids=list(range(0, 512, 2)))
    generate(llm, prompts()[:4], stop)
    assert llm.reset_prefix_cache() >= 0
    assert generate(llm, prompts()[:2]) == generate(llm, prompts()[:2])


def test_dp_replica_whose_workers_fail_fails_its_requests_not_the_caller(
    tiny_model_dir, make_llm, monkeypatch
):
    monkeypatch.setenv("GRAPHWISE_TEST_FAIL_RANK", "1")
    monkeypatch.setenv("GRAPHWISE_TEST_FAIL_MODE", "raise")
    llm = make_llm(tiny_model_dir("llama"), data_parallel_size=2, tensor_parallel_size=2)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts()[:4]], GREEDY, use_tqdm=False)
    assert [o.outputs[0].finish_reason for o in outs] == ["error"] * 4
    # A request's replica failed its step ("step failed", with the worker's traceback when it
    # reached rank 0 in time), or had already lost its workers when the request arrived.
    assert all(
        "tensor/pipeline-parallel step failed" in o.error or "workers are gone" in o.error
        for o in outs
    ), [o.error for o in outs]
    assert not llm.llm_engine.alive  # both replicas lost their workers
    with pytest.raises(RuntimeError, match="shut down|no data-parallel replica"):
        generate(llm, prompts()[:1])


def test_tp_logprobs_equal_single_device(tiny_model_dir, make_llm):
    """Rank 0 gathers the vocabulary shards, so its logprobs are the whole model's."""
    path = tiny_model_dir("qwen2")
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=3)
    got = []
    for llm in (make_llm(path), make_llm(path, tensor_parallel_size=2)):
        out = llm.generate({"prompt_token_ids": prompts()[1]}, params, use_tqdm=False)[0]
        got.append(out.outputs[0])
    one, tp = got
    assert one.token_ids == tp.token_ids
    for a, b in zip(one.logprobs, tp.logprobs, strict=True):
        assert list(a) == list(b)
        assert all(abs(a[t].logprob - b[t].logprob) < 1e-4 for t in a)


def test_tp_prompt_logprobs_equal_single_device(tiny_model_dir, make_llm):
    """Every rank computes the prompt positions' logits (the gather), rank 0 alone reports."""
    path = tiny_model_dir("qwen2")
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, prompt_logprobs=3)
    got = []
    for llm in (make_llm(path), make_llm(path, tensor_parallel_size=2)):
        out = llm.generate({"prompt_token_ids": prompts()[1]}, params, use_tqdm=False)[0]
        got.append(out.prompt_logprobs)
    one, tp = got
    assert one[0] is None and tp[0] is None and len(one) == len(tp) == len(prompts()[1])
    for a, b in zip(one[1:], tp[1:], strict=True):
        assert list(a) == list(b)
        assert all(abs(a[t].logprob - b[t].logprob) < 1e-4 and a[t].rank == b[t].rank for t in a)


def test_dp_logprobs_cross_the_pipe(tiny_model_dir, make_llm):
    """Sample and prompt logprobs reach the front as one engine gives them, streamed too."""
    path = tiny_model_dir("qwen2")
    params = SamplingParams(
        temperature=0, max_tokens=4, ignore_eos=True, logprobs=2, prompt_logprobs=2
    )
    reqs = [{"prompt_token_ids": p} for p in prompts()[:2]]
    one = make_llm(path).generate(reqs, params, use_tqdm=False)
    dp = make_llm(path, data_parallel_size=2)

    def same(a, b) -> bool:  # other batches: float32 sums in another order
        return len(a) == len(b) and all(
            x is y is None
            or (list(x) == list(y) and all(abs(x[t].logprob - y[t].logprob) < 1e-5 for t in x))
            for x, y in zip(a, b, strict=True)
        )

    for a, b in zip(one, dp.generate(reqs, params, use_tqdm=False), strict=True):
        assert same(a.prompt_logprobs, b.prompt_logprobs)
        assert same(a.outputs[0].logprobs, b.outputs[0].logprobs)
    engine = dp.llm_engine
    rid = engine.add_request(None, params, prompt_token_ids=prompts()[0])
    streamed, plp = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if not out.finished:
                streamed.extend(out.outputs[0].logprobs)
            plp = plp or out.prompt_logprobs
    assert out.request_id == rid and same(streamed, one[0].outputs[0].logprobs[: len(streamed)])
    assert len(streamed) >= 3 and same(plp, one[0].prompt_logprobs)


def test_pp_refuses_prompt_logprobs(tiny_model_dir, make_llm):
    llm = make_llm(tiny_model_dir("llama"), pipeline_parallel_size=2)
    params = SamplingParams(max_tokens=2, prompt_logprobs=1)
    with pytest.raises(InvalidRequest, match="pipeline parallelism"):
        llm.generate({"prompt_token_ids": prompts()[1]}, params, use_tqdm=False)


def test_tp_penalties_and_filters_equal_single_device(tiny_model_dir, make_llm):
    path = tiny_model_dir("llama")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, repetition_penalty=1.5,
                            frequency_penalty=0.5, logit_bias={3: 2.0}, min_p=0.1)  # fmt: skip
    single = generate(make_llm(path), prompts()[:3], params)
    assert generate(make_llm(path, tensor_parallel_size=2), prompts()[:3], params) == single


def test_n_samples_under_tp_pp_and_dp_equal_single_device(tiny_model_dir, make_llm):
    """n > 1: every rank makes the copy-on-write block copies on its shard (TP); a request and
    all its samples stay on one replica, whose outputs pass through the front (DP)."""
    path = tiny_model_dir("llama")
    params = SamplingParams(n=3, seed=7, temperature=0.9, max_tokens=8, ignore_eos=True)
    ps = [*prompts()[:2], prompts()[4][:16]]  # 5 and 23 tokens: mid-block; 16: on a boundary

    def run(llm) -> list[list[list[int]]]:
        outs = llm.generate([{"prompt_token_ids": p} for p in ps], params, use_tqdm=False)
        return [[o.token_ids for o in out.outputs] for out in outs]

    single = run(make_llm(path))
    assert all(len({tuple(t) for t in samples}) == 3 for samples in single)
    for tp, pp in ((2, 1), (1, 2)):  # a pipeline stage copies the blocks of its own layers
        llm = make_llm(path, tensor_parallel_size=tp, pipeline_parallel_size=pp)
        assert run(llm) == single, (tp, pp)
        assert llm.llm_engine.block_manager.num_used_blocks == 0
        llm.shutdown()  # one parallel engine per process at a time
    dp = make_llm(path, data_parallel_size=2)
    assert run(dp) == single
    engine = dp.llm_engine
    rid = engine.add_request(None, params, prompt_token_ids=ps[0])
    seen: dict[int, list[int]] = {0: [], 1: [], 2: []}
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == rid and out.prompt_token_ids == ps[0]
            if out.finished:
                final = out
            else:
                for o in out.outputs:
                    seen[o.index] += o.token_ids
    assert final is not None and [o.token_ids for o in final.outputs] == single[0]
    assert list(seen.values()) == single[0]
