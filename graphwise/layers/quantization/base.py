"""The interface a quantization format implements for the linear layers: `LinearMethod`.

A linear layer (layers/linear.py) owns its shape and its place under tensor parallelism; the
method owns how its weight is stored and multiplied. The layer describes where a checkpoint
tensor goes with a `ShardSpec` (which rows of the layer's output a projection owns, and which
part of the full tensor this rank keeps along each dimension); the method turns checkpoint
tensors (`weight`, `weight_scale`, `qweight`, `scales`, ...) into its own tensors.

Every tensor a method creates is registered on the layer as a parameter (requires_grad=False):
the memory plan and `explain`'s byte floor count parameters, so they see each format's real
bytes (FP8 bytes + scales, packed INT4 or GGUF blocks) without knowing the format.

A method may store a packed layer (qkv, gate/up) in one tensor or per shard, or dequantize a
layer it cannot keep packed: that choice is made in `create_weights`, which sees every shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from graphwise.layers.linear import Linear


@dataclass(frozen=True)
class ShardSpec:
    """Where one checkpoint projection lands in a layer on this rank.

    - `name`: the packed shard ("q", "gate", ...) or None for an unpacked layer.
    - `out_offset`, `out_size`: the rows of the layer's (local) output it fills.
    - `out_full`: the rows the checkpoint tensor has (the whole projection, all ranks).
    - `out_index`: this rank keeps rows [out_index * out_size, (out_index + 1) * out_size) of
      the checkpoint tensor (the last part may be short: padding rows stay zero).
    - `in_full`: the input features the checkpoint tensor has.
    - `in_index`, `in_count`: this rank keeps input-feature part `in_index` of `in_count` equal
      parts (row parallelism), else (0, 1).
    """

    name: str | None
    out_offset: int
    out_size: int
    out_full: int
    out_index: int
    in_full: int
    in_index: int
    in_count: int

    def take_rows(self, tensor: torch.Tensor, rows_per_row: int = 1) -> torch.Tensor:
        """This rank's rows of a checkpoint tensor whose dim 0 runs along the output, with
        `rows_per_row` output rows per tensor row (1 for weights; the block size for block
        scales), zero-padded to this rank's size."""
        size = -(-self.out_size // rows_per_row)
        start = self.out_index * self.out_size // rows_per_row
        part = tensor[start : start + size]
        if part.shape[0] < size:
            pad = part.new_zeros((size - part.shape[0], *part.shape[1:]))
            part = torch.cat([part, pad])
        return part

    def take_cols(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """This rank's part along the input features of a checkpoint tensor."""
        if self.in_count == 1:
            return tensor
        n = tensor.shape[dim] // self.in_count
        return tensor.narrow(dim, self.in_index * n, n)


class LinearMethod:
    """How a linear layer stores and multiplies its weight. One instance may serve many layers:
    per-layer state lives on the layer (its parameters and attributes)."""

    name = "unquantized"
    # True when `apply` is F.linear on `layer.weight` and `layer.bias` (the layer then keeps its
    # plain forward: no extra Python per call).
    plain = False

    def create_weights(self, layer: Linear, dtype: torch.dtype) -> None:
        """Register the layer's tensors (on the current default device)."""
        raise NotImplementedError

    def checkpoint_leaves(self, layer: Linear) -> set[str]:
        """The tensor names (last name component) a complete checkpoint has for this layer."""
        raise NotImplementedError

    def load(self, layer: Linear, leaf: str, tensor: torch.Tensor, spec: ShardSpec) -> None:
        """Copy (slice, convert) checkpoint tensor `leaf` of the projection `spec` into the
        layer. Raise ValueError naming the tensor when it does not fit."""
        raise NotImplementedError

    def init_dummy(self, layer: Linear, generator: torch.Generator) -> None:
        """Random weights of the right kind (load_format="dummy"), as if loaded."""
        raise ValueError(f"load_format='dummy' is not supported with {self.name} weights")

    def process_after_loading(self, layer: Linear) -> None:
        """Turn what was loaded into what `apply` reads (repack, transpose, fold scales)."""

    def apply(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """y = x W^T (+ bias) in x's dtype."""
        raise NotImplementedError

    def bytes_per_forward(self, layer: Linear) -> int:
        """Bytes of the layer's own tensors one forward reads (weights, scales, bias)."""
        return sum(p.numel() * p.element_size() for p in layer.parameters(recurse=False))


class UnquantizedLinearMethod(LinearMethod):
    """The weight in the model dtype, F.linear. The layer's forward is F.linear itself."""

    name = "unquantized"
    plain = True

    def create_weights(self, layer: Linear, dtype: torch.dtype) -> None:
        if layer.weight is None:  # a tied LM head already has its weight
            layer.weight = nn.Parameter(
                torch.empty(layer.out_features, layer.in_features, dtype=dtype),
                requires_grad=False,
            )
        if layer.has_bias:
            layer.bias = nn.Parameter(
                torch.empty(layer.out_features, dtype=dtype), requires_grad=False
            )

    def checkpoint_leaves(self, layer: Linear) -> set[str]:
        return {"weight", "bias"} if layer.has_bias else {"weight"}

    def load(self, layer: Linear, leaf: str, tensor: torch.Tensor, spec: ShardSpec) -> None:
        target = layer.weight if leaf == "weight" else layer.bias if leaf == "bias" else None
        if target is None:
            raise ValueError(f"checkpoint tensor {leaf!r} has no place in an unquantized layer")
        copy_rows(target, tensor, spec, leaf, cols=leaf == "weight")

    def init_dummy(self, layer: Linear, generator: torch.Generator) -> None:
        for p in layer.parameters(recurse=False):
            p.data.uniform_(-0.02, 0.02, generator=generator)

    def apply(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)


def copy_rows(
    target: torch.Tensor, tensor: torch.Tensor, spec: ShardSpec, what: str, cols: bool = True
) -> None:
    """Copy this rank's part of a checkpoint tensor with one row per output row into the rows
    `spec` owns in `target` (its input features sliced too when `cols`)."""
    if tensor.shape[0] != spec.out_full:
        where = f"shard {spec.name!r}" if spec.name is not None else f"checkpoint tensor {what!r}"
        raise ValueError(
            f"{where}: expected {spec.out_full} rows, checkpoint has {tuple(tensor.shape)}"
        )
    part = spec.take_rows(tensor)
    if cols and tensor.dim() > 1:
        part = spec.take_cols(part)
    dest = target.data[spec.out_offset : spec.out_offset + spec.out_size]
    if dest.shape != part.shape:
        raise ValueError(
            f"checkpoint tensor {what!r} has shape {tuple(tensor.shape)}, the layer expects "
            f"{tuple(dest.shape)} on this rank"
        )
    dest.copy_(part)


UNQUANTIZED = UnquantizedLinearMethod()
