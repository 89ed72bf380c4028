"""Qwen2-MoE (Qwen1.5-MoE / Qwen2-57B-A14B layout): Qwen2 attention, sparse MoE MLP."""

from __future__ import annotations

import re

import torch
from torch import nn

from graphwise.layers.mlp import MLP
from graphwise.layers.moe import SparseMoE
from graphwise.models.llama import DecoderLayer, LlamaForCausalLM, LlamaModel
from graphwise.models.model_config import ModelConfig

_EXPERT = re.compile(r"(.*\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"(.*\.mlp)\.experts\.(gate_up_proj|down_proj)$")


class MoEDecoderLayer(DecoderLayer):
    def make_mlp(self, cfg: ModelConfig, layer_idx: int) -> nn.Module:
        if not cfg.is_moe_layer(layer_idx):
            return MLP(cfg.hidden_size, cfg.intermediate_size, hidden_act=cfg.hidden_act)
        check_expert_activation(cfg)
        return SparseMoE(
            cfg.hidden_size,
            cfg.num_experts,
            cfg.num_experts_per_tok,
            cfg.moe_intermediate_size,
            cfg.norm_topk_prob,
            cfg.shared_expert_intermediate_size,
        )


def check_expert_activation(cfg: ModelConfig) -> None:
    """The experts (PyTorch loop and fused kernel) are SwiGLU only."""
    if cfg.hidden_act not in ("silu", "swish"):
        raise ValueError(f"MoE experts with activation {cfg.hidden_act!r} are not supported")


class Qwen2MoeModel(LlamaModel):
    layer_cls = MoEDecoderLayer


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    model_cls = Qwen2MoeModel

    def map_weight(
        self, name: str, tensor: torch.Tensor, params: dict[str, nn.Parameter]
    ) -> list[str]:
        m = _EXPERT.match(name)
        if m:  # per-expert checkpoint tensors (the published layout)
            moe = self.get_submodule(m.group(1))
            assert isinstance(moe, SparseMoE)
            e, kind = int(m.group(2)), m.group(3)
            i = e - moe.expert_start  # local index (experts are split over the TP ranks)
            if not 0 <= i < moe.num_local_experts:
                return []
            size = moe.intermediate_size
            if kind == "down_proj":
                moe.w_down.data[i].copy_(tensor)
            else:
                offset = 0 if kind == "gate_proj" else size
                moe.w_gate_up.data[i, offset : offset + size].copy_(tensor)
            return [f"{m.group(1)}.experts.{e}.{kind}"]
        m = _FUSED.match(name)
        if m:  # transformers 5 may store experts already stacked
            moe = self.get_submodule(m.group(1))
            assert isinstance(moe, SparseMoE)
            kinds = ("gate_proj", "up_proj") if m.group(2) == "gate_up_proj" else ("down_proj",)
            target = moe.w_gate_up if m.group(2) == "gate_up_proj" else moe.w_down
            local = range(moe.expert_start, moe.expert_start + moe.num_local_experts)
            target.data.copy_(tensor[local.start : local.stop])
            return [f"{m.group(1)}.experts.{e}.{k}" for e in local for k in kinds]
        return super().map_weight(name, tensor, params)

    def expected_weights(self) -> set[str]:
        names = super().expected_weights()
        for mod_name, module in self.named_modules():
            if isinstance(module, SparseMoE):
                names -= {f"{mod_name}.w_gate_up", f"{mod_name}.w_down"}
                start = module.expert_start
                for e in range(start, start + module.num_local_experts):
                    names |= {
                        f"{mod_name}.experts.{e}.{k}" for k in ("gate_proj", "up_proj", "down_proj")
                    }
        return names

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        out = super().hf_state_dict()
        for mod_name, module in self.named_modules():
            if isinstance(module, SparseMoE):
                out.pop(f"{mod_name}.w_gate_up")
                out.pop(f"{mod_name}.w_down")
                size = module.intermediate_size
                for i in range(module.num_local_experts):
                    base = f"{mod_name}.experts.{module.expert_start + i}"
                    out[f"{base}.gate_proj.weight"] = module.w_gate_up.data[i, :size]
                    out[f"{base}.up_proj.weight"] = module.w_gate_up.data[i, size:]
                    out[f"{base}.down_proj.weight"] = module.w_down.data[i]
        return out
