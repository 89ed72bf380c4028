"""Linear layers with packed weights (QKV, gate/up) loaded shard by shard.

Packing turns three (or two) small matmuls into one, which matters most at small batch where
each kernel launch costs as much as the math. Tensor parallelism splits these along the output
(column) or input (row) dimension; the split helpers live here so the loaders stay simple.

Quantized weights: each layer has a `quant_method` (layers/quantization). Unquantized layers
(the default) keep their weight in the model dtype and their forward is F.linear itself. A model
built inside `quantization.building(config)` leaves its layers' tensors to
`create_quantized_weights(model, config, names_of)`, which picks each layer's method by its
checkpoint names; a quantized layer's forward is its method's `apply` (set once, per instance,
so the unquantized forward carries no extra branch). Checkpoint tensors reach a layer through
`load_checkpoint(leaf, tensor, shard)`, which hands the method a `ShardSpec` (where the tensor
goes, what part this rank keeps).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from graphwise.distributed import parallel_state
from graphwise.layers import quantization
from graphwise.layers.quantization import UNQUANTIZED, LinearMethod, ShardSpec


class Linear(nn.Module):
    """y = x W^T (+ b). Weight layout [out_features, in_features], like nn.Linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.has_bias = bias
        self.quant_method: LinearMethod = UNQUANTIZED
        self.weight: nn.Parameter | None
        self.bias: nn.Parameter | None
        if quantization.current() is None:
            self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
            self.bias = (
                nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
            )
        else:  # create_quantized_weights picks the method by name, then creates them
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    # ---- quantization and loading ------------------------------------------------------
    def set_quant_method(self, method: LinearMethod, dtype: torch.dtype) -> None:
        """Create the layer's tensors with `method` (on the current default device)."""
        self.quant_method = method
        method.create_weights(self, dtype)
        if not method.plain:
            self.forward = self.quantized_forward  # type: ignore[method-assign]

    def quantized_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)

    def shard_specs(self) -> list[ShardSpec]:
        """One spec per checkpoint projection the layer holds (several for a packed layer)."""
        return [self.shard_spec(None)]

    def shard_spec(self, shard: str | None) -> ShardSpec:
        if shard is not None:
            raise ValueError(f"{type(self).__name__} has no packed shard {shard!r}")
        return ShardSpec(None, 0, self.out_features, self.out_features, 0, self.in_features, 0, 1)

    def load_checkpoint(self, leaf: str, tensor: torch.Tensor, shard: str | None = None) -> None:
        """Load checkpoint tensor `leaf` ("weight", "bias", "weight_scale", ...) of projection
        `shard` (packed layers) from the full, unsliced checkpoint tensor."""
        self.quant_method.load(self, leaf, tensor, self.shard_spec(shard))

    def checkpoint_leaves(self) -> set[str]:
        return self.quant_method.checkpoint_leaves(self)

    def process_after_loading(self) -> None:
        self.quant_method.process_after_loading(self)

    def bytes_per_forward(self) -> int:
        return self.quant_method.bytes_per_forward(self)


