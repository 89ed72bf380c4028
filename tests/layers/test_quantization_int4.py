"""INT4 checkpoints (issue 17): AWQ (AutoAWQ GEMM) and GPTQ (v1, desc_act=False) files written
here from a tiny random Qwen2 by an independent quantizer and the formats' own packing loops
(restated element by element in tests/kernels/test_int4_quant.py), run against HF transformers
on the dequantized weights (fp32, CPU: the CPU path runs F.linear on the exact dequantized
checkpoint weights, so the greedy tokens must be identical); errors for what is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from graphwise import LLM, SamplingParams
from graphwise.layers.quantization import resolve
from tests.conftest import build_tiny
from tests.kernels.test_int4_quant import awq_pack_loop, gptq_pack_loop
from tests.layers.test_quantization import _hf_greedy_with, _is_target, _ours, _prompts

GROUP = 32


def _quantize(w: torch.Tensor, group: int, lo: int) -> tuple[torch.Tensor, ...]:
    """Asymmetric min/max quantization of w [out, in] per (group of inputs, output):
    codes [in, out] 0..15, zero points [in / group, out] in lo..15, fp16 scales, and the
    dequantized weight [out, in] as a checkpoint reader computes it."""
    wt = w.t().float()  # [in, out]: the stored orientation
    g = wt.reshape(-1, group, wt.shape[1])
    mn, mx = g.amin(1), g.amax(1)
    scales = ((mx - mn) / 15).clamp(min=1e-5).to(torch.float16)
    s = scales.float()
    zeros = torch.round(-mn / s).clamp(lo, 15).to(torch.int64)
    codes = torch.round(g / s[:, None, :] + zeros[:, None, :]).clamp(0, 15).to(torch.int64)
    deq = (codes - zeros[:, None, :]).float() * s[:, None, :]
    return codes.reshape(wt.shape), zeros, scales, deq.reshape(wt.shape).t().contiguous()


def write_int4_checkpoint(
    src: Path, dst: Path, fmt: str, group: int = GROUP
) -> dict[str, torch.Tensor]:
    """An AWQ or GPTQ copy of a tiny fp32 checkpoint; returns the dequantized weights."""
    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    out: dict[str, torch.Tensor] = {}
    ref: dict[str, torch.Tensor] = {}
    for name, w in tensors.items():
        if not _is_target(name):
            out[name] = w
            continue
        base = name.removesuffix(".weight")
        codes, zeros, scales, ref[name] = _quantize(w, group, lo=1 if fmt == "gptq" else 0)
        if fmt == "awq":
            qweight, qzeros = awq_pack_loop(codes), awq_pack_loop(zeros)
        else:
            qweight, qzeros = gptq_pack_loop(codes, zeros)
            out[f"{base}.g_idx"] = torch.arange(w.shape[1], dtype=torch.int32) // group
        out[f"{base}.qweight"], out[f"{base}.qzeros"], out[f"{base}.scales"] = (
            qweight,
            qzeros,
            scales,
        )
    (dst / "model.safetensors").unlink()
    save_file(out, str(dst / "model.safetensors"))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = int4_config(fmt, group)
    (dst / "config.json").write_text(json.dumps(cfg))
    return ref


def int4_config(fmt: str, group: int = GROUP) -> dict:
    if fmt == "awq":
        return {
            "quant_method": "awq",
            "bits": 4,
            "group_size": group,
            "zero_point": True,
            "version": "gemm",
        }
    return {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": group,
        "desc_act": False,
        "sym": False,
        "checkpoint_format": "gptq",
    }


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory) -> Path:
    return build_tiny("qwen2", tmp_path_factory.mktemp("q2src_int4"))  # QKV biases too


@pytest.mark.parametrize("fmt", ["awq", "gptq"])
def test_int4_checkpoint_matches_hf_on_dequantized_weights(fmt, tiny_src, tmp_path):
    ref = write_int4_checkpoint(tiny_src, tmp_path / fmt, fmt)
    prompts = _prompts(8)
    ours, llm = _ours(tmp_path / fmt, prompts)
    assert ours == _hf_greedy_with(tiny_src, ref, prompts)
    model = llm.llm_engine.executor.driver.model
    layer0 = model.model.layers[0]
    qkv = layer0.self_attn.qkv_proj
    assert qkv.quant_method.name == fmt and qkv.qweight.dtype == torch.int32
    assert qkv.weight is None  # no full-precision copy registered
    # the packed qkv's dequantized weight is the three shards' reference weights stacked
    names = [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"]
    torch.testing.assert_close(qkv.int4_weight, torch.cat([ref[n] for n in names]), rtol=0, atol=0)
    assert model.lm_head.weight.dtype == torch.float32  # not converted
    # The memory plan counts the packed bytes: 4 bits per weight + fp16 scales + int4 zeros.
    tensors = load_file(str(tiny_src / "model.safetensors"))
    expect = 0
    for name, w in tensors.items():
        if _is_target(name):
            out, inp = w.shape
            expect += out * inp // 2 + (inp // GROUP) * out * (2 + 0.5)
        else:
            expect += w.numel() * 4
    assert llm.llm_engine.memory_plan.weights_bytes == expect


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["awq", "gptq"])
def test_int4_dummy_preset_builds_and_decodes(fmt):
    llm = LLM(
        preset="qwen2.5-7b",
        num_layers=1,
        load_format="dummy",
        quantization=fmt,
        dtype="bfloat16",
        max_model_len=64,
        kv_cache_memory=1 << 22,
    )
    layer = llm.llm_engine.executor.driver.model.model.layers[0].mlp.gate_up_proj
    assert layer.qweight.dtype == torch.int32 and layer.quant_method.name == fmt
    w = layer.int4_weight.float()
    assert 0.02 < w.abs().max() <= 0.0451 and w.abs().mean() < 0.02
    out = llm.generate(
        [{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=3), use_tqdm=False
    )
    assert len(out[0].outputs[0].token_ids) == 3


# ---- errors ------------------------------------------------------------------------------
def test_int4_config_errors():
    with pytest.raises(ValueError, match="bits=8"):
        resolve(None, {**int4_config("gptq"), "bits": 8})
    with pytest.raises(ValueError, match="desc_act"):
        resolve(None, {**int4_config("gptq"), "desc_act": True})
    with pytest.raises(ValueError, match="gptq_v2"):
        resolve(None, {**int4_config("gptq"), "checkpoint_format": "gptq_v2"})
    with pytest.raises(ValueError, match="zero_point"):
        resolve(None, {**int4_config("awq"), "zero_point": False})
    with pytest.raises(ValueError, match="version 'gemv'"):
        resolve(None, {**int4_config("awq"), "version": "gemv"})
    with pytest.raises(ValueError, match="group_size=12"):
        resolve(None, {**int4_config("awq"), "group_size": 12})
    with pytest.raises(ValueError, match="use quantization='awq'"):
        resolve("awq_marlin", None)
    assert resolve("gptq", None).requires_checkpoint  # dummy weights only


def test_int4_refusals_at_load(tiny_src, tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="cannot quantize full-precision weights"):
        LLM(model=str(tiny_src), quantization="gptq")
    with pytest.raises(ValueError, match="MoE expert"):
        LLM(model=str(tiny_model_dir("qwen2-moe")), quantization="awq", load_format="dummy")
    # group 64 does not divide... the 64-wide input rows do, but 48 does not divide 64
    write_int4_checkpoint(tiny_src, tmp_path / "g", "gptq")
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())
    cfg["quantization_config"]["group_size"] = 48
    (tmp_path / "g" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not a multiple of group_size=48"):
        LLM(model=str(tmp_path / "g"))
    # an act-order g_idx in a file that claims desc_act=false
    dst = tmp_path / "act"
    write_int4_checkpoint(tiny_src, dst, "gptq")
    tensors = load_file(str(dst / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.g_idx"
    tensors[name] = tensors[name].flip(0).contiguous()
    save_file(tensors, str(dst / "model.safetensors"))
    with pytest.raises(ValueError, match="act-order"):
        LLM(model=str(dst))


@pytest.mark.parametrize("fmt", ["awq", "gptq"])
def test_int4_layer_kernel_path_matches_cpu_dequantized_path(fmt):
    """The CUDA path's glue (int4_linear with the loaded tensors, bias), run on CPU through the
    Triton interpreter, against the CPU path (F.linear on the dequantized weight)."""
    from graphwise.kernels.int4_quant import random_int4
    from graphwise.layers import quantization
    from graphwise.layers.linear import Linear

    N, K = 48, 64
    qweight, scales, qzeros = random_int4(fmt, N, K, 32, seed=3)
    with quantization.building(resolve(fmt, None)):
        layer = Linear(K, N, bias=True)
        layer.set_quant_method(
            resolve(fmt, {**int4_config(fmt), "group_size": 32}).method, torch.float32
        )
    for leaf, t in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales)):
        layer.load_checkpoint(leaf, t)
    layer.load_checkpoint("bias", torch.randn(N))
    layer.process_after_loading()
    x = torch.randn(3, K)
    dense = layer(x)
    layer.int4_weight = None  # what process_after_loading leaves on CUDA
    torch.testing.assert_close(layer(x), dense, rtol=1e-5, atol=1e-5)
