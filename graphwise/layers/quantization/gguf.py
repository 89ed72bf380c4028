"""GGUF weights kept packed: Q8_0, Q4_0, Q4_1, Q4_K, Q5_K and Q6_K linear weights stay the
file's bytes, uint8 [out_features, bytes_per_row(type, in_features)], and the GEMV/GEMM
dequantizes them on the fly (kernels/gguf_quant.py).

The config is not parsed from a `quantization_config`: the model loader builds it from the GGUF
file's tensor types (`GgufConfig(types)`, HF weight name -> type name) when the weights stay
packed (quantization="gguf", or GRAPHWISE_GGUF_PACKED=1; see models/loader.py). Layers
whose weights the kernels cannot read (F16/F32/BF16 and other quant types), the LM head, and
the embeddings are dequantized at load as before.

A packed layer whose shards differ in type (Q4_K_M files store q/k in Q4_K and v in Q6_K) keeps
one tensor per shard (`qweight_<shard>`) and runs one kernel per shard, concatenating the
outputs; shards of one type share one tensor (`qweight`), rows stacked.

Tensor parallelism: a column-parallel rank keeps whole rows (`take_rows`), a row-parallel rank
keeps whole blocks of each row (a split inside a block is refused).

Compute: CUDA runs `gguf_linear`. CPU (only when forced: tests of the packed loading) keeps the
packed parameters and dequantizes each layer once at `process_after_loading` with the torch
reference (bit-identical to gguf.quants.dequantize), so its tokens equal the dequantized path's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from graphwise.kernels.gguf_quant import (
    SUPPORTED_QTYPES,
    block_shape,
    bytes_per_row,
    dequantize,
    gguf_linear,
)
from graphwise.layers.quantization.base import UNQUANTIZED, LinearMethod, ShardSpec, copy_rows
from graphwise.layers.quantization.config import QuantizationConfig

if TYPE_CHECKING:
    from graphwise.layers.linear import Linear


@dataclass(frozen=True, eq=True)
class GgufLinearMethod(LinearMethod):
    """`qtypes`: one type per shard of the layer (one entry: every shard has it)."""

    qtypes: tuple[str, ...] = ("Q8_0",)

    name = "gguf"

    def _types(self, layer: Linear) -> list[str]:
        n = len(layer.shard_specs())
        return list(self.qtypes) * n if len(self.qtypes) == 1 else list(self.qtypes)

    def _split(self, layer: Linear) -> bool:
        return len(set(self.qtypes)) > 1

    # ---- storage ----------------------------------------------------------------------
    def create_weights(self, layer: Linear, dtype: torch.dtype) -> None:
        specs = layer.shard_specs()
        types = self._types(layer)
        if len(types) != len(specs):
            raise ValueError(f"GGUF: {len(types)} tensor types for {len(specs)} shards")
        inp = layer.in_features
        for spec, qtype in zip(specs, types, strict=True):
            elems = block_shape(qtype)[0]
            if inp % elems:
                raise ValueError(
                    f"GGUF {qtype}: {inp} input features per rank (tensor_parallel_size="
                    f"{spec.in_count}) split a {elems}-element block; use another "
                    "tensor_parallel_size"
                )
        if self._split(layer):
            for spec, qtype in zip(specs, types, strict=True):
                shape = (spec.out_size, bytes_per_row(qtype, inp))
                p = nn.Parameter(torch.zeros(shape, dtype=torch.uint8), requires_grad=False)
                layer.register_parameter(f"qweight_{spec.name}", p)
        else:
            shape = (layer.out_features, bytes_per_row(types[0], inp))
            layer.qweight = nn.Parameter(torch.zeros(shape, dtype=torch.uint8), requires_grad=False)
        if layer.has_bias:
            layer.bias = nn.Parameter(
                torch.empty(layer.out_features, dtype=dtype), requires_grad=False
            )
        layer.gguf_dtype = dtype
        layer.gguf_dense = None

    def checkpoint_leaves(self, layer: Linear) -> set[str]:
        return {"weight", "bias"} if layer.has_bias else {"weight"}

    def _target(self, layer: Linear, spec: ShardSpec) -> tuple[torch.Tensor, str, int]:
        """(destination rows, type, first row) of a shard."""
        types = self._types(layer)
        index = [s.name for s in layer.shard_specs()].index(spec.name)
        if self._split(layer):
            return getattr(layer, f"qweight_{spec.name}").data, types[index], 0
        return layer.qweight.data, types[index], spec.out_offset

    def load(self, layer: Linear, leaf: str, tensor: torch.Tensor, spec: ShardSpec) -> None:
        if leaf == "bias":
            copy_rows(layer.bias, tensor, spec, leaf, cols=False)
            return
        if leaf != "weight":
            raise ValueError(f"checkpoint tensor {leaf!r} has no place in a GGUF layer")
        dest_all, qtype, first = self._target(layer, spec)
        full_bytes = bytes_per_row(qtype, spec.in_full)
        if tensor.dtype != torch.uint8 or tuple(tensor.shape) != (spec.out_full, full_bytes):
            raise ValueError(
                f"packed GGUF {qtype} weight has {tensor.dtype} {tuple(tensor.shape)}, expected "
                f"uint8 ({spec.out_full}, {full_bytes})"
            )
        part = spec.take_rows(tensor)  # zero rows (zero scales) pad a short last part
        if spec.in_count > 1:  # whole blocks of each row
            n = bytes_per_row(qtype, spec.in_full // spec.in_count)
            part = part[:, spec.in_index * n : (spec.in_index + 1) * n]
        dest = dest_all[first : first + spec.out_size]
        if dest.shape != part.shape:
            raise ValueError(
                f"packed GGUF {qtype} weight {tuple(part.shape)} does not fit the layer's "
                f"{tuple(dest.shape)} on this rank"
            )
        dest.copy_(part)

    def process_after_loading(self, layer: Linear) -> None:
        first = next(p for p in layer.parameters(recurse=False) if p.dtype == torch.uint8)
        if first.device.type == "cuda":
            layer.gguf_dense = None
            return
        # CPU (forced packed loading): the torch reference, once, [out, in] in the model dtype.
        parts = []
        for spec, qtype in zip(layer.shard_specs(), self._types(layer), strict=True):
            dest, _, row = self._target(layer, spec)
            if not self._split(layer):  # one tensor: dequantize it whole, once
                parts = [dequantize(dest, qtype, layer.in_features)]
                break
            parts.append(dequantize(dest[row : row + spec.out_size], qtype, layer.in_features))
        layer.gguf_dense = torch.cat(parts).to(layer.gguf_dtype)

    # ---- compute ----------------------------------------------------------------------
    def apply(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if layer.gguf_dense is not None:
            return F.linear(x, layer.gguf_dense.to(x.dtype), bias)
        inp = layer.in_features
        if self._split(layer):
            types = self._types(layer)
            outs = [
                gguf_linear(x, getattr(layer, f"qweight_{s.name}"), t, s.out_size, inp)
                for s, t in zip(layer.shard_specs(), types, strict=True)
            ]
            y = torch.cat(outs, dim=-1)
        else:
            y = gguf_linear(x, layer.qweight, self.qtypes[0], layer.out_features, inp)
        return y if bias is None else y + bias


class GgufConfig(QuantizationConfig):
    """The linear weights of one GGUF file that stay packed. `types`: HF weight name
    ("model.layers.0.self_attn.q_proj.weight") -> GGUF type name, for every 2-D tensor."""

    name = "gguf"

    def __init__(self, types: dict[str, str]) -> None:
        self.types = dict(types)
        self.packed: set[str] = set()  # the weight names of layers given a GGUF method

    def linear_method(self, prefixes: list[str]) -> LinearMethod:
        names = [f"{p}.weight" for p in prefixes]
        types = [self.types.get(n) for n in names]
        if any(p.split(".")[-1] == "lm_head" for p in prefixes) or any(
            t not in SUPPORTED_QTYPES for t in types
        ):
            return UNQUANTIZED  # dequantized at load, as before
        self.packed.update(names)
        return GgufLinearMethod(tuple(types))  # type: ignore[arg-type]

    def describe(self) -> str:
        kinds = sorted({self.types[n] for n in self.packed})
        return f"gguf (packed {', '.join(kinds)})" if kinds else "gguf (dequantized)"
