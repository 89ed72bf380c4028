"""GGUF linear weights kept packed (issue 17 item 4), forced on CPU (GRAPHWISE_GGUF_PACKED=1):
the CPU then dequantizes each packed layer once with the torch reference, bit-identical to
gguf.quants.dequantize, so the packed loading (row permutation, packed qkv/gate-up, per-shard
types, TP slicing) must give exactly the weights and greedy tokens of the dequantized path.

A tiny Llama GGUF written here mixes every supported type, also within one packed layer (q/k
Q4_K with v Q6_K, as Q4_K_M files do; gate Q4_0 with up Q4_1), with random blocks (finite fp16
scales); the embedded default (SmolLM2-135M Q4_1) checks the real file end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from graphwise import LLM, SamplingParams
from graphwise.kernels.gguf_quant import random_packed

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
HIDDEN, INTER, VOCAB, HEADS, KV_HEADS = 512, 1024, 512, 4, 2
LAYER_TYPES = [
    {
        "attn_q": "Q4_K",
        "attn_k": "Q4_K",
        "attn_v": "Q6_K",
        "attn_output": "Q5_K",
        "ffn_gate": "Q4_0",
        "ffn_up": "Q4_1",
        "ffn_down": "Q8_0",
    },
    {
        "attn_q": "Q8_0",
        "attn_k": "Q8_0",
        "attn_v": "Q8_0",
        "attn_output": "Q4_K",
        "ffn_gate": "Q5_K",
        "ffn_up": "Q5_K",
        "ffn_down": "Q6_K",
    },
]
_ROWS_IN = {
    "attn_q": (HIDDEN, HIDDEN),
    "attn_k": (HIDDEN * KV_HEADS // HEADS, HIDDEN),
    "attn_v": (HIDDEN * KV_HEADS // HEADS, HIDDEN),
    "attn_output": (HIDDEN, HIDDEN),
    "ffn_gate": (INTER, HIDDEN),
    "ffn_up": (INTER, HIDDEN),
    "ffn_down": (HIDDEN, INTER),
}


def write_mixed_gguf(path: Path) -> Path:
    """A 2-layer Llama GGUF (hidden 512: every row holds whole 256-element K-quant blocks, also
    split over 2 ranks) whose linear weights are random packed blocks of mixed types."""
    import gguf

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(512)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(len(LAYER_TYPES))
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(VOCAB)
    w.add_rope_freq_base(10000.0)

    def packed(name: str, qtype: str, rows: int, inp: int, seed: int) -> None:
        data = random_packed(qtype, rows, inp, seed=seed).numpy()
        w.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[qtype])

    embd = (rng.standard_normal((VOCAB, HIDDEN)) * 0.5).astype(np.float32)
    q8 = gguf.GGMLQuantizationType.Q8_0
    w.add_tensor("token_embd.weight", gguf.quants.quantize(embd, q8), raw_dtype=q8)
    packed("output.weight", "Q6_K", VOCAB, HIDDEN, seed=1)  # the LM head stays dequantized
    w.add_tensor("output_norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
    for i, types in enumerate(LAYER_TYPES):
        for j, (kind, qtype) in enumerate(types.items()):
            packed(f"blk.{i}.{kind}.weight", qtype, *_ROWS_IN[kind], seed=100 * i + j)
        for norm in ("attn_norm", "ffn_norm"):
            weight = (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
            w.add_tensor(f"blk.{i}.{norm}.weight", weight)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory) -> Path:
    return write_mixed_gguf(tmp_path_factory.mktemp("gguf_mixed") / "mixed.gguf")


def prompts() -> list[list[int]]:
    rng = np.random.default_rng(4)
    return [rng.integers(1, VOCAB, n).tolist() for n in (3, 11, 30)]


def run(path: Path, monkeypatch, packed: bool, **kw) -> tuple[list[list[int]], LLM]:
    monkeypatch.setenv("GRAPHWISE_GGUF_PACKED", "1" if packed else "0")
    llm = LLM(model=str(path), block_size=8, **kw)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts()], GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm


def _dense(layer) -> torch.Tensor:
    return layer.gguf_dense if layer.quant_method.name == "gguf" else layer.weight


def test_mixed_types_packed_equal_dequantized(mixed_gguf, monkeypatch):
    ref, ref_llm = run(mixed_gguf, monkeypatch, packed=False)
    got, llm = run(mixed_gguf, monkeypatch, packed=True)
    assert got == ref
    model = llm.llm_engine.executor.driver.model
    ref_model = ref_llm.llm_engine.executor.driver.model
    l0 = model.model.layers[0]
    qkv, gate_up = l0.self_attn.qkv_proj, l0.mlp.gate_up_proj
    # mixed shard types: one packed tensor per shard; one type: one tensor
    assert {n for n, _ in qkv.named_parameters()} == {"qweight_q", "qweight_k", "qweight_v"}
    assert {n for n, _ in gate_up.named_parameters()} == {"qweight_gate", "qweight_up"}
    assert {n for n, _ in model.model.layers[1].self_attn.qkv_proj.named_parameters()} == {
        "qweight"
    }
    assert qkv.qweight_v.dtype == torch.uint8 and qkv.quant_method.qtypes == ("Q4_K",) * 2 + (
        "Q6_K",
    )
    assert model.lm_head.quant_method.name == "unquantized"
    # every packed layer holds exactly the dequantized path's weights
    for (name, mod), (_, ref_mod) in zip(
        model.named_modules(), ref_model.named_modules(), strict=True
    ):
        if getattr(mod, "quant_method", None) is not None and mod is not model.lm_head:
            assert mod.quant_method.name == "gguf", name
            assert torch.equal(_dense(mod), ref_mod.weight), name
    # the memory plan counts the packed bytes
    plan = llm.llm_engine.memory_plan.weights_bytes
    assert plan == sum(p.numel() * p.element_size() for p in model.parameters())
    assert plan < 0.45 * ref_llm.llm_engine.memory_plan.weights_bytes


def test_gguf_quantization_option(mixed_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHWISE_GGUF_PACKED", "1")
    llm = LLM(model=str(mixed_gguf), quantization="gguf", block_size=8)
    assert llm.llm_engine.executor.driver.model.model.layers[0].mlp.down_proj.qweight.dtype == (
        torch.uint8
    )
    from tests.conftest import build_tiny

    with pytest.raises(ValueError, match="quantization='gguf' needs a .gguf model file"):
        LLM(model=str(build_tiny("llama", tmp_path / "hf")), quantization="gguf")


def test_packed_layer_errors():
    from graphwise.layers import quantization
    from graphwise.layers.linear import Linear
    from graphwise.layers.quantization.base import ShardSpec
    from graphwise.layers.quantization.gguf import GgufConfig, GgufLinearMethod

    cfg = GgufConfig({"a.weight": "Q4_K", "b.weight": "F16", "c.weight": "Q4_K"})
    assert cfg.linear_method(["b"]).name == "unquantized"  # F16: dequantized as before
    assert cfg.linear_method(["a", "b"]).name == "unquantized"  # a layer only partly packed
    assert cfg.linear_method(["a", "c"]) == GgufLinearMethod(("Q4_K", "Q4_K"))
    assert cfg.packed == {"a.weight", "c.weight"}
    with quantization.building(cfg), pytest.raises(ValueError, match="split a 256-element block"):
        Linear(128, 64).set_quant_method(GgufLinearMethod(("Q4_K",)), torch.float32)
    with quantization.building(cfg):
        layer = Linear(256, 8)
        layer.set_quant_method(GgufLinearMethod(("Q4_K",)), torch.float32)
    spec = ShardSpec(None, 0, 8, 8, 0, 256, 0, 1)
    with pytest.raises(ValueError, match=r"expected uint8 \(8, 144\)"):
        layer.quant_method.load(layer, "weight", torch.zeros(8, 256), spec)


@pytest.mark.slow
def test_default_model_packed_on_cpu_answers_paris(default_llm, monkeypatch):
    """SmolLM2-135M Q4_1 kept packed: the same greedy tokens as the dequantized default, and the
    memory plan holds 5 bits per linear weight (Q4_1: 20 bytes per 32 weights)."""
    monkeypatch.setenv("GRAPHWISE_GGUF_PACKED", "1")
    llm = LLM(max_num_seqs=16)
    question = [[{"role": "user", "content": "What is the capital of France?"}]]
    params = SamplingParams(temperature=0, max_tokens=32)
    got = llm.chat(question, params, use_tqdm=False)[0].outputs[0]
    ref = default_llm.chat(question, params, use_tqdm=False)[0].outputs[0]
    assert "Paris" in got.text and got.token_ids == ref.token_ids
    model = llm.llm_engine.executor.driver.model
    packed_bytes = weights = 0
    for mod in model.modules():
        if getattr(mod, "quant_method", None) is not None and mod.quant_method.name == "gguf":
            packed_bytes += mod.qweight.numel()
            weights += mod.out_features * mod.in_features
    assert weights > 100e6 and packed_bytes * 8 / weights == 5.0
    plan = llm.llm_engine.memory_plan.weights_bytes
    assert plan == sum(p.numel() * p.element_size() for p in model.parameters())
    assert plan < 0.4 * default_llm.llm_engine.memory_plan.weights_bytes