class PackedLinear(Linear):
    """Several projections of the same input stored as one weight; `shard_sizes` names the
    rows each one owns in the checkpoint, in order (e.g. q, k, v).

    Column parallelism: `shard_parts[name] = (index, count)` keeps only part `index` of `count`
    equal row blocks of that projection (q split over the TP ranks; k and v split too, or
    replicated when there are fewer KV heads than ranks). Default: all of it."""

    def __init__(
        self,
        in_features: int,
        shard_sizes: dict[str, int],
        bias: bool = False,
        shard_parts: dict[str, tuple[int, int]] | None = None,
    ) -> None:
        parts = {name: (shard_parts or {}).get(name, (0, 1)) for name in shard_sizes}
        for name, size in shard_sizes.items():
            if size % parts[name][1]:
                raise ValueError(f"shard {name!r}: {size} rows do not split into {parts[name][1]}")
        local = {name: size // parts[name][1] for name, size in shard_sizes.items()}
        super().__init__(in_features, sum(local.values()), bias)
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        self.shard_parts = parts
        self.shard_full_sizes = dict(shard_sizes)
        offset = 0
        for name, size in local.items():
            self.shard_offsets[name] = (offset, size)
            offset += size

    def load_shard(self, shard: str, tensor: torch.Tensor, is_bias: bool = False) -> None:
        if is_bias and not self.has_bias:
            raise ValueError(f"{shard}: checkpoint has a bias the layer lacks")
        self.load_checkpoint("bias" if is_bias else "weight", tensor, shard)

    def shard_specs(self) -> list[ShardSpec]:
        return [self.shard_spec(name) for name in self.shard_offsets]

    def shard_spec(self, shard: str | None) -> ShardSpec:
        if shard not in self.shard_offsets:
            raise ValueError(
                f"packed layer has no shard {shard!r} ({', '.join(self.shard_offsets)})"
            )
        offset, size = self.shard_offsets[shard]
        full = self.shard_full_sizes[shard]
        index = self.shard_parts[shard][0]
        return ShardSpec(shard, offset, size, full, index, self.in_features, 0, 1)


# ---- tensor parallelism --------------------------------------------------------------------
# Each layer reads its TP rank and size from parallel_state.current() when it is built. At
# tp_size 1 each behaves exactly like the plain layer (no collective, no extra kernel).


def _pad_rows(part: torch.Tensor, rows: int) -> torch.Tensor:
    """`part` padded with zero rows up to `rows` (the last vocab shard may be short)."""
    if part.shape[0] == rows:
        return part
    pad = part.new_zeros((rows - part.shape[0], *part.shape[1:]))
    return torch.cat([part, pad])


class ColumnParallelLinear(Linear):
    """Output features split over the TP ranks, no communication: rank r holds rows
    [r * n, (r + 1) * n) with n = ceil(out_features / tp). Rows past out_features (padding, for a
    vocabulary that does not divide) are zero."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        ctx = parallel_state.current()
        self.tp_rank, self.tp_size = ctx.tp_rank, ctx.tp_size
        super().__init__(in_features, -(-out_features // ctx.tp_size), bias)
        self.full_out_features = out_features

    def shard_spec(self, shard: str | None) -> ShardSpec:
        if shard is not None:
            return super().shard_spec(shard)
        return ShardSpec(
            None, 0, self.out_features, self.full_out_features, self.tp_rank, self.in_features, 0, 1
        )

    def tp_slice(self, leaf: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of a checkpoint tensor (`leaf` is "weight" or "bias")."""
        if self.tp_size == 1:
            return tensor
        n = self.out_features
        return _pad_rows(tensor[self.tp_rank * n : (self.tp_rank + 1) * n], n)


class RowParallelLinear(Linear):
    """Input features split over the TP ranks; the partial products are summed by an all-reduce
    (left to the caller with reduce_output=False, when it sums several such outputs first).
    The bias is added once, by TP rank 0, before the sum."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, reduce_output: bool = True
    ) -> None:
        ctx = parallel_state.current()
        if in_features % ctx.tp_size:
            raise ValueError(
                f"{in_features} input features do not split over tensor_parallel_size={ctx.tp_size}"
            )
        self.tp_rank, self.tp_size = ctx.tp_rank, ctx.tp_size
        super().__init__(in_features // ctx.tp_size, out_features, bias)
        self.reduce_output = reduce_output
        self.full_in_features = in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.linear(x, self.weight, self.bias)
        y = F.linear(x, self.weight, self.bias if self.tp_rank == 0 else None)
        if self.reduce_output:
            y = parallel_state.tensor_model_parallel_all_reduce(y)
        return y

    def quantized_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self.quant_method.apply(self, x, self.bias)
        y = self.quant_method.apply(self, x, self.bias if self.tp_rank == 0 else None)
        if self.reduce_output:
            y = parallel_state.tensor_model_parallel_all_reduce(y)
        return y

    def shard_spec(self, shard: str | None) -> ShardSpec:
        if shard is not None:
            return super().shard_spec(shard)
        return ShardSpec(
            None,
            0,
            self.out_features,
            self.out_features,
            0,
            self.full_in_features,
            self.tp_rank,
            self.tp_size,
        )

    def tp_slice(self, leaf: str, tensor: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1 or leaf == "bias":
            return tensor
        n = self.in_features
        return tensor[:, self.tp_rank * n : (self.tp_rank + 1) * n]


def create_quantized_weights(
    model: nn.Module,
    config: quantization.QuantizationConfig | None,
    names_of: Callable[[str, Linear], list[str]],
    dtype: torch.dtype,
) -> None:
    """Give every linear layer of a model built inside `quantization.building(config)` its
    method and create its tensors. `names_of(module_name, layer)` gives the checkpoint names of
    the projections the layer holds (q_proj, k_proj, v_proj for a packed qkv_proj): formats
    choose by those names (ignore lists, per-module schemes)."""
    for name, module in model.named_modules():
        if not isinstance(module, Linear):
            continue
        if module.weight is not None and (module.bias is not None or not module.has_bias):
            continue  # built outside `building`, or a tied LM head (the embedding's weight)
        method = UNQUANTIZED if config is None else config.linear_method(names_of(name, module))
        if module.weight is not None and not method.plain:
            raise ValueError(
                f"{name} shares its weight (a tied LM head) and cannot be quantized ({method.name})"
            )
        module.set_quant_method(method, dtype)


def process_after_loading(model: nn.Module) -> None:
    """Each linear layer's post-load step (after the checkpoint or the dummy weights)."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.process_after_loading()


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split over the TP ranks (padded to a multiple of tp): each rank looks up the
    ids it holds, writes zeros for the others, and an all-reduce assembles the rows. Build it only
    for tp_size > 1; the single-device model keeps nn.Embedding."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        ctx = parallel_state.current()
        self.tp_rank, self.tp_size = ctx.tp_rank, ctx.tp_size
        self.num_embeddings = num_embeddings
        self.rows = -(-num_embeddings // ctx.tp_size)
        self.vocab_start = ctx.tp_rank * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, embedding_dim), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0.0)
        return parallel_state.tensor_model_parallel_all_reduce(out)

    def tp_slice(self, leaf: str, tensor: torch.Tensor) -> torch.Tensor:
        n = self.rows
        return _pad_rows(tensor[self.tp_rank * n : (self.tp_rank + 1) * n], n)
