"""FP8 checkpoints under TP=2 on CPU (gloo, one process per rank): every quantized tensor is
sliced per rank (packed qkv/gate-up rows, row-parallel columns, per-channel and block scales),
and the greedy tokens equal HF transformers' on the dequantized weights."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.conftest import generate, worker_pids
from tests.layers.test_quantization import GREEDY, _hf_greedy_with, _prompts, _write_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wide_src(tmp_path_factory):
    """q 256 rows, k/v 128 (64 per rank: not whole 128-row blocks), MLP 512 (256 per rank)."""
    import transformers as tf

    from tests.conftest import TINY_COMMON

    torch.manual_seed(2)
    cfg = tf.Qwen2Config(**{**TINY_COMMON, "hidden_size": 256, "intermediate_size": 512})
    path = tmp_path_factory.mktemp("wide_q2")
    model = tf.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.1)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.mark.parametrize("fmt", ["ct-channel", "ct-tensor-static", "block"])
def test_fp8_checkpoints_under_tp2_match_hf(fmt, wide_src, tmp_path, make_llm):
    ref = _write_checkpoint(wide_src, tmp_path / fmt, fmt)
    prompts = _prompts(7)
    llm = make_llm(tmp_path / fmt, tensor_parallel_size=2)
    assert len(worker_pids(llm)) == 1
    assert generate(llm, prompts, GREEDY) == _hf_greedy_with(wide_src, ref, prompts)
    qkv = llm.llm_engine.executor.driver.model.model.layers[0].self_attn.qkv_proj
    assert qkv.weight.dtype == torch.float8_e4m3fn
    assert qkv.weight.shape[0] == (256 + 2 * 128) // 2


def test_online_fp8_under_tp2_matches_tp1(wide_src, make_llm):
    prompts = _prompts(8)
    one = generate(make_llm(wide_src, quantization="fp8"), prompts)
    two = generate(make_llm(wide_src, quantization="fp8", tensor_parallel_size=2), prompts)
    assert one == two


@pytest.mark.parametrize("fmt", ["awq", "gptq"])
def test_int4_checkpoints_under_tp2_match_hf(fmt, tmp_path, make_llm):
    """Packed qkv/gate-up columns split per rank (k/v: 16 of 32 outputs each), o/down rows
    split by whole groups (group 32 of 64 and 128 inputs)."""
    from tests.conftest import build_tiny
    from tests.layers.test_quantization_int4 import write_int4_checkpoint

    src = build_tiny("qwen2", tmp_path / "src")
    ref = write_int4_checkpoint(src, tmp_path / fmt, fmt)
    prompts = _prompts(9)
    llm = make_llm(tmp_path / fmt, tensor_parallel_size=2)
    assert generate(llm, prompts, GREEDY) == _hf_greedy_with(src, ref, prompts)
    qkv = llm.llm_engine.executor.driver.model.model.layers[0].self_attn.qkv_proj
    assert qkv.quant_method.name == fmt and qkv.int4_weight.shape == ((64 + 2 * 32) // 2, 64)


def test_int4_split_cutting_a_group_is_refused(tmp_path, make_llm):
    from tests.conftest import build_tiny
    from tests.layers.test_quantization_int4 import write_int4_checkpoint

    src = build_tiny("qwen2", tmp_path / "src")
    write_int4_checkpoint(src, tmp_path / "g64", "gptq", group=64)  # o_proj: 32 inputs per rank
    with pytest.raises(Exception, match="group_size=64"):
        make_llm(tmp_path / "g64", tensor_parallel_size=2)


def test_gguf_packed_mixed_types_under_tp2_match_dequantized(tmp_path, make_llm, monkeypatch):
    """GGUF blocks kept packed (forced on CPU) under TP=2: rows of every shard type split per
    rank, o/down split by whole blocks (256 of 512 / 512 of 1024 inputs), tokens equal the
    single-device dequantized model's."""
    from tests.models.test_gguf_packed import GREEDY as GGUF_GREEDY
    from tests.models.test_gguf_packed import prompts as gguf_prompts
    from tests.models.test_gguf_packed import write_mixed_gguf

    path = write_mixed_gguf(tmp_path / "mixed.gguf")
    monkeypatch.setenv("GRAPHWISE_GGUF_PACKED", "0")
    ref = generate(make_llm(path), gguf_prompts(), GGUF_GREEDY)
    monkeypatch.setenv("GRAPHWISE_GGUF_PACKED", "1")
    llm = make_llm(path, tensor_parallel_size=2)
    assert generate(llm, gguf_prompts(), GGUF_GREEDY) == ref
    qkv = llm.llm_engine.executor.driver.model.model.layers[0].self_attn.qkv_proj
    assert qkv.quant_method.name == "gguf" and qkv.qweight_v.shape[0] == 128  # 256 / 2 rows
