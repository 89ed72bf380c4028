"""graphwise vs HF transformers on tiny random fp32 models: identical greedy tokens, close logits."""

from __future__ import annotations

import random

import pytest
import torch

from graphwise import LLM, SamplingParams
from tests.conftest import hf_greedy, hf_reference

ARCHS = ["llama", "llama-tied", "qwen2", "qwen2-moe"]
# Issue 16's families; windows (10..24 tokens) are shorter than most test prompts.
NEW_ARCHS = ["qwen3", "qwen3-moe", "gemma2", "gemma3", "mistral", "mixtral", "phi3"]
ARCHS += NEW_ARCHS
MAX_NEW = 10


def _prompts(seed: int, vocab: int = 512) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(vocab) for _ in range(40)]
    return [
        [rng.randrange(vocab) for _ in range(5)],
        [rng.randrange(vocab) for _ in range(23)],
        shared + [rng.randrange(vocab) for _ in range(7)],  # shares a 40-token prefix ...
        shared + [rng.randrange(vocab) for _ in range(3)],  # ... with this one
        [rng.randrange(vocab) for _ in range(61)],
    ]


GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)


def _tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_match_hf(arch, tiny_model_dir):
    path = tiny_model_dir(arch)
    prompts = _prompts(1)
    expected = hf_greedy(path, prompts, MAX_NEW)
    llm = LLM(model=str(path), block_size=8)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert _tokens(outs) == expected
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert llm.llm_engine.block_manager.num_used_blocks == 0  # everything released


@pytest.mark.parametrize("arch", ["llama", "qwen2-moe", *NEW_ARCHS])
def test_prefix_cache_chunked_prefill_and_preemption_keep_hf_tokens(arch, tiny_model_dir):
    path = tiny_model_dir(arch)
    prompts = _prompts(2)
    expected = hf_greedy(path, prompts, MAX_NEW)
    # 12 blocks of 8 tokens cannot hold all five sequences at once: preemption must happen.
    # A 24-token budget forces chunked prefill of the longer prompts.
    llm = LLM(
        model=str(path),
        block_size=8,
        num_gpu_blocks_override=12,
        max_num_batched_tokens=24,
        max_model_len=80,
    )
    engine = llm.llm_engine
    first = llm.generate({"prompt_token_ids": prompts[2]}, GREEDY, use_tqdm=False)
    assert _tokens(first) == [expected[2]]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert _tokens(outs) == expected
    assert engine.scheduler.num_preemptions > 0
    assert outs[3].num_cached_tokens >= 40 - 8  # the shared prefix came from the cache
    assert engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_logits_match_hf(arch, tiny_model_dir):

    path = tiny_model_dir(arch)
    ids = _prompts(3)[4]
    hf = hf_reference(path)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    llm = LLM(model=str(path), block_size=8)
    engine = llm.llm_engine
    rid = engine.add_request(None, GREEDY, prompt_token_ids=ids)
    step = engine.scheduler.schedule()
    logits = engine.executor.collective_rpc("prompt_logits", step)[0]
    engine.abort_request(rid)
    assert logits.shape == ref.shape
    assert (logits - ref).abs().max().item() < 1e-4


def test_batch_composition_does_not_change_greedy_tokens(tiny_model_dir):
    path = tiny_model_dir("qwen2")
    prompts = _prompts(4)
    llm = LLM(model=str(path), block_size=8)
    together = _tokens(
        llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    )
    alone = [
        _tokens(llm.generate({"prompt_token_ids": p}, GREEDY, use_tqdm=False))[0] for p in prompts
    ]
    assert together == alone


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_state_dict_round_trips(arch, tiny_model_dir):
    """Exporting our packed weights under HF names gives back the checkpoint exactly."""
    from safetensors.torch import load_file

    path = tiny_model_dir(arch)
    ckpt = load_file(str(path / "model.safetensors"))
    llm = LLM(model=str(path), block_size=8)
    exported = llm.llm_engine.executor.driver.model.hf_state_dict()
    ckpt.pop("lm_head.weight", None) if "lm_head.weight" not in exported else None
    assert set(exported) == set(ckpt)
    for name, tensor in ckpt.items():
        assert torch.equal(exported[name], tensor), name
