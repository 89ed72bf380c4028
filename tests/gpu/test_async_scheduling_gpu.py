"""On a GPU: async scheduling (tokens stay on the device between steps) gives the same outputs
as one-step-at-a-time scheduling, with graphs and eagerly."""

from __future__ import annotations

import random

import pytest

from graphwise import LLM, SamplingParams

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def llm():
    return LLM(
        preset="qwen2.5-7b",
        num_layers=2,
        max_model_len=512,
        max_num_seqs=32,
        cuda_graph="on",
        dtype="float32",  # exact agreement of greedy tokens (see test_cuda_graph.py)
        kv_cache_memory=1 << 30,
    )


def _workload(vocab: int) -> tuple[list[dict], list[SamplingParams]]:
    rng = random.Random(7)
    prompts = [
        {"prompt_token_ids": [rng.randrange(vocab) for _ in range(rng.randrange(3, 200))]}
        for _ in range(40)  # more than max_num_seqs: admissions happen while others decode
    ]
    stops = list(range(0, vocab, 97))
    params = []
    for i in range(len(prompts)):
        if i % 3 == 0:
            params.append(SamplingParams(temperature=0, max_tokens=8 + i, ignore_eos=True))
        elif i % 3 == 1:
            params.append(SamplingParams(temperature=0, max_tokens=60, stop_token_ids=stops))
        else:
            params.append(SamplingParams(temperature=1.0, top_k=50, seed=i, max_tokens=20))
    return prompts, params


@pytest.mark.parametrize("graphs", [True, False], ids=["graph", "eager"])
def test_async_and_sync_outputs_are_identical(llm, graphs):
    engine = llm.llm_engine
    prompts, params = _workload(engine.model_config.vocab_size)
    engine.set_cuda_graphs_enabled(graphs)
    results = {}
    try:
        for mode in (True, False):
            engine.async_scheduling = mode
            outs = llm.generate(prompts, params, use_tqdm=False)
            results[mode] = [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs]
            while engine.has_unfinished_requests():
                engine.step()
            assert engine.block_manager.num_used_blocks == 0
    finally:
        engine.set_cuda_graphs_enabled(True)
        engine.async_scheduling = True
    assert results[True] == results[False]
    assert {r for _, r in results[True]} == {"length", "stop"}
