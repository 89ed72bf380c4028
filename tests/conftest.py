"""Shared fixtures: tiny random HF models saved to disk, the embedded default, CPU-only setup."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():
    # Triton picks interpreter or compiled mode when kernels are defined: set it before any
    # test module imports graphwise.kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY_COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
    initializer_range=0.1,
)


def _save(model: torch.nn.Module, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    return path


def _randomize_qkv_bias(model: torch.nn.Module) -> None:
    """HF initialises biases to zero; random ones make the QKV-bias path matter."""
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                proj.bias.normal_(0, 0.1)


def build_tiny(arch: str, path: Path, seed: int = 0) -> Path:
    """A random-weight fp32 model of one of the supported architectures, saved as an HF dir."""
    import transformers as tf

    torch.manual_seed(seed)
    if arch == "llama":
        cfg = tf.LlamaConfig(
            **TINY_COMMON,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            rope_theta=500000.0,
        )
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "llama-tied":
        cfg = tf.LlamaConfig(**{**TINY_COMMON, "tie_word_embeddings": True})
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**TINY_COMMON)
        model = tf.Qwen2ForCausalLM(cfg)
        _randomize_qkv_bias(model)
    elif arch == "qwen2-moe":
        cfg = tf.Qwen2MoeConfig(
            **TINY_COMMON,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=96,
            norm_topk_prob=False,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
        )
        model = tf.Qwen2MoeForCausalLM(cfg)
        _randomize_qkv_bias(model)
    else:
        raise KeyError(arch)
    return _save(model.eval(), path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            cache[arch] = build_tiny(arch, tmp_path_factory.mktemp(arch.replace("-", "_")))
        return cache[arch]

    return get


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """HF transformers' greedy tokens, one prompt at a time (no padding to confound)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.no_grad():
            y = model.generate(
                x,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        outs.append(y[0, len(ids) :].tolist())
    return outs


@pytest.fixture(scope="session")
def default_llm():
    """The embedded default model, loaded once for the session."""
    from graphwise import LLM

    return LLM(max_num_seqs=16)
