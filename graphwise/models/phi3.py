"""Phi-3 (mini / medium): the Llama layout with q, k and v, and gate and up, already fused in
the checkpoint (`qkv_proj`, `gate_up_proj`), a sliding window on every layer when the config
sets one, and LongRoPE (`longrope`, formerly `su`) scaling when present (see layers/rotary.py).

The fused tensors are cut into their q/k/v (gate/up) parts on loading, so tensor parallelism
splits each part as for Llama; `hf_state_dict` glues them back.
"""

from __future__ import annotations

import torch
from torch import nn

from graphwise.layers.linear import Linear, PackedLinear
from graphwise.models.llama import LlamaForCausalLM, load_linear

_FUSED = {"qkv_proj": ("q", "k", "v"), "gate_up_proj": ("gate", "up")}


class Phi3ForCausalLM(LlamaForCausalLM):
    def map_weight(
        self, name: str, tensor: torch.Tensor, params: dict[str, nn.Parameter]
    ) -> list[str]:
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in _FUSED:
            module = self.get_submodule(".".join(parts[:-1]))
            assert isinstance(module, PackedLinear)
            sizes = [module.shard_full_sizes[s] for s in _FUSED[parts[-2]]]
            if tensor.shape[0] != sum(sizes):
                raise ValueError(
                    f"checkpoint tensor {name!r} has {tensor.shape[0]} rows, "
                    f"the model expects {sum(sizes)}"
                )
            for shard, piece in zip(_FUSED[parts[-2]], tensor.split(sizes), strict=True):
                load_linear(module, name, piece, shard)
            return [f"{name}:{shard}" for shard in _FUSED[parts[-2]]]
        return super().map_weight(name, tensor, params)

    def checkpoint_names(self, module_name: str, layer: Linear) -> list[str]:
        return [module_name]  # Phi-3's checkpoint has qkv_proj and gate_up_proj fused

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        # Our packed parameters already are Phi-3's fused tensors (q|k|v, gate|up in order),
        # under the same names: nothing to split.
        out = {pname: param.data for pname, param in self.named_parameters()}
        if self.config.tie_word_embeddings:
            out.pop("lm_head.weight", None)
        return out
