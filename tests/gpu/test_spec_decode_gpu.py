"""On a GPU: n-gram speculation gives plain decoding's greedy tokens (fp32; verify steps run
as decode rows, one per token, and replay the decode graphs like plain steps), the rejection
sampler keeps the target distribution with CUDA generators, and a verify step of k + 1 tokens
per row costs about one decode step (measured, loosely bounded here; scripts/spec_bench.py
records it)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from graphwise import LLM, SamplingParams
from graphwise.layers.sampler import SamplingTensors, verify_drafts

pytestmark = pytest.mark.gpu

SPEC = {
    "method": "ngram",
    "num_speculative_tokens": 4,
    "prompt_lookup_max": 3,
    "prompt_lookup_min": 1,
}


def _prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(5)
    out = []
    for i in range(12):
        block = [rng.randrange(vocab) for _ in range(rng.randrange(4, 40))]
        out.append(block * (1 + i % 4) + [rng.randrange(vocab) for _ in range(i)])
    return out


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_greedy_ngram_equals_plain_on_gpu(async_scheduling):
    outs, stats = {}, {}
    for spec in (None, SPEC):
        llm = LLM(
            preset="qwen2.5-7b",
            num_layers=2,
            max_model_len=512,
            max_num_seqs=8,
            cuda_graph="on",
            dtype="float32",
            kv_cache_memory=1 << 30,
            async_scheduling=async_scheduling,
            speculative_config=spec,
        )
        engine = llm.llm_engine
        prompts = _prompts(engine.model_config.vocab_size)
        params = [
            SamplingParams(temperature=0, max_tokens=40 + i, ignore_eos=True)
            if i % 2
            else SamplingParams(
                temperature=0, max_tokens=60, stop_token_ids=list(range(0, 1000, 7))
            )
            for i in range(len(prompts))
        ]
        got = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        outs[spec is not None] = [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in got]
        stats[spec is not None] = engine.get_stats()
        assert engine.block_manager.num_used_blocks == 0
        llm.shutdown()
        del llm, engine
        torch.cuda.empty_cache()
    assert outs[True] == outs[False]
    assert stats[True].spec_decode_num_draft_tokens > 0
    # verify steps (up to 8 x 5 rows) replay graphs: only steps with a prompt run eagerly
    assert stats[True].steps_eager <= len(prompts), stats[True]


def test_rejection_sampler_distribution_on_gpu():
    vocab, k, trials, temperature = 16, 2, 200_000, 0.8
    dev = torch.device("cuda")
    torch.manual_seed(1)
    logits = (torch.randn(k + 1, vocab) * 1.5).to(dev)
    drafts = [3, 9]
    gen = torch.Generator(device=dev).manual_seed(0)
    p = torch.softmax(logits.double() / temperature, -1).cpu().numpy()
    bonus = torch.multinomial(
        torch.softmax(logits[k] / temperature, -1), trials, True, generator=gen
    )
    t = SamplingTensors(
        temperature=torch.full((trials,), temperature, device=dev),
        top_k=torch.full((trials,), vocab, device=dev),
        top_p=torch.ones(trials, device=dev),
        all_greedy=False,
        any_top_k_top_p=False,
        generators=[None] * trials,
    )
    out, _ = verify_drafts(
        logits[:k].repeat(trials, 1),
        torch.tensor(drafts * trials, device=dev),
        torch.arange(trials * k, device=dev),
        [k] * trials,
        torch.full((trials,), k, device=dev),
        bonus,
        t,
        gen,
    )
    out = out.cpu()
    first = np.bincount(out[:, 0].numpy(), minlength=vocab)
    tv = 0.5 * np.abs(first / first.sum() - p[0]).sum()
    assert tv < (vocab / first.sum()) ** 0.5
    second = np.bincount(out[out[:, 0] == drafts[0]][:, 1].numpy(), minlength=vocab)
    if second.sum() > 2000:
        assert 0.5 * np.abs(second / second.sum() - p[1]).sum() < (vocab / second.sum()) ** 0.5


def test_verify_step_costs_about_one_decode_step():
    """bs 1, k = 4 on a 7B-shaped stack cut to 4 layers (dummy weights): a verify step (5
    tokens as 5 decode rows, the graph of bucket 5) against a plain decode step (the graph of
    bucket 1). Issue 21 asks for <= 1.15x; the bound here stays loose (3x) and the measured
    ratio is printed for the record."""
    llm = LLM(
        preset="qwen2.5-7b",
        num_layers=4,
        max_model_len=1024,
        max_num_seqs=1,
        cuda_graph="on",  # both kinds of step replay graphs (the measured `auto` might not)
        dtype="bfloat16",
        kv_cache_memory=1 << 30,
        async_scheduling=False,
        speculative_config=SPEC,
    )
    engine = llm.llm_engine
    block = list(range(100, 164))
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    records: list = []

    class Log:
        def add(self, record):
            records.append(record)

    engine.step_log = Log()
    llm.generate({"prompt_token_ids": block * 8}, params, use_tqdm=False)
    stats = engine.get_stats()
    assert engine.executor.driver.graph_buckets() == [1, 2, 4, 5]  # 1 seq x (1 + k) rows
    assert stats.steps_eager <= 2, stats  # the prompt's step; every verify step a graph
    records = records[5:]
    verify = [r.total_s for r in records if r.seqs == 1 and r.tokens == 5]
    decode = [r.total_s for r in records if r.seqs == 1 and r.tokens == 1]
    if not verify or not decode:
        pytest.skip("dummy weights gave no full-draft and plain step mix to compare")
    ratio = float(np.median(verify) / np.median(decode))
    print(
        f"verify step {np.median(verify) * 1e3:.3f} ms, decode {np.median(decode) * 1e3:.3f} ms, x{ratio:.2f}"
    )
    assert ratio < 3.0


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_greedy_draft_model_equals_plain_on_gpu(tiny_model_dir, async_scheduling):
    """A draft model on the GPU (fp32, Triton attention for the draft's mirror, catch-up and
    decode steps, each model with its own backend; graphs for the target's plain steps): greedy
    tokens equal plain decoding's, and the target drafting for itself accepts (nearly) every
    draft."""
    target = str(tiny_model_dir("llama"))
    prompts = _prompts(512)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    outs = {}
    for name, spec in (
        ("plain", None),
        ("self", {"method": "draft_model", "model": target, "num_speculative_tokens": 4}),
        ("early-exit", {"model": target, "num_speculative_tokens": 3, "num_layers": 1}),
    ):
        llm = LLM(
            model=target,
            max_model_len=512,
            max_num_seqs=8,
            cuda_graph="on",
            dtype="float32",
            kv_cache_memory=64 << 20,
            async_scheduling=async_scheduling,
            speculative_config=spec,
        )
        engine = llm.llm_engine
        got = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        outs[name] = [o.outputs[0].token_ids for o in got]
        stats = engine.get_stats()
        assert engine.block_manager.num_used_blocks == 0
        if name == "self":  # (kernels of other shapes may flip a near-tie: not quite 1.0)
            assert stats.spec_decode_acceptance_rate > 0.95
        if spec is not None:
            assert stats.spec_decode_num_draft_tokens > 0
        llm.shutdown()
        del llm, engine
        torch.cuda.empty_cache()
    assert outs["self"] == outs["plain"] and outs["early-exit"] == outs["plain"]
