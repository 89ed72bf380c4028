"""Qwen3 and Qwen3-MoE: the Qwen2 layouts with a per-head RMSNorm of q and k before RoPE, an
explicit head_dim (not hidden / heads) and no q/k/v bias; Qwen3-MoE routes with
`norm_topk_prob` and has no shared expert (through the same SparseMoE and fused kernel)."""

from __future__ import annotations

from graphwise.layers.norm import RMSNorm
from graphwise.models.llama import DecoderLayer, LlamaForCausalLM, LlamaModel, SelfAttention
from graphwise.models.qwen2_moe import MoEDecoderLayer, Qwen2MoeForCausalLM


class Qwen3Attention(SelfAttention):
    qk_norm = RMSNorm  # HF Qwen3RMSNorm: Llama numerics over head_dim


class Qwen3DecoderLayer(DecoderLayer):
    attention_cls = Qwen3Attention


class Qwen3Model(LlamaModel):
    layer_cls = Qwen3DecoderLayer


class Qwen3ForCausalLM(LlamaForCausalLM):
    model_cls = Qwen3Model


class Qwen3MoeDecoderLayer(MoEDecoderLayer):
    attention_cls = Qwen3Attention


class Qwen3MoeModel(LlamaModel):
    layer_cls = Qwen3MoeDecoderLayer


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    """Checkpoint names are Qwen2-MoE's (`mlp.gate`, `mlp.experts.N.{gate,up,down}_proj`)."""

    model_cls = Qwen3MoeModel
