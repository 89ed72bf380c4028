"""Gemma 2 and Gemma 3 (text, `Gemma3ForCausalLM`).

Both: RMSNorm scaling by (1 + w) in fp32, a norm before *and after* attention and the MLP, the
embedding times sqrt(hidden_size), GeGLU (`gelu_pytorch_tanh`), the softmax scale
`query_pre_attn_scalar ** -0.5`, tied embeddings, and sliding-window layers alternating with
global ones (`layer_types`, or each family's pattern). Gemma 2 adds tanh soft-capping of the
attention scores and the final logits; Gemma 3 drops it, adds a per-head (1 + w) RMSNorm of q
and k, and gives its sliding layers their own RoPE base (`rope_local_base_freq`).

The residual stream keeps the fused add-and-norm of the Llama layer: each layer receives
(x, residual) with the true hidden state x + residual, and returns its un-added output.
"""

from __future__ import annotations

import torch

from graphwise.layers.attention import ForwardContext
from graphwise.layers.norm import GemmaRMSNorm
from graphwise.models.llama import DecoderLayer, LlamaForCausalLM, LlamaModel, SelfAttention
from graphwise.models.model_config import ModelConfig


class GemmaDecoderLayer(DecoderLayer):
    norm_cls = GemmaRMSNorm

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__(cfg, layer_idx)
        self.pre_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        ctx: ForwardContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.post_attention_layernorm(self.self_attn(positions, h, ctx))
        h, residual = self.pre_feedforward_layernorm(h, residual)
        return self.post_feedforward_layernorm(self.mlp(h)), residual


class Gemma2Model(LlamaModel):
    layer_cls = GemmaDecoderLayer
    norm_cls = GemmaRMSNorm
    scale_embeddings = True


class Gemma2ForCausalLM(LlamaForCausalLM):
    model_cls = Gemma2Model


class Gemma3Attention(SelfAttention):
    qk_norm = GemmaRMSNorm


class Gemma3DecoderLayer(GemmaDecoderLayer):
    attention_cls = Gemma3Attention


class Gemma3Model(Gemma2Model):
    layer_cls = Gemma3DecoderLayer


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    model_cls = Gemma3Model
