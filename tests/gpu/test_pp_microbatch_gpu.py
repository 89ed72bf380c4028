"""On two GPUs (NCCL): pipeline micro-batches, eagerly and with each stage replaying its own CUDA
graphs (opt-in, GRAPHWISE_PP_CUDA_GRAPHS=1), give the same fp32 greedy tokens as one GPU; and
the `auto` graph policy under PP keeps the same buckets on both stages."""

from __future__ import annotations

import random

import pytest
import torch

from graphwise import LLM, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs"),
]

OPTIONS = dict(
    preset="qwen2.5-7b",
    num_layers=4,
    max_model_len=512,
    max_num_seqs=32,
    dtype="float32",  # exact agreement of greedy tokens
    kv_cache_memory=1 << 30,
)


def _tokens(llm: LLM) -> list[list[int]]:
    rng = random.Random(3)
    vocab = llm.llm_engine.model_config.vocab_size
    prompts = [
        {"prompt_token_ids": [rng.randrange(vocab) for _ in range(rng.randrange(3, 100))]}
        for _ in range(48)  # more than max_num_seqs: admissions while others decode
    ]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_pp2_micro_batches_with_and_without_stage_graphs_match_one_gpu(monkeypatch):
    one = LLM(**OPTIONS, cuda_graph="on")
    want = _tokens(one)
    one.shutdown()
    eager = LLM(**OPTIONS, pipeline_parallel_size=2)
    assert eager.llm_engine.num_micro_batches == 2
    assert _tokens(eager) == want
    assert eager.llm_engine.get_stats().steps_graph == 0
    eager.shutdown()
    monkeypatch.setenv("GRAPHWISE_PP_CUDA_GRAPHS", "1")
    for mode in ("on", "auto"):
        llm = LLM(**OPTIONS, pipeline_parallel_size=2, cuda_graph=mode)
        engine = llm.llm_engine
        assert _tokens(llm) == want, mode
        if mode == "on":
            assert engine.get_stats().steps_graph > 0
        else:
            kept = engine.executor.collective_rpc("graph_buckets")
            assert kept[0] == kept[1]  # both stages adopted the slowest stage's decision
        llm.shutdown()
