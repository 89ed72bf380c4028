"""On a GPU (Triton attention, CUDA graphs, async scheduling): n > 1 samples share the prompt's
KV blocks copy-on-write, and each equals a lone request with seed + i."""

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
        dtype="float32",  # exact agreement of tokens between batch shapes
        kv_cache_memory=1 << 30,
    )


def test_samples_equal_lone_requests_with_graphs(llm):
    engine = llm.llm_engine
    rng = random.Random(3)
    vocab = engine.model_config.vocab_size
    block = engine.config.block_size
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in (2 * block, 2 * block + 5, 3)]
    params = SamplingParams(n=4, seed=21, temperature=1.0, top_k=50, max_tokens=24,
                            ignore_eos=True, logprobs=1)  # fmt: skip
    graphs_before = engine.get_stats().steps_graph
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert engine.get_stats().steps_graph > graphs_before  # the decode steps replayed graphs
    for prompt, out in zip(prompts, outs, strict=True):
        assert len({tuple(o.token_ids) for o in out.outputs}) == 4
        for i, o in enumerate(out.outputs):
            lone = llm.generate({"prompt_token_ids": prompt}, params.for_sample(i), use_tqdm=False)[
                0
            ].outputs[0]
            assert o.token_ids == lone.token_ids
            for a, b in zip(o.logprobs, lone.logprobs, strict=True):
                assert all(abs(a[t].logprob - b[t].logprob) < 1e-3 for t in a)
    greedy = SamplingParams(n=3, temperature=0, max_tokens=16, ignore_eos=True)
    out = llm.generate({"prompt_token_ids": prompts[1]}, greedy, use_tqdm=False)[0]
    one = llm.generate(
        {"prompt_token_ids": prompts[1]}, SamplingParams(temperature=0, max_tokens=16,
                                                         ignore_eos=True), use_tqdm=False
    )[0].outputs[0]  # fmt: skip
    assert [o.token_ids for o in out.outputs] == [one.token_ids] * 3
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.block_manager.num_used_blocks == 0
