"""Mixtral: Mistral attention (sliding window when the config sets one) with a sparse MoE of
`num_local_experts` experts, top-`num_experts_per_tok`, the top-k weights always renormalised
and kept in fp32, no shared expert: the Qwen2-MoE layer and fused kernel under other names.

The published checkpoint calls the MoE `block_sparse_moe` and its experts' projections w1
(gate), w3 (up) and w2 (down); they are renamed on the way in and out.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from graphwise.layers.moe import SparseMoE
from graphwise.models.llama import DecoderLayer, LlamaModel
from graphwise.models.model_config import ModelConfig
from graphwise.models.qwen2_moe import Qwen2MoeForCausalLM, check_expert_activation

_TO_OURS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_TO_HF = {v: k for k, v in _TO_OURS.items()}
_HF_EXPERT = re.compile(r"(.*)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")
_OUR_EXPERT = re.compile(r"(.*)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class MixtralDecoderLayer(DecoderLayer):
    def make_mlp(self, cfg: ModelConfig, layer_idx: int) -> nn.Module:
        check_expert_activation(cfg)
        return SparseMoE(
            cfg.hidden_size,
            cfg.num_experts,
            cfg.num_experts_per_tok,
            cfg.intermediate_size,  # Mixtral's intermediate_size is the expert size
            norm_topk_prob=True,
            fp32_routing_weights=True,
        )


class MixtralModel(LlamaModel):
    layer_cls = MixtralDecoderLayer


class MixtralForCausalLM(Qwen2MoeForCausalLM):
    model_cls = MixtralModel

    def map_weight(
        self, name: str, tensor: torch.Tensor, params: dict[str, nn.Parameter]
    ) -> list[str]:
        m = _HF_EXPERT.match(name)
        if m:
            name = f"{m.group(1)}.mlp.experts.{m.group(2)}.{_TO_OURS[m.group(3)]}.weight"
        else:
            name = name.replace(".block_sparse_moe.gate.", ".mlp.gate.")
        return super().map_weight(name, tensor, params)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, tensor in super().hf_state_dict().items():
            m = _OUR_EXPERT.match(name)
            if m:
                name = f"{m.group(1)}.block_sparse_moe.experts.{m.group(2)}.{_TO_HF[m.group(3)]}"
                name += ".weight"
            else:
                name = name.replace(".mlp.gate.", ".block_sparse_moe.gate.")
            out[name] = tensor
        return out
