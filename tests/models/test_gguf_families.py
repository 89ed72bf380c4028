"""GGUF for the families llama.cpp exports as qwen3, gemma2, gemma3 and phi3.

No GGUF of these is downloadable here, so the tests write tiny ones from HF checkpoints the way
llama.cpp's convert_hf_to_gguf.py does (tensor names, Gemma's stored 1 + w norms, Phi-3's fused
tensors and LongRoPE factor tensors, the metadata keys), in fp32. Two independent checks:
HF transformers' own GGUF reader turns the file back into the original tensors (so the writer
follows the convention HF also reads), and graphwise on the file gives HF's greedy tokens on
the original checkpoint.

GGUF has no field for Gemma's query_pre_attn_scalar (llama.cpp uses head_dim), so the Gemma
models here use that value; Gemma 3's layer pattern (5 local, 1 global) and local RoPE base are
llama.cpp's fixed ones.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from graphwise import LLM, SamplingParams
from tests.conftest import TINY_COMMON, hf_greedy

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)

_LAYER = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.qkv_proj": "attn_qkv",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.gate_up_proj": "ffn_up",  # Phi-3: gate and up stay fused
    "mlp.down_proj": "ffn_down",
}
_GEMMA_LAYER = {
    **_LAYER,
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def _build(arch: str, path: Path) -> Path:
    import transformers as tf

    torch.manual_seed(11)
    common = {**TINY_COMMON}
    if arch == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**common, head_dim=32))
    elif arch == "gemma2":
        cfg = tf.Gemma2Config(
            **{**common, "num_hidden_layers": 3, "tie_word_embeddings": True},
            head_dim=32,
            query_pre_attn_scalar=32,
            sliding_window=12,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=5.0,
        )
        model = tf.Gemma2ForCausalLM(cfg)
    elif arch == "gemma3":
        cfg = tf.Gemma3TextConfig(
            **{**common, "num_hidden_layers": 6, "tie_word_embeddings": True},
            head_dim=32,
            query_pre_attn_scalar=32,
            sliding_window=10,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        )
        model = tf.Gemma3ForCausalLM(cfg)
    elif arch == "phi3":
        cfg = tf.Phi3Config(
            **{**common, "hidden_size": 96, "max_position_embeddings": 512},
            sliding_window=24,
            original_max_position_embeddings=128,
            rope_scaling={
                "type": "longrope",
                "short_factor": [1.0 + 0.1 * i for i in range(12)],
                "long_factor": [2.0 + 0.3 * i for i in range(12)],
            },
        )
        model = tf.Phi3ForCausalLM(cfg)
    else:
        raise KeyError(arch)
    with torch.no_grad():  # norms away from their init, so the 1 + w convention matters
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.3)
    model.eval().save_pretrained(path)
    return path


def _write_gguf(hf_dir: Path, arch: str, out: Path) -> Path:
    """What llama.cpp's converter writes for these architectures (metadata and tensors)."""
    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    tensors = load_file(str(hf_dir / "model.safetensors"))
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    w = gguf.GGUFWriter(str(out), arch)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    rope = cfg.get("rope_parameters") or {}
    if arch in ("qwen3", "gemma2", "gemma3"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
        w.add_sliding_window(cfg["sliding_window"])
    elif arch == "gemma3":
        full = rope["full_attention"]
        w.add_rope_freq_base(full["rope_theta"])
        w.add_sliding_window(cfg["sliding_window"])
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(full["factor"])
    else:
        w.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    if arch == "phi3":
        original = cfg["original_max_position_embeddings"]
        w.add_rope_scaling_orig_ctx_len(original)
        w.add_sliding_window(cfg["sliding_window"])
        scale = cfg["max_position_embeddings"] / original
        w.add_rope_scaling_attn_factors(float(np.sqrt(1 + np.log(scale) / np.log(original))))
        for kind in ("long", "short"):
            factors = np.asarray(rope[f"{kind}_factor"], dtype=np.float32)
            w.add_tensor(f"rope_factors_{kind}.weight", factors)
    layer_names = _GEMMA_LAYER if arch.startswith("gemma") else _LAYER
    for name, tensor in tensors.items():
        if name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue
        if name in _GLOBAL:
            gguf_name = _GLOBAL[name]
        else:
            parts = name.split(".")  # model.layers.N.<module path>.weight
            gguf_name = f"blk.{parts[2]}.{layer_names['.'.join(parts[3:-1])]}.{parts[-1]}"
        data = tensor.float().numpy()
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            data = data + 1.0  # llama.cpp multiplies by the stored weight: store 1 + w
        w.add_tensor(gguf_name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="module")
def gguf_pair(tmp_path_factory):
    cache: dict[str, tuple[Path, Path]] = {}

    def get(arch: str) -> tuple[Path, Path]:
        if arch not in cache:
            root = tmp_path_factory.mktemp(f"gguf_{arch}")
            hf_dir = _build(arch, root / "hf")
            cache[arch] = (hf_dir, _write_gguf(hf_dir, arch, root / f"tiny-{arch}.gguf"))
        return cache[arch]

    return get


ARCHS = ["qwen3", "gemma2", "gemma3", "phi3"]


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_reads_our_gguf_back_to_the_checkpoint(arch, gguf_pair):
    """HF's GGUF reader (its own name map and Gemma norm shift) recovers every tensor."""
    from safetensors.torch import load_file
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    hf_dir, gguf_path = gguf_pair(arch)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)
    original = load_file(str(hf_dir / "model.safetensors"))
    got = parsed["tensors"]
    for name, tensor in original.items():
        if name == "lm_head.weight" and name not in got:
            continue  # tied
        torch.testing.assert_close(got[name].float(), tensor, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_greedy_tokens_match_hf_checkpoint(arch, gguf_pair):
    hf_dir, gguf_path = gguf_pair(arch)
    rng = random.Random(8)
    prompts = [[rng.randrange(512) for _ in range(n)] for n in (6, 29, 55)]
    expected = hf_greedy(hf_dir, prompts, GREEDY.max_tokens)
    llm = LLM(model=str(gguf_path), block_size=8)
    mc = llm.llm_engine.model_config
    assert mc.architecture.lower().startswith(arch)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    if arch == "gemma3":  # llama.cpp's fixed pattern: 5 sliding layers, then a global one
        assert mc.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
        assert mc.rope_theta_sliding == 10000.0 and mc.rope_scaling == {
            "rope_type": "linear",
            "factor": 2.0,
        }
    if arch == "phi3":
        assert mc.sliding_window == 24 and mc.rope_scaling["rope_type"] == "longrope"
