"""Linear layers with packed weights (QKV, gate/up) loaded shard by shard.

Packing turns three (or two) small matmuls into one, which matters most at small batch where
each kernel launch costs as much as the math. Tensor parallelism splits these along the output
(column) or input (row) dimension; the split helpers live here so the loaders stay simple.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    """y = x W^T (+ b). Weight layout [out_features, in_features], like nn.Linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class PackedLinear(Linear):
    """Several projections of the same input stored as one weight; `shard_sizes` names the
    rows each one owns, in order (e.g. q, k, v)."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool = False) -> None:
        super().__init__(in_features, sum(shard_sizes.values()), bias)
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, size in shard_sizes.items():
            self.shard_offsets[name] = (offset, size)
            offset += size

    def load_shard(self, shard: str, tensor: torch.Tensor, is_bias: bool = False) -> None:
        offset, size = self.shard_offsets[shard]
        target = self.bias if is_bias else self.weight
        assert target is not None, f"{shard}: checkpoint has a bias the layer lacks"
        if tensor.shape[0] != size:
            raise ValueError(
                f"shard {shard!r}: expected {size} rows, checkpoint has {tuple(tensor.shape)}"
            )
        target.data[offset : offset + size].copy_(tensor)
