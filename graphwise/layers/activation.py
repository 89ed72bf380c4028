from __future__ import annotations

import torch
from torch import nn

from graphwise.layers import ops


class SiluAndMul(nn.Module):
    """silu(gate) * up on a packed [.., 2I] gate/up projection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.silu_and_mul(x)


class GeluTanhAndMul(nn.Module):
    """gelu(gate, approximate="tanh") * up on a packed gate/up projection (Gemma's GeGLU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.gelu_tanh_and_mul(x)


# HF `hidden_act` / `hidden_activation` names -> the gated activation that implements them.
GATED_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "silu": SiluAndMul,
    "swish": SiluAndMul,
    "gelu_pytorch_tanh": GeluTanhAndMul,
}


def gated_activation(name: str) -> nn.Module:
    try:
        return GATED_ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"hidden activation {name!r} is not supported (supported: "
            f"{', '.join(sorted(GATED_ACTIVATIONS))})"
        ) from None
