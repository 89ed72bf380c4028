"""On a GPU, issue 16's families: Triton kernels (windows, soft-caps, padded head_dim, Gemma
norms, GeGLU, q/k norms, fused MoE) against HF and the torch backend, graph replay against
eager decode.

Two sizes: the tiny HF models of tests/conftest.py in fp32 (windows of 10..24 tokens, shorter
than the prompts, so decode and prefill cross window edges; greedy tokens must equal HF's),
and the presets cut to two layers in bf16 (the real shapes: head_dim 256, 128 experts, ...).
"""

from __future__ import annotations

import random

import pytest
import torch

from graphwise import LLM, SamplingParams
from tests.conftest import (
    eager_decode,
    graph_steps,
    hf_greedy,
    model_runner,
    schedule_prompt_logits,
)

pytestmark = pytest.mark.gpu

TINY = ["qwen3", "qwen3-moe", "gemma2", "gemma3", "mistral", "mixtral", "phi3"]
PRESETS = ["qwen3-8b", "qwen3-30b-a3b", "gemma-2-9b", "mistral-7b", "mixtral-8x7b"]


def _prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randrange(3, 90))] for _ in range(n)]


def _generate(llm: LLM, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("arch", TINY)
def test_tiny_models_on_triton_match_hf_and_graphs_match_eager(arch, tiny_model_dir):
    """fp32 on CUDA with the Triton backend (IEEE dot products): HF's greedy tokens, with
    prefix caching and chunked prefill on; then the same decode replayed from CUDA graphs."""
    path = tiny_model_dir(arch)
    prompts = _prompts(6, 512, seed=3)
    expected = hf_greedy(path, prompts, 12)  # HF on the CPU, fp32
    llm = LLM(
        model=str(path),
        device="cuda",
        dtype="float32",
        block_size=16,
        max_num_batched_tokens=32,  # chunked prefill across the windows
        cuda_graph="on",
        attention_backend="triton",
        kv_cache_memory=1 << 28,
    )
    runner = model_runner(llm)
    assert runner.backend.name == "triton" and runner.graph_runner is not None
    before = graph_steps(llm)
    assert _generate(llm, prompts, 12) == expected
    assert graph_steps(llm) > before  # decode replayed graphs
    with eager_decode(llm):
        assert _generate(llm, prompts, 12) == expected  # eager, and the prefix cache is warm
    llm.shutdown()


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_triton_and_torch_backends_agree(preset):
    """The real shapes in bf16: prompt logits of the Triton path against the PyTorch path.

    Mixtral runs in fp32: its dummy router's top-2 of 8 sits on near-ties, and bf16 rounding
    differences between the two attention paths flip some tokens' experts, each flip swapping
    half that token's MLP output (7% logits error on the H200, 2026-12-01); 128 experts top-8
    (Qwen3-MoE) dilute a flip to an eighth. In fp32 both paths route alike."""
    fp32 = preset == "mixtral-8x7b"
    outs = {}
    for backend in ("torch", "triton"):
        llm = LLM(
            preset=preset,
            dtype="float32" if fp32 else "auto",
            num_layers=2,
            max_model_len=256,
            max_num_seqs=8,
            cuda_graph="off",
            attention_backend=backend,
            kv_cache_memory=1 << 30,
        )
        prompts = _prompts(6, llm.llm_engine.model_config.vocab_size, seed=7)
        outs[backend] = schedule_prompt_logits(llm, prompts).float()
        llm.shutdown()
        del llm
        torch.cuda.empty_cache()
    ref, got = outs["torch"], outs["triton"]
    rel = (got - ref).norm() / ref.norm()
    assert rel < (1e-3 if fp32 else 2e-2), rel


@pytest.mark.parametrize("preset", ["gemma-2-9b", "mistral-7b", "qwen3-30b-a3b"])
def test_presets_graph_and_eager_greedy_tokens_are_identical(preset):
    """fp32 so that only reduction order differs between graph and eager decode."""
    llm = LLM(
        preset=preset,
        num_layers=2,
        max_model_len=512,
        max_num_seqs=16,
        cuda_graph="on",
        dtype="float32",
        kv_cache_memory=1 << 30,
    )
    prompts = _prompts(13, llm.llm_engine.model_config.vocab_size, seed=5)
    before = graph_steps(llm)
    with_graph = _generate(llm, prompts, 24)
    assert graph_steps(llm) - before >= 20
    with eager_decode(llm):
        eager = _generate(llm, prompts, 24)
    assert with_graph == eager
    llm.shutdown()
